"""The finetune step of `curate demo`: tiny CLIP, a few CPU epochs, probed on a generated shape world."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from curate.console import format_command
from train.finetune import FinetuneResult, finetune_and_probe
from train.synthetic_world import write_eval_folder


def demo_eval_folder(out: str | Path, class_names: list[str], per_class: int = 12) -> Path:
    """OUT/eval: an ImageFolder (train/val/test) of drawn shapes for the demo's classes."""
    return Path(write_eval_folder(Path(out) / "eval", class_names, per_class=per_class, seed=1))


def demo_finetune(
    manifests: list[str | Path],
    out: str | Path,
    eval_task: str | None = None,
    eval_data: str | Path | None = None,
    eval_per_class: int = 12,
    epochs: int = 3,
    overwrite: bool = True,
    echo: Callable[[str], None] = print,
) -> FinetuneResult:
    """Finetune tiny-clip on the demo's curated manifest(s) and probe it on the task's shapes.

    `eval_task` defaults to the builtin demo task's file. Without `eval_data`, an eval ImageFolder of drawn
    shapes for the task's classes is written to OUT/eval first; the run itself goes to OUT/finetune.
    """
    from curate.tasks import builtin_task_file, load_task

    out = Path(out)
    eval_task = eval_task or str(builtin_task_file("demo"))
    task = load_task(eval_task)
    if eval_data is None:
        eval_data = demo_eval_folder(out, task.class_names, per_class=eval_per_class)
    options = {"train": [str(m) for m in manifests], "eval_task": eval_task, "eval_data": str(eval_data), "out": str(out / "finetune"), "model": "tiny-clip",
               "epochs": epochs, "lr": 1e-3, "batch_size": 32, "warmup": 0, "workers": 0, "device": "cpu", "overwrite": overwrite}
    echo(format_command("finetune-and-probe", options))
    result = finetune_and_probe(**options)
    echo(result.summary())
    return result
