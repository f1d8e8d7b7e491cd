"""What both command-line entry points share: one-line errors and logging set-up."""

from __future__ import annotations

import logging

import click

from curate.errors import CurateError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
OUR_PACKAGES = ("curate", "manifests", "train")


class ReportsErrors:
    """Mixin for click commands and groups: a CurateError becomes one stderr line and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CurateError as exc:
            click.echo(f"curate: error: {exc}", err=True)
            ctx.exit(2)


class Group(ReportsErrors, click.Group):
    pass


class Command(ReportsErrors, click.Command):
    pass


def configure_logging(verbose: bool = False) -> None:
    """Our own progress notes at INFO, other libraries' at WARNING; with -v everything at DEBUG."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for package in OUR_PACKAGES:
        logging.getLogger(package).setLevel(logging.DEBUG if verbose else logging.INFO)
