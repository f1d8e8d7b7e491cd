"""Shared helpers for the train/ tests: a small learnable shape world and manifest writers."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from manifests.io import write_manifest

CLASSES = ("red circle", "green square", "blue triangle", "yellow star", "purple cross")
SMALL = {"model": "tiny-clip", "lr": 1e-3, "batch_size": 32, "warmup": 0, "workers": 0, "device": "cpu"}


def write_rows(folder: Path, rows: list[dict], image_from: Path | None = None) -> Path:
    """A manifest from row dicts (uid, label, class_name, source, caption, image_path)."""
    folder.mkdir(parents=True, exist_ok=True)
    columns = {key: [row[key] for row in rows] for key in (rows[0] if rows else ["uid", "label", "class_name", "source", "caption"])}
    if not rows:
        columns = {"uid": [], "label": [], "class_name": [], "source": [], "caption": [], "image_path": []}
    table = pa.table({**columns, "label": pa.array(columns["label"], pa.int32())})
    write_manifest(table, folder / "manifest.parquet")
    return folder / "manifest.parquet"
