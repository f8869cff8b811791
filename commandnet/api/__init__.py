"""The engine's caller-facing actions (see :mod:`commandnet.api.actions`)."""
