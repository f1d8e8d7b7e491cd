"""Exporters: a manifest written in the formats other tools read (DESIGN §4).

Each exporter is `fn(table, manifest_dir, out_dir) -> list[str]` (the files written) and is
registered in EXPORTERS by name; `export_manifest` stages the output folder so a failed
export leaves nothing behind.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from curate.errors import CurateError
from manifests.io import read_manifest, staged_output_dir, write_report

Exporter = Callable[[pa.Table, Path, Path], list[str]]
IMG2DATASET_FILE = "img2dataset_input.parquet"


def export_img2dataset(table: pa.Table, manifest_dir: Path, out: Path) -> list[str]:
    """Parquet with `url` and `caption`; every other column rides along as an additional column."""
    if "url" not in table.column_names:
        raise CurateError("img2dataset export needs a 'url' column (a retrieved manifest)")
    extra = [c for c in table.column_names if c not in ("url", "caption")]
    pq.write_table(table.select(["url", "caption", *extra]), out / IMG2DATASET_FILE)
    command = (
        f"img2dataset --url_list {out / IMG2DATASET_FILE} --input_format parquet --url_col url "
        f"--caption_col caption --save_additional_columns '{json.dumps(extra)}' --output_folder images "
        "--output_format files --image_size 256"
    )
    (out / "img2dataset_command.txt").write_text(command + "\n", encoding="utf-8")
    return [IMG2DATASET_FILE, "img2dataset_command.txt"]


def export_csv(table: pa.Table, manifest_dir: Path, out: Path) -> list[str]:
    pa_csv.write_csv(table, out / "manifest.csv")
    return ["manifest.csv"]


def export_jsonl(table: pa.Table, manifest_dir: Path, out: Path) -> list[str]:
    with open(out / "manifest.jsonl", "w", encoding="utf-8") as handle:
        for batch in table.to_batches(max_chunksize=10_000):
            for row in batch.to_pylist():
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return ["manifest.jsonl"]


EXPORTERS: dict[str, Exporter] = {
    "img2dataset": export_img2dataset,
    "csv": export_csv,
    "jsonl": export_jsonl,
}


def export_manifest(manifest: str | Path, fmt: str, out: str | Path, overwrite: bool = False) -> str:
    """Export a manifest to `out` in format `fmt`; returns a one-line summary."""
    if fmt not in EXPORTERS:
        raise CurateError(f"unknown export format '{fmt}'; choose one of {', '.join(sorted(EXPORTERS))}")
    manifest = Path(manifest)
    table = read_manifest(manifest)
    manifest_dir = manifest if manifest.is_dir() else manifest.parent
    with staged_output_dir(out, overwrite=overwrite) as staging:
        files = EXPORTERS[fmt](table, manifest_dir, staging)
        write_report(staging, {"stage": "export", "format": fmt, "manifest": str(manifest), "rows": table.num_rows, "files": files})
    return f"exported {table.num_rows} rows as {fmt} to {out}: {', '.join(files)}"
