"""The 10-node linear graph (Step0 -> ... -> Step9), from the bundled example, for worker tests."""

from commandnet.examples.linear import Start as Step0
from commandnet.examples.linear import Trail

__all__ = ["Step0", "Trail"]
