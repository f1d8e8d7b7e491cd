"""Exporters: a manifest written in the formats other tools read (DESIGN §4).

Each exporter is `fn(table, manifest_dir, out_dir) -> list[str]` (the files written) and is
registered in EXPORTERS by name; `export_manifest` stages the output folder so a failed
export leaves nothing behind.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from curate.errors import CurateError
from manifests.images import iter_images, rebase_images, safe_name
from manifests.io import (
    MANIFEST_NAME,
    REPORT_NAME,
    UMASK,
    finite_json,
    input_task,
    manifest_dir,
    manifest_inputs,
    read_manifest,
    staged_output_dir,
    write_manifest,
    write_report,
)
from manifests.schema import IMAGE_LOCATION_COLUMNS

log = logging.getLogger(__name__)
Exporter = Callable[[pa.Table, Path, Path], list[str]]
IMG2DATASET_FILE = "img2dataset_input.parquet"
IMG2DATASET_SCRIPT = "img2dataset_command.sh"
# columns img2dataset writes itself and refuses in save_additional_columns (img2dataset/main.py)
IMG2DATASET_RESERVED = frozenset({"key", "caption", "url", "width", "height", "original_width", "original_height",
                                  "status", "error_message", "exif", "md5", "sha256", "sha512"})
SAMPLES_PER_TAR = 10_000
CLASSES_FILE = "classes.txt"
CLASSES_HEADER = "# label<TAB>class name<TAB>folder; in class names \\t \\n \\r \\\\ stand for a tab, line breaks, a backslash"


def export_img2dataset(table: pa.Table, manifest_dir: Path, out: Path) -> list[str]:
    """Parquet with `url` and `caption` first, every other column after them, and a script that runs
    img2dataset on it from wherever the export folder ends up, saving the columns img2dataset allows."""
    if "url" not in table.column_names:
        raise CurateError("img2dataset export needs a 'url' column (a retrieved manifest)")
    extra = [c for c in table.column_names if c not in ("url", "caption")]
    table = rebase_images(table, manifest_dir, out)
    pq.write_table(table.select(["url", "caption", *extra]), out / IMG2DATASET_FILE)
    saved = [c for c in extra if c not in IMG2DATASET_RESERVED]
    script = (
        "#!/bin/sh\n# Download the exported rows' images into ./images with img2dataset.\n"
        f'cd "$(dirname "$0")" && exec img2dataset --url_list {IMG2DATASET_FILE} --input_format parquet '
        f"--url_col url --caption_col caption --save_additional_columns {shlex.quote(json.dumps(saved))} "
        "--output_folder images --output_format files --image_size 256 \"$@\"\n"
    )
    (out / IMG2DATASET_SCRIPT).write_text(script, encoding="utf-8")
    (out / IMG2DATASET_SCRIPT).chmod(0o777 & ~UMASK)
    return [IMG2DATASET_FILE, IMG2DATASET_SCRIPT]


def export_csv(table: pa.Table, manifest_dir: Path, out: Path) -> list[str]:
    """Every column as it is (image paths relative to the export); those CSV has no cell for (lists, structs,
    bytes) as JSON text."""
    table = rebase_images(table, manifest_dir, out)
    for index, field in enumerate(table.schema):
        if not _csv_writes(field.type):
            cells = [_csv_cell(value) for value in table.column(index).to_pylist()]
            table = table.set_column(index, field.name, pa.array(cells, pa.string()))
    pa_csv.write_csv(table, out / "manifest.csv")
    return ["manifest.csv"]


def _csv_writes(kind: pa.DataType) -> bool:
    return not (pa.types.is_nested(kind) or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
                or pa.types.is_fixed_size_binary(kind))


def _csv_cell(value: Any) -> str | None:
    if value is None:
        return None
    return _json_value(value) if isinstance(value, bytes) else _json_text(value)


def _json_text(value: Any) -> str:
    return json.dumps(finite_json(value), ensure_ascii=False, default=_json_value, allow_nan=False)


def _json_value(value: Any) -> Any:
    """What JSON cannot hold as it is: bytes as base64 text, anything else (dates, decimals) as its text."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def export_jsonl(table: pa.Table, manifest_dir: Path, out: Path) -> list[str]:
    """One JSON object per row (image paths relative to the export)."""
    table = rebase_images(table, manifest_dir, out)
    with open(out / "manifest.jsonl", "w", encoding="utf-8") as handle:
        for batch in table.to_batches(max_chunksize=10_000):
            for row in batch.to_pylist():
                handle.write(_json_text(row) + "\n")
    return ["manifest.jsonl"]


def export_webdataset(table: pa.Table, manifest_dir: Path, out: Path) -> list[str]:
    """Tar shards (webdataset's ShardWriter, SAMPLES_PER_TAR per tar): per sample `__key__` = uid,
    the image bytes under their extension (as stored), `cls` = label, `txt` = caption and `json` =
    the row's other columns (uid and class_name included)."""
    import webdataset as wds

    pattern = str(out).replace("%", "%%") + "/shard-%06d.tar"
    keys: set[str] = set()
    located: dict[str, list] = {"shard": [], "key": []}
    # a fixed member time: the same manifest exports to the same bytes (tar members carry the time otherwise)
    with wds.ShardWriter(pattern, maxcount=SAMPLES_PER_TAR, verbose=0, mtime=0) as sink:
        for row, data, ext in iter_images(table, manifest_dir):
            key = _unique(_stem(row, keep_dots=False), keys, row)
            meta = {k: v for k, v in row.items() if k not in ("label", "caption", *IMAGE_LOCATION_COLUMNS)}
            sample = {"__key__": key, ext: data, "cls": row["label"], "txt": row["caption"] or ""}
            sink.write({**sample, "json": _json_text(meta).encode("utf-8")})
            located["shard"].append(Path(sink.fname).name)
            located["key"].append(key)
    _write_relocated(table, out, located)
    return [*sorted(path.name for path in out.glob("shard-*.tar")), MANIFEST_NAME]


def export_imagefolder(table: pa.Table, manifest_dir: Path, out: Path) -> list[str]:
    """OUT/<class folder>/<uid>.<ext> with the image bytes as stored, and classes.txt
    (CLASSES_HEADER, then `label<TAB>class_name<TAB>folder` per class, by label; a backslash, tab or line break
    in a class name written as \\, \t, \n, \r). Folder names are the class names made safe for file systems; torchvision's
    ImageFolder numbers folders in sorted order, so map its indices back to labels through classes.txt."""
    folders = _class_folders(table)
    lines = [CLASSES_HEADER, *(f"{label}\t{_escaped(name)}\t{folder}" for (label, name), folder in sorted(folders.items()))]
    (out / CLASSES_FILE).write_text("".join(line + "\n" for line in lines), encoding="utf-8", newline="\n")
    for folder in folders.values():
        (out / folder).mkdir()
    written: set[str] = set()
    paths = []
    for row, data, ext in iter_images(table, manifest_dir):
        folder = folders[(row["label"], row["class_name"])]
        paths.append(_unique(f"{folder}/{_stem(row)}.{ext}", written, row))
        (out / paths[-1]).write_bytes(data)
    _write_relocated(table, out, {"image_path": paths})
    return [CLASSES_FILE, *sorted(f"{folder}/" for folder in folders.values()), MANIFEST_NAME]


def _write_relocated(table: pa.Table, out: Path, located: dict[str, list]) -> None:
    """OUT/manifest.parquet: the exported rows, their images found where the export put them, so the export is
    a dataset the next stage reads (finetune-and-probe --train OUT)."""
    kept = [name for name in table.column_names if name not in IMAGE_LOCATION_COLUMNS]
    columns = {name: table.column(name) for name in kept} | {name: pa.array(values, pa.string()) for name, values in located.items()}
    write_manifest(pa.table(columns), out / MANIFEST_NAME)


def read_class_folders(folder: Path) -> dict[str, str] | None:
    """Folder -> class name from export_imagefolder's classes.txt in `folder`; None without one, or when the
    file is not the exporter's (many data sets ship a classes.txt of their own)."""
    listing = folder / CLASSES_FILE
    if not listing.is_file():
        return None
    with open(listing, encoding="utf-8", newline="") as handle:  # lines end at \n only, as written (\r\n once copied)
        lines = [line.removesuffix("\r") for line in handle.read().split("\n")]
    escaped = lines[0] == CLASSES_HEADER  # exports before the header wrote names as they were
    rows = [line.split("\t") for line in lines[escaped:] if line]
    if not rows or any(len(row) != 3 or not row[0].isdigit() for row in rows):
        log.warning("%s is not a curate export's classes.txt (label, class name, folder): folders are read by name", listing)
        return None
    return {sub: _unescaped(name) if escaped else name for _, name, sub in rows}


_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNESCAPES = {escaped[1]: char for char, escaped in _ESCAPES.items()}


def _escaped(name: str) -> str:
    return re.sub(r"[\\\t\n\r]", lambda match: _ESCAPES[match.group()], name)


def _unescaped(name: str) -> str:
    return re.sub(r"\\([\\tnr])", lambda match: _UNESCAPES[match.group(1)], name)


def _class_folders(table: pa.Table) -> dict[tuple[int, str], str]:
    """(label, class_name) -> a file-system-safe folder name, distinct as the eval scanner compares folder names
    (curate.tasks.name_key: case aside and in one Unicode form, as macOS writes names)."""
    from curate.tasks import name_key

    pairs = table.select(["label", "class_name"]).group_by(["label", "class_name"]).aggregate([]).to_pylist()
    folders: dict[tuple[int, str], str] = {}
    taken = {name_key(name) for name in (CLASSES_FILE, MANIFEST_NAME, REPORT_NAME)}  # the export's own files
    for pair in sorted(pairs, key=lambda p: (p["label"], p["class_name"])):
        folder = safe_name(pair["class_name"]) or f"class_{pair['label']}"
        while name_key(folder) in taken:
            folder = f"{folder}_{pair['label']}"
        taken.add(name_key(folder))
        folders[(pair["label"], pair["class_name"])] = folder
    return folders


def _stem(row: dict, keep_dots: bool = True) -> str:
    """A row's exported file name (or webdataset key, which must hold no '.'): its uid made safe for file names."""
    uid = str(row["uid"])
    stem = safe_name(uid if keep_dots else uid.replace(".", "_"))
    if not stem:
        raise CurateError(f"uid {uid!r} leaves no exported name once characters unsafe in file names are replaced")
    return stem


def _unique(name: str, seen: set[str], row: dict) -> str:
    if name in seen:
        raise CurateError(f"two rows map to the exported name '{name}' (the second has uid {row['uid']!r}); names are uids "
                          "with '.' and characters unsafe in file names replaced, so uids must differ after that")
    seen.add(name)
    return name


EXPORTERS: dict[str, Exporter] = {
    "img2dataset": export_img2dataset,
    "csv": export_csv,
    "jsonl": export_jsonl,
    "webdataset": export_webdataset,
    "imagefolder": export_imagefolder,
}


def export_manifest(manifest: str | Path, fmt: str, out: str | Path, overwrite: bool = False) -> str:
    """Export a manifest to `out` in format `fmt`; returns a one-line summary."""
    if fmt not in EXPORTERS:
        raise CurateError(f"unknown export format '{fmt}'; choose one of {', '.join(sorted(EXPORTERS))}")
    manifest = Path(manifest)
    table = read_manifest(manifest)
    with staged_output_dir(out, overwrite=overwrite, inputs=manifest_inputs(manifest, table)) as staging:
        files = EXPORTERS[fmt](table, manifest_dir(manifest), staging)
        write_report(staging, {"stage": "export", "task": input_task(manifest), "format": fmt, "manifest": str(manifest), "rows": table.num_rows, "files": files})
    return f"exported {table.num_rows} rows as {fmt} to {out}: {', '.join(files)}"
