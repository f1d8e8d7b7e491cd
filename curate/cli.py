"""The `curate` command group. Each command only parses its options and calls one stage function."""

from __future__ import annotations

import logging
import sys

import click

from curate.errors import CurateError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _Group(click.Group):
    """Turns a CurateError into one line on stderr and exit code 2, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CurateError as exc:
            click.echo(f"curate: error: {exc}", err=True)
            ctx.exit(2)


@click.group(cls=_Group, context_settings=CONTEXT)
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.version_option(package_name="curate")
def cli(verbose: bool) -> None:
    """Curate targeted real (retrieved) or synthetic data to adapt CLIP to a classification task.

    \b
    Example, end to end on the embedded offline sample:
      curate demo --out demo-run
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def main() -> None:
    cli(prog_name="curate")


# ---------------------------------------------------------------- tasks
@cli.group("tasks", invoke_without_command=True, context_settings=CONTEXT)
@click.pass_context
def tasks_group(ctx: click.Context) -> None:
    """List the builtin tasks; `curate tasks show NAME` prints one.

    \b
    Example:
      curate tasks
      curate tasks show flowers102
    """
    if ctx.invoked_subcommand is None:
        from curate.tasks import builtin_task_names, load_task

        for name in builtin_task_names():
            task = load_task(name)
            click.echo(f"{name:16s} {len(task.classes):4d} classes  domain: {'; '.join(task.domain_text)}")


@tasks_group.command("show", context_settings=CONTEXT)
@click.argument("name")
def tasks_show(name: str) -> None:
    """Print a task (builtin name or file) as YAML."""
    import yaml

    from curate.tasks import load_task

    click.echo(yaml.safe_dump(load_task(name).to_dict(), sort_keys=False, allow_unicode=True), nl=False)


# ---------------------------------------------------------------- retrieve
@cli.command(context_settings=CONTEXT)
@click.option("--task", "-t", required=True, help="Builtin task name or task file (YAML, or one class per line).")
@click.option("--metadata", "-m", "metadata", required=True, multiple=True, help="Parquet file, folder or glob (repeatable).")
@click.option("--out", "-o", required=True, type=click.Path(), help="Output folder (manifest.parquet + report.json).")
@click.option("--match", "match_mode", type=click.Choice(["word", "substring"]), default="word", show_default=True)
@click.option("--multi-class", type=click.Choice(["drop", "duplicate"]), default="drop", show_default=True,
              help="What to do with a caption naming several classes.")
@click.option("--per-class-cap", type=click.IntRange(min=1), default=None, help="Keep at most N rows per class.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the per-class subset.")
@click.option("--url-col", default=None, help="URL column (default: detected, URL or url).")
@click.option("--caption-col", default=None, help="Caption column (default: detected, TEXT, text or caption).")
@click.option("--max-punsafe", type=click.FloatRange(0, 1), default=None, help="Drop rows with punsafe above this.")
@click.option("--max-pwatermark", type=click.FloatRange(0, 1), default=None, help="Drop rows with pwatermark above this.")
@click.option("--min-side", type=click.IntRange(min=1), default=None, help="Drop images whose shorter side is below N px.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="DuckDB/matcher threads (default: all cores).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
def retrieve(**options) -> None:
    """Find captions naming the task's classes in LAION-style parquet metadata.

    \b
    Example (LAION-2B-en metadata, 128 parquet files):
      curate retrieve --task fgvc-aircraft --metadata 'laion2B-en/*.parquet' --out aircraft-candidates
    """
    from curate.retrieve import retrieve as run_retrieve

    result = run_retrieve(**options)
    click.echo(result.summary())


# ---------------------------------------------------------------- export
@cli.command(context_settings=CONTEXT)
@click.option("--manifest", "-m", required=True, type=click.Path(), help="manifest.parquet (or its folder).")
@click.option("--format", "fmt", required=True, help="img2dataset | csv | jsonl | webdataset | imagefolder")
@click.option("--out", "-o", required=True, type=click.Path(), help="Output folder.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
def export(manifest: str, fmt: str, out: str, overwrite: bool) -> None:
    """Write a manifest in another format: img2dataset input, CSV, JSONL, webdataset, ImageFolder.

    \b
    Example:
      curate export --manifest aircraft-candidates/manifest.parquet --format img2dataset --out to-download
    """
    from manifests.export import export_manifest

    click.echo(export_manifest(manifest=manifest, fmt=fmt, out=out, overwrite=overwrite))


# ---------------------------------------------------------------- finetune-and-probe
from train.cli import cli as _finetune_and_probe  # noqa: E402  (imports click only; torch loads when it runs)

cli.add_command(_finetune_and_probe, "finetune-and-probe")


# ---------------------------------------------------------------- demo
@cli.command(context_settings=CONTEXT)
@click.option("--out", "-o", type=click.Path(), default=None, help="Folder for the demo run (default: a temp folder).")
@click.option("--rows", type=click.IntRange(min=100), default=20000, show_default=True, help="Rows of sample metadata.")
@click.option("--overwrite", is_flag=True, help="Replace an existing demo folder.")
def demo(out: str | None, rows: int, overwrite: bool) -> None:
    """Run the pipeline end to end on an embedded offline sample (no network, no downloads).

    \b
    Example:
      curate demo --out demo-run
    """
    from curate.demo import run_demo

    run_demo(out=out, rows=rows, overwrite=overwrite, echo=click.echo)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
