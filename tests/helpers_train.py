"""Shared helpers for the train/ tests: the demo classes (train.synthetic_world's shape world), small training
settings and a manifest writer."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from manifests.io import write_manifest
from train.synthetic_world import DEMO_CLASSES

CLASSES = DEMO_CLASSES
SMALL = {"model": "tiny-clip", "lr": 1e-3, "batch_size": 32, "warmup": 0, "workers": 0, "device": "cpu"}


def write_rows(folder: Path, rows: list[dict]) -> Path:
    """A manifest from row dicts (uid, label, class_name, source, caption, image_path)."""
    folder.mkdir(parents=True, exist_ok=True)
    if rows:
        columns = {key: [row[key] for row in rows] for key in rows[0]}
    else:
        columns = {"uid": [], "label": [], "class_name": [], "source": [], "caption": [], "image_path": []}
    table = pa.table({**columns, "label": pa.array(columns["label"], pa.int32())})
    write_manifest(table, folder / "manifest.parquet")
    return folder / "manifest.parquet"
