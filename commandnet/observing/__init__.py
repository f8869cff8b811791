"""How the engine tells observers what happened (see :mod:`commandnet.observing.fanout`)."""
