"""Payloads: a typed value handed to one step (here with the trigger).

Run: python examples/workflows/payloads.py
"""

from __future__ import annotations

import asyncio

from pydantic import BaseModel

from commandnet import ContextValidationError, Engine, Node
from commandnet.adapters.memory import InMemoryEventBus, InMemoryPersistence


class Cart(BaseModel):  # the context: persisted after every step
    lines: list[str] = []
    total: float = 0.0


class AddItem(BaseModel):  # the payload: given to one step, validated before it runs
    sku: str
    price: float
    quantity: int = 1


class Add(Node[Cart, AddItem]):
    async def run(self, ctx: Cart) -> type[Checkout]:
        item: AddItem = self.payload  # already an AddItem
        ctx.lines.append(f"{item.quantity} x {item.sku}")
        ctx.total += item.price * item.quantity
        return Checkout


class Checkout(Node[Cart]):
    async def run(self, ctx: Cart) -> None:
        print(f"checkout: {ctx.lines} total={ctx.total:.2f} payload={self.payload}")


async def main() -> None:
    engine = Engine(InMemoryPersistence(), InMemoryEventBus())
    await engine.start_worker()
    await engine.trigger_agent("cart-1", Add, Cart(),
                               payload=AddItem(sku="tea", price=3.5, quantity=2))
    done = await engine.wait_for("cart-1", timeout=10)
    print(f"cart-1: {done.status.value} at {done.node}")
    try:  # a payload that does not validate is refused before anything is stored
        await engine.trigger_agent("cart-2", Add, Cart(), payload={"sku": "tea"})
    except ContextValidationError as exc:
        print(f"cart-2 refused: {str(exc).splitlines()[0]}")
    await engine.stop()


if __name__ == "__main__":
    asyncio.run(main())
