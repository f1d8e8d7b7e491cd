"""Column names and Arrow types of the manifest, in one place (DESIGN §4).

A manifest is a parquet table, one row per image (or per candidate before download).
Required columns come first, then the optional ones in the order below; columns the
schema does not know are carried through unchanged, after the known ones.
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc

from curate.errors import CurateError

SOURCES = ("retrieved", "synthetic", "real")

REQUIRED_COLUMNS: dict[str, pa.DataType] = {
    "uid": pa.string(),
    "label": pa.int32(),
    "class_name": pa.string(),
    "source": pa.string(),
    "caption": pa.string(),
}

OPTIONAL_COLUMNS: dict[str, pa.DataType] = {
    # retrieved rows
    "url": pa.string(),
    "matched_text": pa.string(),
    "width": pa.int32(),
    "height": pa.int32(),
    "laion_similarity": pa.float64(),
    "punsafe": pa.float32(),
    "pwatermark": pa.float32(),
    "hash": pa.int64(),
    "source_uid": pa.string(),
    # image-bearing rows
    "image_path": pa.string(),
    "shard": pa.string(),
    "key": pa.string(),
    "sha256": pa.string(),  # of the bytes as downloaded (img2dataset), before resizing
    "image_width": pa.int32(),  # of the image as stored (after resizing)
    "image_height": pa.int32(),
    # scored rows
    "clip_score": pa.float32(),
    # synthetic rows
    "prompt_type": pa.string(),
    "generator": pa.string(),
    "guidance_scale": pa.float32(),
    "steps": pa.int32(),
    "seed": pa.int64(),
}

COLUMNS: dict[str, pa.DataType] = {**REQUIRED_COLUMNS, **OPTIONAL_COLUMNS}
IMAGE_LOCATION_COLUMNS = ("image_path", "shard", "key")  # where a row's image is: a file, or a webdataset sample
IMAGE_COLUMNS = (*IMAGE_LOCATION_COLUMNS, "sha256", "image_width", "image_height")  # what a download writes


def conform(table: pa.Table) -> pa.Table:
    """Cast known columns to their schema type and order them: required, optional, then extras."""
    known = [name for name in COLUMNS if name in table.column_names]
    extras = [name for name in table.column_names if name not in COLUMNS]
    arrays, fields = [], []
    for name in known + extras:
        column = table.column(name)
        wanted = COLUMNS.get(name, column.type)
        if column.type != wanted:
            try:
                column = column.cast(wanted)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise CurateError(f"manifest column '{name}' cannot be read as {wanted}: {exc}") from None
        arrays.append(column)
        fields.append(pa.field(name, wanted))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def validate(table: pa.Table, where: str = "manifest") -> pa.Table:
    """Check the required columns and values; return the conformed table or raise CurateError."""
    missing = [name for name in REQUIRED_COLUMNS if name not in table.column_names]
    if missing:
        raise CurateError(f"{where} is missing required column(s): {', '.join(missing)}")
    table = conform(table)
    for name in ("uid", "label", "class_name", "source"):
        if table.column(name).null_count:
            raise CurateError(f"{where} has empty values in column '{name}'")
    if pc.any(pc.equal(pc.utf8_trim_whitespace(table.column("uid")), "")).as_py():  # a key, a file name in exports
        raise CurateError(f"{where} has empty values in column 'uid'")
    labels = table.column("label")
    if len(labels) and pc.min(labels).as_py() < 0:
        raise CurateError(f"{where} has a negative label")
    unknown = set(pc.unique(table.column("source")).to_pylist()) - set(SOURCES)
    if unknown:
        raise CurateError(f"{where} has unknown source value(s) {sorted(unknown)}; expected one of {SOURCES}")
    return table


def manifest_schema(columns: Iterable[str]) -> pa.Schema:
    """The schema of a manifest with these (known) columns, in the manifest's column order."""
    wanted = set(columns)
    unknown = wanted - set(COLUMNS)
    if unknown:
        raise ValueError(f"not manifest columns: {sorted(unknown)}")
    return pa.schema([pa.field(name, kind) for name, kind in COLUMNS.items() if name in wanted])
