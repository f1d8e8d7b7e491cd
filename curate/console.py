"""What both command-line entry points share: one-line errors and logging set-up."""

from __future__ import annotations

import _thread
import contextlib
import logging
import shlex
import signal
import sys
import threading
from collections.abc import Iterator

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


def format_command(command: str, options: dict) -> str:
    """The command line that passes `options` (keyword arguments named as the options are; a list repeats its
    option): what a demo prints must be what it runs."""
    flags = []
    for name, value in options.items():
        for one in value if isinstance(value, list) else [value]:
            if one is not None and one is not False:
                flags.append(f"--{name.replace('_', '-')}" + ("" if one is True else f" {shlex.quote(str(one))}"))
    return " ".join([command, *flags])


def _ignore_signal(_signum, _frame) -> None:
    pass


@contextlib.contextmanager
def stop_cleanly_on_sigterm() -> Iterator[None]:
    """Run a command so that a batch scheduler's SIGTERM (preemption, a time limit) unwinds it like Ctrl-C:
    staging folders are removed, resumable work (download shards, filter scores, finetune epochs) is kept, and
    the exit status is 143, the signal's. Python's default is to die on the spot and leave the staging folders.

    Whatever the unwinding turns the exit into (an import's class body makes it a RuntimeError), the status is
    143 without a traceback; an exit swallowed by a finalizer (`__del__`, a weakref callback) is raised again.
    After the block a late SIGTERM ends the process at once, as by default."""
    received: list[int] = []

    def stop(signum, _frame):
        received.append(signum)
        # the DataLoader workers of the same process group got it too: their deaths are no error now (PyTorch's
        # SIGCHLD handler would print one from the loader's clean-up). A handler that does nothing, not SIG_DFL: a
        # SIGCHLD already pending would find no Python handler and raise "Signal 17 ignored due to race condition"
        signal.signal(signal.SIGCHLD, _ignore_signal)
        raise SystemExit(128 + signum)

    def unraisable(hook_args) -> None:
        if received and isinstance(hook_args.exc_value, SystemExit):  # raised in a finalizer, which drops it
            threading.Timer(0.01, _thread.interrupt_main, (received[-1],)).start()  # not from the hook: dropped again
        else:
            previous_hook(hook_args)

    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except BaseException:
        if received:
            raise SystemExit(128 + received[0]) from None
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        sys.unraisablehook = previous_hook


def configure_logging(verbose: bool = False) -> None:
    """Our own progress notes at INFO, other libraries' at WARNING; with -v everything at DEBUG."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for package in OUR_PACKAGES:
        logging.getLogger(package).setLevel(logging.DEBUG if verbose else logging.INFO)
