"""Graph analysis: every supported hint form, and every problem reported at once."""

from __future__ import annotations

from typing import Optional, Type, Union

import pytest
from pydantic import BaseModel

from commandnet import GraphAnalyzer, GraphError, Node


class Ctx(BaseModel):
    n: int = 0


class Other(BaseModel):
    s: str = ""


class Denied(Node[Ctx]):
    async def run(self, ctx: Ctx) -> None:
        return None


class Executing(Node[Ctx]):
    async def run(self, ctx: Ctx) -> None:
        return None


class AuthCheck(Node[Ctx]):
    async def run(self, ctx: Ctx) -> Union[Type[Executing], Type[Denied]]:
        return Executing


def test_seed_graph_structure() -> None:
    assert GraphAnalyzer.build_graph(AuthCheck) == {
        "AuthCheck": ["Executing", "Denied"], "Executing": [], "Denied": []}


class Loop(Node[Ctx]):
    async def run(self, ctx: Ctx) -> type[Loop] | type[Finish] | None:
        return None


class Finish(Node[Ctx], name="finish-v1"):
    async def run(self, ctx: Ctx) -> Optional[type[Loop]]:
        return None


def test_future_annotations_cycles_optional_and_stable_names() -> None:
    graph = GraphAnalyzer.validate(Loop)
    assert graph.to_dict() == {"Loop": ["Loop", "finish-v1"], "finish-v1": ["Loop"]}
    assert graph.terminal == {"Loop", "finish-v1"}
    assert graph.context is Ctx
    assert graph.allows("Loop", Finish) and graph.allows("Loop", None)
    assert not graph.allows("finish-v1", Finish)


def test_string_forward_refs_to_classes_defined_in_a_function() -> None:
    class First(Node[Ctx]):
        async def run(self, ctx: Ctx) -> "type[Second]":
            return Second

    class Second(Node[Ctx]):
        async def run(self, ctx: Ctx) -> "type[First] | None":
            return None

    assert GraphAnalyzer.build_graph(First) == {"First": ["Second"], "Second": ["First"]}


def test_type_of_union() -> None:
    class Pick(Node[Ctx]):
        async def run(self, ctx: Ctx) -> type[Executing | Denied]:
            return Denied

    assert GraphAnalyzer.build_graph(Pick)["Pick"] == ["Executing", "Denied"]


def test_mermaid() -> None:
    text = GraphAnalyzer.mermaid(AuthCheck)
    assert text.splitlines()[:2] == ["stateDiagram-v2", "    [*] --> AuthCheck"]
    assert "    AuthCheck --> Denied" in text
    assert "    Executing --> [*]" in text


def test_every_problem_in_one_error() -> None:
    class Unresolvable(Node[Ctx]):
        async def run(self, ctx: Ctx) -> "type[DoesNotExist]":  # type: ignore[name-defined]  # noqa: F821
            ...

    class NotANode(Node[Ctx]):
        async def run(self, ctx: Ctx) -> type[int]:  # type: ignore[override]
            ...

    class InstanceHint(Node[Ctx]):
        async def run(self, ctx: Ctx) -> Executing:  # type: ignore[override]
            ...

    class OtherCtx(Node[Other]):
        async def run(self, ctx: Other) -> None: ...

    class Root(Node[Ctx]):
        async def run(
            self, ctx: Ctx
        ) -> type[Unresolvable] | type[NotANode] | type[InstanceHint] | type[OtherCtx]:
            ...

    with pytest.raises(GraphError) as info:
        GraphAnalyzer.validate(Root)
    text = str(info.value)
    assert "Unresolvable.run return hint" in text and "DoesNotExist" in text
    assert "NotANode.run return hint" in text and "int" in text
    assert "`Executing` is an instance hint" in text
    assert "different context models" in text and "OtherCtx" in text
    assert len(info.value.problems) == 4


def test_duplicate_names() -> None:
    class A(Node[Ctx], name="same"):
        async def run(self, ctx: Ctx) -> type[B]:
            ...

    class B(Node[Ctx], name="same"):
        async def run(self, ctx: Ctx) -> None: ...

    with pytest.raises(GraphError, match="two nodes are named 'same'"):
        GraphAnalyzer.validate(A)


def test_missing_hint_sync_run_and_no_context() -> None:
    class NoHint(Node[Ctx]):
        async def run(self, ctx):  # type: ignore[no-untyped-def]
            ...

    class Sync(Node):  # type: ignore[type-arg]
        def run(self, ctx) -> type[NoHint]:  # type: ignore[no-untyped-def]
            ...

    with pytest.raises(GraphError) as info:
        GraphAnalyzer.validate(Sync)
    text = str(info.value)
    assert "Sync.run must be `async def`" in text
    assert "NoHint.run has no return hint" in text
    assert "Sync declares no context model" in text


def test_start_must_be_a_node() -> None:
    with pytest.raises(GraphError, match="not a Node subclass"):
        GraphAnalyzer.validate(int)  # type: ignore[arg-type]
