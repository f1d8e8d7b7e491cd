"""The `finetune-and-probe` command (also `curate finetune-and-probe`): parses options, calls finetune_and_probe."""

from __future__ import annotations

import sys

import click

from curate.choices import KEEP_CHECKPOINTS, MIX_MODES, PRECISIONS, SELECT_BY
from curate.console import CONTEXT, Command, configure_logging, stop_cleanly_on_sigterm
from curate.models import DEFAULT_CLIP


@click.command("finetune-and-probe", cls=Command, context_settings=CONTEXT)
@click.option("--train", "-t", "train", multiple=True, type=click.Path(), help="Train manifest (or its folder); repeatable.")
@click.option("--mix", default=None, help="Mixing weights, one per --train manifest, e.g. 0.9,0.1.")
@click.option("--mix-mode", type=click.Choice(MIX_MODES), default="data", show_default=True,
              help="data: one stream sampled by weight (MixData); loss: per-source batches, summed losses (MixLoss).")
@click.option("--eval-task", required=True, help="Builtin task name or task file: class names and templates.")
@click.option("--eval-data", required=True, type=click.Path(), help="ImageFolder root: {train,val,test}/<class name>/*.")
@click.option("--out", "-o", required=True, type=click.Path(), help="Run folder (report.json, epochs.jsonl, checkpoints/).")
@click.option("--model", default=DEFAULT_CLIP[0], show_default=True, help="open_clip architecture, model folder, or tiny-clip.")
@click.option("--pretrained", default=None, help="open_clip tag or checkpoint path (default: the registry's default).")
@click.option("--epochs", type=int, default=30, show_default=True)
@click.option("--lr", type=float, default=1e-5, show_default=True)
@click.option("--batch-size", type=int, default=512, show_default=True)
@click.option("--wd", type=float, default=0.1, show_default=True, help="AdamW weight decay (none on norms, biases, scale).")
@click.option("--warmup", type=int, default=500, show_default=True, help="Linear warmup steps before the cosine decay.")
@click.option("--freeze-blocks", type=int, default=0, show_default=True,
              help="Freeze the first N layers (stem = 1, each block, head) and train the rest.")
@click.option("--reinit/--no-reinit", default=True, show_default=True,
              help="With --freeze-blocks N > 0: re-initialise the unfrozen layers (seed 001) or keep their weights.")
@click.option("--init-from", type=click.Path(), default=None, help="Start from a checkpoint of an earlier run (RealTune).")
@click.option("--train-fraction", type=float, default=1.0, show_default=True, help="Keep this fraction of every class.")
@click.option("--eval-only", is_flag=True, help="Evaluate the model without training.")
@click.option("--select-by", type=click.Choice(list(SELECT_BY)), default="linear_probe",
              show_default=True, help="Val metric that picks the best epoch.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True, help="Data loader processes.")
@click.option("--accum-steps", type=click.IntRange(min=1), default=None, help="Micro-batches per step (default: auto).")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="auto: bf16 (or fp16) autocast on CUDA, fp32 on CPU.")
@click.option("--compile/--no-compile", "compile_", default=None, help="torch.compile the model (default: on CUDA).")
@click.option("--keep-checkpoints", type=click.Choice(KEEP_CHECKPOINTS), default="last", show_default=True,
              help="last: best.pt + last.pt; all: also epoch_K.pt for every epoch.")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing run folder (an interrupted run of the same settings and inputs is resumed).")
@click.option("--no-resume", is_flag=True, help="Refuse to continue an interrupted run in --out.")
def cli(compile_: bool | None, no_resume: bool, **options) -> None:
    """Finetune CLIP's image encoder on manifests; report zero-shot, head and linear-probe accuracy.

    \b
    Example (seed 004: retrieved images for FGVC-Aircraft, eval on the benchmark's folders):
      finetune-and-probe --train aircraft-images/manifest.parquet --eval-task fgvc-aircraft \\
        --eval-data data/fgvc-aircraft --model ViT-B-16 --pretrained laion2b_s34b_b88k --out runs/aircraft
    \b
    Example (offline, builtin tiny model, a few epochs on CPU):
      finetune-and-probe --train demo-run/downloaded --eval-task demo --eval-data demo-run/eval \\
        --model tiny-clip --epochs 3 --lr 1e-3 --batch-size 32 --warmup 0 --out demo-run/my-finetune
    """
    from train.finetune import finetune_and_probe

    result = finetune_and_probe(**options, compile="auto" if compile_ is None else compile_, resume=not no_resume)
    click.echo(result.summary())


def main() -> None:
    configure_logging()  # under `curate finetune-and-probe` the curate group has done this (with its -v)
    with stop_cleanly_on_sigterm():
        cli(prog_name="finetune-and-probe")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
