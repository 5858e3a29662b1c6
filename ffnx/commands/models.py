"""`ffnx models`: list the zoo."""

from __future__ import annotations

import json

import click

from ffnx.commands import grammar, ui


@click.command("models", context_settings={"max_content_width": 100})
@click.option("--size", type=click.Choice(["tiny", "base"]), default="tiny", show_default=True)
@grammar.json_option("Print a JSON list (scripts).")
def models_cmd(size: str, as_json: bool) -> None:
    """List the bundled model zoo: name, FFN variant, parameter count.

    \b
    Example:
      ffnx models --size base
      ffnx models --json
    """
    from ffnx.models import zoo

    rows = [zoo.describe(name, size) for name in zoo.names()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    ui.out.print(
        ui.table(
            f"ffnx model zoo ({size})",
            ["name", "variant", "params", "description"],
            [[r["name"], r["variant"], r["params"], r["description"]] for r in rows],
        )
    )


COMMANDS = [models_cmd]
