"""The `finetune-and-probe` command."""

from __future__ import annotations

import sys

import click


@click.command("finetune-and-probe", context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Finetune a CLIP image encoder on one or more manifests and report zero-shot and linear-probe accuracy."""
    click.echo("finetune-and-probe: not implemented yet", err=True)
    sys.exit(2)


def main() -> None:
    cli(prog_name="finetune-and-probe")
