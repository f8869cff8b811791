"""Entry point: a click group whose commands are imported only when used (fast ``--help``)."""

from __future__ import annotations

import importlib
import logging

import click

# command name -> "module:attribute" of a click.Command
COMMANDS = {
    "graph": "commandnet.cli.graph:graph",
    "demo": "commandnet.cli.demo:demo",
    "worker": "commandnet.cli.worker:worker",
    "trigger": "commandnet.cli.agents:trigger",
    "cancel": "commandnet.cli.agents:cancel",
    "signal": "commandnet.cli.agents:signal",
    "resume": "commandnet.cli.agents:resume",
    "status": "commandnet.cli.agents:status",
    "migrate": "commandnet.cli.migrate:migrate",
    "pools": "commandnet.cli.pools:pools",
}


class LazyGroup(click.Group):
    """Imports a command's module on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, _, attr = target.partition(":")
        command = getattr(importlib.import_module(module), attr)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=LazyGroup)
@click.option("--log-level", default="WARNING", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def cli(log_level: str) -> None:
    """commandnet: typed, durable state machines."""
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")


def main() -> None:
    """Console-script entry point."""
    cli()


if __name__ == "__main__":
    main()
