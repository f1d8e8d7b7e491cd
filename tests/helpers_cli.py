"""Checks shared by the CLI tests."""

from __future__ import annotations

from pathlib import Path

from click.testing import Result


def assert_cli_error(result: Result, message: str, out: str | Path | None = None) -> None:
    """A clean CLI failure: exit code 2 through SystemExit (an uncaught exception would give 1), and stderr
    shows exactly one line, 'curate: error: ...' holding `message` (progress bars redraw themselves with
    '\r' and end blanked: a line shows what follows its last '\r'); with `out`, neither it nor a staging
    folder (manifests.io.staged_output_dir's `.<name>.partial-*` sibling) is left behind.
    """
    assert result.exit_code == 2, (result.exit_code, result.exception, result.output)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    shown = [line.rsplit("\r", 1)[-1] for line in result.stderr.split("\n")]
    lines = [line for line in shown if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("curate: error: "), result.stderr
    assert message in lines[0], (message, lines[0])
    if out is not None:
        out = Path(out)
        assert not out.exists(), out
        assert not list(out.parent.glob(f".{out.name}.partial-*")), list(out.parent.iterdir())
