"""What both command-line entry points share: one-line errors and logging set-up."""

from __future__ import annotations

import logging
import shlex
import signal

import click

from curate.errors import CurateError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
OUR_PACKAGES = ("curate", "manifests", "train")


class ReportsErrors:
    """Mixin for click commands and groups: a CurateError becomes one stderr line, named after the program run
    (curate, or the standalone finetune-and-probe), and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CurateError as exc:
            click.echo(f"{ctx.find_root().command.name}: error: {exc}", err=True)
            ctx.exit(2)


class Group(ReportsErrors, click.Group):
    pass


class Command(ReportsErrors, click.Command):
    pass


def command_line(command: str, options: dict) -> str:
    """The command line that passes `options` (keyword arguments named as the options are; a list repeats its
    option): what a demo prints must be what it runs."""
    flags = []
    for name, value in options.items():
        for one in value if isinstance(value, list) else [value]:
            if one is not None and one is not False:
                flags.append(f"--{name.replace('_', '-')}" + ("" if one is True else f" {shlex.quote(str(one))}"))
    return " ".join([command, *flags])


def stop_cleanly_on_sigterm() -> None:
    """A batch scheduler's SIGTERM (preemption, a time limit) unwinds like Ctrl-C: staging folders are removed,
    resumable work (download shards, filter scores, finetune epochs) is kept, and the exit status is 143, the
    signal's. Python's default is to die on the spot and leave the staging folders behind."""
    def stop(signum, _frame):
        # the DataLoader workers of the same process group got it too: their deaths are no error now (PyTorch's
        # SIGCHLD handler would print one from the loader's clean-up)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def configure_logging(verbose: bool = False) -> None:
    """Our own progress notes at INFO, other libraries' at WARNING; with -v everything at DEBUG."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for package in OUR_PACKAGES:
        logging.getLogger(package).setLevel(logging.DEBUG if verbose else logging.INFO)
