"""Example graphs bundled with commandnet: the demo's, and the benchmark's linear chain."""
