"""Nodes: the states of a graph. The return hint of ``run`` declares where a node may go next."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, TypeVarTuple

from pydantic import BaseModel

from .policy import RetryPolicy

CtxT = TypeVar("CtxT", bound=BaseModel)
PayloadT = TypeVarTuple("PayloadT")  # none, or one: the type of ``self.payload``
TargetsT = TypeVarTuple("TargetsT")


class Node(Generic[CtxT, *PayloadT]):
    """One state of a graph; subclass it and implement ``run``.

    ``run`` receives the agent's context (rehydrated from the store, mutable) and returns the
    *class* of the next node, or ``None`` to finish, or a :class:`Directive` (a timer, a signal
    wait). Its return hint is the node's edge set. ``Node[Ctx, Payload]`` declares the type of
    ``self.payload`` (a trigger's or a signal's), validated by Pydantic before ``run``.

    Class keywords: ``name`` gives a stable node name (default: the class name; rename classes
    freely once agents are running by pinning it), ``retry`` a :class:`RetryPolicy`.

        class Charge(Node[Payment], name="charge", retry=RetryPolicy(max_attempts=5)):
            async def run(self, ctx: Payment) -> type[Receipt] | type[Declined]: ...
    """

    node_name: ClassVar[str] = "Node"
    retry: ClassVar[RetryPolicy] = RetryPolicy()
    payload: Any = None

    def __init_subclass__(
        cls, *, name: str | None = None, retry: RetryPolicy | None = None, **kwargs: Any
    ) -> None:
        super().__init_subclass__(**kwargs)
        cls.node_name = name or cls.__dict__.get("node_name") or cls.__name__
        if retry is not None:
            cls.retry = retry

    if TYPE_CHECKING:

        async def run(
            self, ctx: CtxT
        ) -> type[Node[CtxT, *tuple[Any, ...]]] | Directive[*tuple[Any, ...]] | None:
            """Do this step's work; return the next node's class, or ``None`` when done."""
    else:

        async def run(self, ctx: CtxT) -> None:
            """Do this step's work; return the next node's class, or ``None`` when done."""
            raise NotImplementedError(f"{type(self).__name__}.run is not implemented")


# A node class of any context and payload, for hints: ``type[AnyNode]``.
AnyNode = Node[Any, *tuple[Any, ...]]


class Directive(Generic[*TargetsT]):
    """What ``run`` returns when it asks for more than a move: ``Sleep(Next, seconds=60)``.

    Hinted with its target nodes (``Sleep[Next]``), so the graph, its checks and its picture show
    the edge; ``labels`` names each target's edge kind, in order. The engine commits a move to
    ``targets()[0]`` with the store fields :meth:`commit_fields` gives (see ``Commit``).
    """

    labels: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def label(cls, index: int) -> str:
        """The edge kind of target ``index`` (the last label repeats; default: class name)."""
        return cls.labels[min(index, len(cls.labels) - 1)] if cls.labels else cls.__name__

    def targets(self) -> tuple[type[AnyNode], ...]:
        """The nodes this directive leads to: where it moves first, then the others."""
        raise NotImplementedError

    def commit_fields(self) -> dict[str, Any]:
        """Extra ``Commit`` fields: ``wake_in``, ``waiting``, ``timeout_node``, ``payload``."""
        return {}


def context_type(node: type[AnyNode]) -> type[BaseModel] | None:
    """The context model a node class declares through ``Node[Ctx]``, if any."""
    args = _node_args(node)
    return args[0] if args else None


def payload_type(node: type[AnyNode]) -> Any:
    """The payload type a node class declares through ``Node[Ctx, Payload]``, or None."""
    args = _node_args(node)
    return args[1] if len(args) > 1 else None


def _node_args(node: type[AnyNode]) -> tuple[Any, ...]:
    for klass in node.__mro__:
        for base in getattr(klass, "__orig_bases__", ()):
            origin = getattr(base, "__origin__", None)
            args = getattr(base, "__args__", ())
            if isinstance(origin, type) and issubclass(origin, Node) and args \
                    and isinstance(args[0], type) and issubclass(args[0], BaseModel):
                return tuple(args)
    return ()
