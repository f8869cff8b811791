"""``python -m commandnet.worker --graph pkg.module:Start``: the worker without the CLI group."""

from ..cli.worker import worker

if __name__ == "__main__":
    worker(prog_name="python -m commandnet.worker")
