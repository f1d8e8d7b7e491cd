"""The `curate` command group. Each command only parses its options and calls one stage function."""

from __future__ import annotations

import sys

import click

from curate.choices import (
    DATA_FOLDERS,
    ENCODE_FORMATS,
    FILTER_MODES,
    MATCH_MODES,
    MULTI_CLASS,
    RESIZE_MODES,
)
from curate.console import CONTEXT, Group, configure_logging, stop_cleanly_on_sigterm
from curate.models import DEFAULT_CLIP


@click.group("curate", cls=Group, context_settings=CONTEXT)
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.version_option(package_name="curate")
def cli(verbose: bool) -> None:
    """Curate targeted real (retrieved) or synthetic data to adapt CLIP to a classification task.

    \b
    Example, end to end on the embedded offline sample:
      curate demo --out demo-run
    """
    configure_logging(verbose)


def main() -> None:
    with stop_cleanly_on_sigterm():
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
        from curate.tasks import builtin_task, builtin_task_names

        for name in builtin_task_names():
            task = builtin_task(name)
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
@click.option("--match", "match_mode", type=click.Choice(MATCH_MODES), default="word", show_default=True)
@click.option("--multi-class", type=click.Choice(MULTI_CLASS), default="drop", show_default=True,
              help="What to do with a caption naming several classes.")
@click.option("--per-class-cap", type=click.IntRange(min=1), default=None, help="Keep at most N rows per class.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the per-class subset.")
@click.option("--url-col", default=None, help="URL column (default: detected, URL or url).")
@click.option("--caption-col", default=None, help="Caption column (default: detected, TEXT, text or caption).")
@click.option("--max-punsafe", type=click.FloatRange(0, 1), default=None, help="Drop rows with punsafe above this.")
@click.option("--max-pwatermark", type=click.FloatRange(0, 1), default=None, help="Drop rows with pwatermark above this.")
@click.option("--min-side", type=click.IntRange(min=1), default=None, help="Drop images whose shorter side is below N px.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Threads for the caption scan, the matcher and the read of matched rows' url and metadata (default: all cores).")
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


# ---------------------------------------------------------------- download
@cli.command(context_settings=CONTEXT)
@click.option("--manifest", "-m", required=True, type=click.Path(), help="Manifest with a url column (or its folder).")
@click.option("--out", "-o", required=True, type=click.Path(), help="Output folder (images, manifest.parquet, report.json).")
@click.option("--processes", type=click.IntRange(min=1), default=1, show_default=True, help="Download processes.")
@click.option("--threads", type=click.IntRange(min=1), default=16, show_default=True, help="Download threads per process.")
@click.option("--image-size", type=click.IntRange(min=1), default=256, show_default=True, help="Saved image size (px).")
@click.option("--resize-mode", type=click.Choice(RESIZE_MODES),
              default="border", show_default=True, help="img2dataset resize mode.")
@click.option("--encode-format", type=click.Choice(ENCODE_FORMATS), default="jpg", show_default=True,
              help="Format the images are saved in.")
@click.option("--output-format", type=click.Choice(list(DATA_FOLDERS)), default="files", show_default=True,
              help="files: OUT/images/<shard>/<key>.jpg; webdataset: OUT/shards/<shard>.tar")
@click.option("--samples-per-shard", type=click.IntRange(min=1), default=10000,
              show_default=True, help="Rows per img2dataset shard (the unit of resuming).")
@click.option("--timeout", type=click.IntRange(min=1), default=10, show_default=True, help="Seconds per URL.")
@click.option("--retries", type=click.IntRange(min=0), default=0, show_default=True, help="Retries per failed URL.")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Resume an interrupted download in OUT (the finished shards are kept).")
@click.option("--overwrite", is_flag=True, help="Delete an existing output folder first.")
def download(**options) -> None:
    """Download the images of a manifest with img2dataset; resumable.

    Re-running the same command after an interruption fetches only the unfinished shards.
    OUT/manifest.parquet lists the images that arrived, OUT/failed.parquet the rows that did not.

    \b
    Example:
      curate download --manifest aircraft-filtered/manifest.parquet --out aircraft-images --processes 4 --threads 64
    """
    from curate.download import download as run_download

    click.echo(run_download(**options).summary())


# ---------------------------------------------------------------- filter
@cli.command("filter", context_settings=CONTEXT)
@click.option("--task", "-t", required=True, help="Builtin task name or task file.")
@click.option("--manifest", "-m", required=True, type=click.Path(), help="manifest.parquet (or its folder) to score.")
@click.option("--out", "-o", required=True, type=click.Path(), help="Output folder (manifest.parquet + report.json).")
@click.option("--embeddings", type=click.Path(), default=None,
              help="clip-retrieval folder (img_emb/ + metadata/) of precomputed image embeddings; "
                   "default: read the manifest's images.")
@click.option("--clip-model", default=DEFAULT_CLIP[0], show_default=True, help="open_clip architecture, model folder or tiny-clip.")
@click.option("--clip-pretrained", default=None,
              help=f"open_clip tag or checkpoint path (default: {DEFAULT_CLIP[1]} for {DEFAULT_CLIP[0]}, none for tiny-*).")
@click.option("--threshold", type=float, default=None, show_default="0.2", help="Keep rows with score >= this, in [-1, 1].")
@click.option("--percentile", type=float, default=None, help="Instead keep the top P% of each class (0 < P <= 100).")
@click.option("--mode", type=click.Choice(FILTER_MODES), default="domain", show_default=True,
              help="Score against the task's domain texts (max) or the row's class text (templates averaged).")
@click.option("--per-class-cap", type=int, default=None, help="Then keep at most N rows per class, best first.")
@click.option("--decontaminate", "decontaminate", type=click.Path(), default=None,
              help="Eval image folder: drop near-duplicates of its images (phash, CLIP) and inside the kept set.")
@click.option("--phash-distance", type=int, default=None, show_default="4", help="Decontamination: max phash Hamming distance.")
@click.option("--cosine-threshold", type=float, default=None, show_default="0.95",
              help="Decontamination: min CLIP cosine of a near-duplicate.")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True, help="Image decoding processes.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the tie-break for --percentile/--per-class-cap.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
def filter_command(**options) -> None:
    """Score rows with CLIP against the task (seed 004: keep score >= 0.2) and optionally decontaminate.

    Resumable: a killed run's image scores wait in .OUT.filter-scores/ beside OUT, and the same command run
    again scores only the rest.

    \b
    Example (downloaded images, protocol defaults: ViT-B-16 laion2b_s34b_b88k, domain texts, 0.2):
      curate filter --task fgvc-aircraft --manifest aircraft-images/manifest.parquet --out aircraft-filtered \\
        --decontaminate eval/fgvc-aircraft
    Example (precomputed LAION embeddings, before downloading; top 30% per class):
      curate filter --task flowers102 --manifest flower-candidates --embeddings laion-emb/ --percentile 30 --out f30
    """
    from curate.filter import filter_images

    result = filter_images(**options)
    click.echo(result.summary())



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
