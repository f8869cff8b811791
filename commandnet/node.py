"""Nodes: the states of a graph. The return hint of ``run`` declares where a node may go next."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel

from .policy import RetryPolicy

CtxT = TypeVar("CtxT", bound=BaseModel)


class Node(Generic[CtxT]):
    """One state of a graph; subclass it and implement ``run``.

    ``run`` receives the agent's context (rehydrated from the store, mutable) and returns the
    *class* of the next node, or ``None`` to finish. Its return hint is the node's edge set.

    Class keywords: ``name`` gives a stable node name (default: the class name; rename classes
    freely once agents are running by pinning it), ``retry`` a :class:`RetryPolicy`.

        class Charge(Node[Payment], name="charge", retry=RetryPolicy(max_attempts=5)):
            async def run(self, ctx: Payment) -> type[Receipt] | type[Declined]: ...
    """

    node_name: ClassVar[str] = "Node"
    retry: ClassVar[RetryPolicy] = RetryPolicy()

    def __init_subclass__(
        cls, *, name: str | None = None, retry: RetryPolicy | None = None, **kwargs: Any
    ) -> None:
        super().__init_subclass__(**kwargs)
        cls.node_name = name or cls.__dict__.get("node_name") or cls.__name__
        if retry is not None:
            cls.retry = retry

    if TYPE_CHECKING:

        async def run(self, ctx: CtxT) -> type[Node[CtxT]] | None:
            """Do this step's work; return the next node's class, or ``None`` when done."""
    else:

        async def run(self, ctx: CtxT) -> None:
            """Do this step's work; return the next node's class, or ``None`` when done."""
            raise NotImplementedError(f"{type(self).__name__}.run is not implemented")


def context_type(node: type[Node[Any]]) -> type[BaseModel] | None:
    """The context model a node class declares through ``Node[Ctx]``, if any."""
    for klass in node.__mro__:
        for base in getattr(klass, "__orig_bases__", ()):
            origin = getattr(base, "__origin__", None)
            if isinstance(origin, type) and issubclass(origin, Node):
                args = getattr(base, "__args__", ())
                if args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
                    return args[0]
    return None
