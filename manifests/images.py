"""Reading the images of an image-bearing manifest, in one place (DESIGN §4).

A row holds its image either as a file, `image_path` (relative to the manifest's folder), or as a
member of a webdataset tar, `shard` (the tar, relative to the manifest's folder) + `key` (the
sample key; the image is the member `<key>.<ext>` with an image extension). Exporters, the CLIP
filter and finetuning all read images through `iter_images` / `read_image` / `open_image`.
"""

from __future__ import annotations

import functools
import io
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from curate.errors import CurateError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
IMAGE_SUFFIXES = tuple(f".{ext}" for ext in IMAGE_EXTENSIONS)
_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')
NO_IMAGES = "manifest has no images: run curate download first"


def safe_name(name: str, max_bytes: int = 200) -> str:
    """`name` usable as one path component: separators, reserved and control characters become '_'.

    The ImageFolder exporter names class folders with it, and finetune-and-probe reads eval folders by it.
    """
    safe = _UNSAFE.sub("_", name).strip(" .")
    return safe.encode("utf-8")[:max_bytes].decode("utf-8", "ignore").rstrip(" .")


def image_layout(table: pa.Table) -> str:
    """'files' (rows have `image_path`) or 'webdataset' (`shard` + `key`); CurateError if neither."""
    names = set(table.column_names)
    if "image_path" in names:
        return "files"
    if {"shard", "key"} <= names:
        return "webdataset"
    raise CurateError(NO_IMAGES)


class ImageRowsView:
    """uid + image location of every row (what `open_image` needs), in manifest order: `rows[i]` is row i's dict.

    The columns stay Arrow arrays and a dict is built per access: a list of row dicts costs ~400 B a row,
    and DataLoader workers would copy its pages as they touch the objects' reference counts.
    """

    def __init__(self, table: pa.Table):
        location = ["image_path"] if image_layout(table) == "files" else ["shard", "key"]
        self._columns = {name: _one_array(table.column(name)) for name in ["uid", *location]}
        self._length = table.num_rows

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self._length:
            raise IndexError(index)
        return {name: column[index].as_py() for name, column in self._columns.items()}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[index] for index in range(self._length))


def _one_array(column: pa.ChunkedArray) -> pa.Array:
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def image_rows(table: pa.Table) -> ImageRowsView:
    """uid + image location of every row (what `open_image` needs), in manifest order."""
    return ImageRowsView(table)


def rebase_images(table: pa.Table, from_dir: str | os.PathLike, to_dir: str | os.PathLike) -> pa.Table:
    """Rewrite `image_path` / `shard` (relative to `from_dir`) to be relative to `to_dir`.

    A stage that writes a derived manifest into another folder without copying the images
    (filter, for one) calls this so the new manifest still finds them.
    """
    prefix = os.path.relpath(Path(from_dir).resolve(), Path(to_dir).resolve())
    for name in ("image_path", "shard"):
        if name in table.column_names:
            table = table.set_column(table.schema.get_field_index(name), name, _rebased(table.column(name), prefix))
    return table


# a path that joining to a normalised prefix would leave unnormalised: absolute, '//', a '.' or '..' part, a final '/'
_NOT_PLAIN = r"^/|//|(^|/)\.\.?(/|$)|/$"


def _rebased(values: pa.ChunkedArray, prefix: str) -> pa.Array:
    """`prefix`/value, normalised, for each relative value; absolute, empty ("": no image) and null ones as they
    are. Plain paths (what stages write) are joined by Arrow; the few others by os.path, one at a time."""
    values = values.combine_chunks().cast(pa.string())
    present = pc.fill_null(pc.greater(pc.binary_length(values), 0), False)
    odd = pc.and_(present, pc.match_substring_regex(values, _NOT_PLAIN)).fill_null(False)
    joined = values if prefix == "." else pc.binary_join_element_wise(prefix, values, "/")
    rebased = pc.if_else(pc.and_(present, pc.invert(odd)), joined, values)
    if not pc.any(odd).as_py():
        return rebased
    odd_values = values.filter(odd).to_pylist()
    fixed = [v if os.path.isabs(v) else os.path.normpath(os.path.join(prefix, v)) for v in odd_values]
    return pc.replace_with_mask(rebased, odd, pa.array(fixed, pa.string()))


def image_folders(table: pa.Table, manifest_dir: str | os.PathLike) -> Iterator[Path]:
    """The folders holding the manifest's image files and shards, each once (lazily: only asked for when an
    output is about to replace a folder that might hold them)."""
    seen: set[str] = set()
    for name in ("image_path", "shard"):
        if name in table.column_names:
            for value in pc.unique(table.column(name)).to_pylist():
                folder = os.path.dirname(os.path.normpath(os.path.join(manifest_dir, value))) if value else None
                if folder is not None and folder not in seen:
                    seen.add(folder)
                    yield Path(folder)


def has_images(table: pa.Table) -> bool:
    """True if the manifest carries image locations (image_path, or shard + key)."""
    try:
        image_layout(table)
    except CurateError:
        return False
    return True


def read_image(row: dict[str, Any], manifest_dir: str | os.PathLike) -> tuple[bytes, str]:
    """The stored bytes of one row's image and its extension ('jpg', 'png', ...), as stored."""
    if row.get("image_path"):
        path = _stored_file(row, manifest_dir)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CurateError(f"cannot read image of row {row.get('uid')}: {path}: {exc.strerror}") from None
        return data, path.suffix.lstrip(".").lower()
    if row.get("shard") and row.get("key") is not None:
        return _read_tar_member(_stored_file(row, manifest_dir), str(row["key"]), row.get("uid"))
    raise CurateError(f"row {row.get('uid')} has no image (no image_path, no shard/key): run curate download first")


def open_image(row: dict[str, Any], manifest_dir: str | os.PathLike, mode: str | None = "RGB"):
    """One row's image as a PIL image (converted to `mode` unless None)."""
    from PIL import Image, UnidentifiedImageError

    data, _ = read_image(row, manifest_dir)
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except UnidentifiedImageError:
        raise CurateError(f"cannot decode image of row {row.get('uid')}: {_location(row, manifest_dir)} is not an image format "
                          "Pillow reads") from None
    except (OSError, Image.DecompressionBombError) as exc:  # the bomb error (over 2x MAX_IMAGE_PIXELS) is no OSError
        raise CurateError(f"cannot decode image of row {row.get('uid')}: {_location(row, manifest_dir)}: {exc}") from None
    image = _eight_bit(image) if mode else image
    return image.convert(mode) if mode and image.mode != mode else image


def _eight_bit(image):
    """16-bit and float grey as 8-bit grey: Pillow's convert clips them (a 16-bit PNG turns white, a 0..1
    float TIFF black) instead of scaling."""
    from PIL import Image

    if not (image.mode.startswith("I") or image.mode == "F"):
        return image
    import numpy as np

    pixels = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and pixels.max(initial=0) > 255):
        pixels = pixels / 257  # 0..65535 -> 0..255
    elif image.mode == "F" and pixels.max(initial=0) <= 1:
        pixels = pixels * 255
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L")


def _stored_file(row: dict[str, Any], manifest_dir: str | os.PathLike) -> Path:
    """The file holding a row's image: the image itself, or its webdataset tar (both relative to the manifest)."""
    return Path(manifest_dir) / (row.get("image_path") or row["shard"])


def _location(row: dict[str, Any], manifest_dir: str | os.PathLike) -> str:
    """Where a row's image is, for a message: its file, or tar:key."""
    return str(_stored_file(row, manifest_dir)) + ("" if row.get("image_path") else f":{row['key']}")


def iter_images(
    table: pa.Table, manifest_dir: str | os.PathLike, batch_size: int = 1024
) -> Iterator[tuple[dict[str, Any], bytes, str]]:
    """Yield (row, image bytes, extension) for every row, in manifest order.

    Raises CurateError if the manifest has no image columns or a row's image is missing.
    """
    image_layout(table)
    for batch in table.to_batches(max_chunksize=batch_size):
        for row in batch.to_pylist():
            data, ext = read_image(row, manifest_dir)
            yield row, data, ext


def _read_tar_member(shard: Path, key: str, uid: Any) -> tuple[bytes, str]:
    try:
        stat = shard.stat()
    except OSError:
        raise CurateError(f"cannot read image of row {uid}: shard {shard} not found") from None
    members = _tar_index(str(shard), stat.st_mtime_ns, stat.st_size).get(key)
    if not members:
        raise CurateError(f"cannot read image of row {uid}: no image for key '{key}' in {shard}")
    ext, offset, size = members[0]
    with open(shard, "rb") as handle:
        handle.seek(offset)
        return handle.read(size), ext


@functools.lru_cache(maxsize=16)
def _tar_index(path: str, mtime_ns: int, size: int) -> dict[str, list[tuple[str, int, int]]]:
    """key -> [(image extension, data offset, size)] of a webdataset tar (cached per file version)."""
    index: dict[str, list[tuple[str, int, int]]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if dot and ext.lower() in IMAGE_EXTENSIONS:
                    key = f"{folder}/{stem}" if folder else stem
                    index.setdefault(key, []).append((ext.lower(), member.offset_data, member.size))
    except (tarfile.TarError, OSError) as exc:
        raise CurateError(f"cannot read webdataset shard {path}: {exc}") from None
    return index
