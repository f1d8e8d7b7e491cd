"""`curate demo`: the embedded offline default, end to end on generated data (no network, no downloads).

Steps: write a small LAION-schema sample whose captions name the demo task's classes, then retrieve
from it with the demo task and print the funnel. Each step writes its usual output folder under OUT,
so the demo doubles as a walk-through of the commands.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from curate.errors import CurateError
from curate.retrieve import retrieve
from curate.sample_metadata import write_laion_sample
from curate.tasks import load_task

DEMO_TASK = "demo"


def run_demo(out: str | Path | None = None, rows: int = 20000, overwrite: bool = False, echo: Callable[[str], None] = print) -> Path:
    """Run the offline pipeline into `out` (a new temp folder if None); returns the folder."""
    out = Path(out) if out else Path(tempfile.mkdtemp(prefix="curate-demo-"))
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CurateError(f"demo folder {out} is not empty (use --overwrite to replace its contents)")
    task = load_task(DEMO_TASK)
    echo(f"[1/2] writing {rows:,} rows of LAION-schema sample metadata to {out / 'metadata'}")
    write_laion_sample(out / "metadata", rows, task.class_names, plant_rate=0.02, files=2, seed=0)
    echo("[2/2] curate retrieve --task demo --metadata metadata/ --out retrieved")
    result = retrieve(task=task, metadata=[str(out / "metadata")], out=out / "retrieved", overwrite=True)
    echo(result.summary())
    echo(f"demo finished: outputs in {out}")
    return out
