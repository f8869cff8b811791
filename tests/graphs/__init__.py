"""Example graphs importable by tests and worker subprocesses (``tests.graphs.x:Node``)."""
