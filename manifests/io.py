"""Reading and writing manifests and reports, atomically (write to a temp path, rename at the end)."""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curate.errors import CurateError
from manifests.schema import REQUIRED_COLUMNS, manifest_schema, validate

MANIFEST_NAME = "manifest.parquet"
REPORT_NAME = "report.json"
ROW_GROUP_ROWS = 64 * 1024  # rows per row group of a manifest written piece by piece
STAGING_INFIX, ASIDE_INFIX = ".partial-", ".replaced-"  # hidden folders beside an output: `.OUT.partial-*`, ...
LEFTOVER_MARK = ".curate-leftover"  # in such a folder while a run holds it: it is ours, to clear up after a kill
log = logging.getLogger(__name__)

def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: done once, at import, before any thread runs
    os.umask(mask)
    return mask


UMASK = _read_umask()
_VERSIONED_PACKAGES = ("curate", "duckdb", "pyarrow", "hyperscan", "torch", "open_clip_torch", "img2dataset", "diffusers")


def manifest_dir(path: str | os.PathLike) -> Path:
    """The folder of a manifest given as its parquet file or as the folder holding manifest.parquet."""
    path = Path(path)
    return path if path.is_dir() else path.parent


def read_manifest(path: str | os.PathLike, columns: Iterable[str] | None = None) -> pa.Table:
    """Read and validate a manifest parquet file (or a folder holding manifest.parquet).

    With `columns`, only the required columns and those of `columns` that the file has are read."""
    path = manifest_file(path)
    try:
        with pq.ParquetFile(path) as file:
            table = file.read(columns=_columns_to_read(file, columns))
    except (pa.ArrowInvalid, OSError) as exc:
        raise CurateError(f"cannot read manifest {path}: {exc}") from None
    return validate(table, where=f"manifest {path}")


def iter_manifest(path: str | os.PathLike, columns: Iterable[str] | None = None, check: bool = True) -> Iterator[pa.Table]:
    """A manifest one row group at a time, each validated (for rows that need not all be in memory);
    `columns` as in read_manifest. With check=False (a stage reading back a file it wrote itself), exactly
    `columns` are read and nothing is validated again."""
    path = manifest_file(path)
    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise CurateError(f"cannot read manifest {path}: {exc}") from None
    with file:
        read = _columns_to_read(file, columns) if check else (None if columns is None else list(columns))
        for group in range(file.num_row_groups):
            table = file.read_row_group(group, columns=read)
            yield validate(table, where=f"manifest {path}") if check else table


def manifest_file(path: str | os.PathLike) -> Path:
    """The parquet file of a manifest given as the file or its folder; CurateError if there is none."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.exists():
        raise CurateError(f"manifest not found: {path}")
    return path


def manifest_stamp(path: str | os.PathLike) -> dict[str, Any]:
    """Which manifest file, and which version of it (size and time written): what a resumable stage's fingerprint
    holds so that a rerun notices a manifest rewritten under the same name."""
    file = manifest_file(path).resolve()
    stat = file.stat()
    return {"manifest": str(file), "manifest_bytes": stat.st_size, "manifest_mtime_ns": stat.st_mtime_ns}


def _columns_to_read(file: pq.ParquetFile, columns: Iterable[str] | None) -> list[str] | None:
    if columns is None:
        return None
    present = set(file.schema_arrow.names)
    return [name for name in dict.fromkeys([*REQUIRED_COLUMNS, *columns]) if name in present]


def write_manifest(table: pa.Table, path: str | os.PathLike) -> pa.Table:
    """Validate and write a whole manifest atomically (through ManifestWriter); returns the conformed table."""
    table = validate(table)
    with ManifestWriter(path, table.schema) as writer:
        writer._append(table)  # validated just above
    return table


class ManifestWriter:
    """A manifest written piece by piece, for a stage whose rows need not all be in memory at once.

    Each piece is validated and conformed to `columns` (names of known manifest columns, or a schema);
    a column a piece lacks is NULL there, one the writer was not opened with is an error. Rows go out in
    row groups of `row_group_rows` (default ROW_GROUP_ROWS) whatever the pieces' sizes, so the bytes depend
    only on the rows. The file appears at `path` when the writer is closed, and never if the block raised.
    """

    def __init__(self, path: str | os.PathLike, columns: Iterable[str] | pa.Schema, row_group_rows: int | None = None):
        self.path = Path(path)
        self.schema = columns if isinstance(columns, pa.Schema) else manifest_schema(columns)
        self.rows = 0
        self._row_group_rows = row_group_rows or ROW_GROUP_ROWS
        self._held: list[pa.Table] = []
        self._held_rows = 0
        self._tmp = _temp_beside(self.path)
        try:
            self._writer = pq.ParquetWriter(self._tmp, self.schema, compression="zstd")
        except BaseException:
            os.unlink(self._tmp)
            raise

    def write(self, table: pa.Table) -> None:
        extra = [name for name in table.column_names if name not in self.schema.names]
        if extra:
            raise CurateError(f"manifest piece has column(s) the writer was not opened with: {', '.join(extra)}")
        missing = {name: pa.nulls(table.num_rows, self.schema.field(name).type)
                   for name in self.schema.names if name not in table.column_names}
        for name, column in missing.items():
            table = table.append_column(name, column)
        self._append(validate(table))

    def _append(self, conformed: pa.Table) -> None:
        table = conformed.select(self.schema.names).cast(self.schema)
        self._held.append(table)
        self._held_rows += table.num_rows
        self.rows += table.num_rows
        if self._held_rows >= self._row_group_rows:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self._held:
            return
        held = pa.concat_tables(self._held)
        whole = held.num_rows if final else held.num_rows - held.num_rows % self._row_group_rows
        if whole:
            self._writer.write_table(held.slice(0, whole), row_group_size=self._row_group_rows)
        self._held = [held.slice(whole)]
        self._held_rows = held.num_rows - whole

    def close(self) -> None:
        try:
            self._flush(final=True)
            self._writer.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            self._discard()
            raise

    def _discard(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._discard()


def finite_json(value: Any) -> Any:
    """NaN and infinities as None: JSON has no literal for them (JSON.parse and strict readers refuse `NaN`)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [finite_json(item) for item in value]
    return value


def write_json(data: dict[str, Any], path: str | os.PathLike) -> None:
    """Write JSON atomically, pretty-printed, keys in insertion order; NaN and infinities as null."""
    text = json.dumps(finite_json(data), indent=2, default=_json_default) + "\n"
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_report(out_dir: str | os.PathLike, report: dict[str, Any]) -> dict[str, Any]:
    """Write OUT/report.json with the command line and package versions added in front."""
    full = {"command": command_line(), "versions": package_versions(), **report}
    write_json(full, Path(out_dir) / REPORT_NAME)
    return full


def report_file(location: str | os.PathLike) -> Path:
    """The report file of a stage's output folder, or `location` itself if it names a report file."""
    path = Path(location)
    return path / REPORT_NAME if path.is_dir() else path


def read_report(location: str | os.PathLike) -> dict[str, Any]:
    """A stage's report: from its output folder, or from a report file named directly."""
    return json.loads(report_file(location).read_text(encoding="utf-8"))


def read_saved(path: str | os.PathLike) -> dict[str, Any] | None:
    """A JSON object a run saved (its settings, state or report); None when the file is missing, unreadable or
    holds no object."""
    with contextlib.suppress(OSError, ValueError):
        saved = json.loads(Path(path).read_text(encoding="utf-8"))
        return saved if isinstance(saved, dict) else None
    return None


def changed_settings(saved: Any, current: dict[str, Any]) -> list[str]:
    """The keys whose values differ between settings saved as JSON (anything not an object: all of them) and
    `current` (compared as JSON would store it), sorted."""
    saved = saved if isinstance(saved, dict) else {}
    current = json.loads(json.dumps(current, default=str))
    return sorted(key for key in saved.keys() | current.keys() if saved.get(key) != current.get(key))


def input_report(manifest: str | os.PathLike) -> dict[str, Any]:
    """The report beside a stage's input manifest (or in its folder); {} when there is no readable JSON object."""
    return read_saved(report_file(manifest_dir(manifest))) or {}


def input_task(manifest: str | os.PathLike) -> Any:
    """The task named by the report beside a stage's input manifest (None when there is none to read)."""
    return input_report(manifest).get("task")


def command_line() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in _VERSIONED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


@contextlib.contextmanager
def staged_output_dir(out: str | os.PathLike, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; it becomes `out` only if the block succeeds.

    An existing `out` is refused unless `overwrite`; then it is replaced at the very end, so a
    failed run leaves the previous result (or nothing) in place, never a half-written one. It is
    refused even so when it holds one of the stage's `inputs` (files or folders), which it would delete.
    """
    out = Path(out)
    recover_leftovers(out)  # first: it may put an old output back
    if out.exists() and not overwrite:
        raise CurateError(f"output directory {out} already exists (use --overwrite to replace it)")
    if out.exists():
        refuse_inputs_inside(out, inputs)
    make_folder(out.parent)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}{STAGING_INFIX}", dir=out.parent))
    except OSError as exc:  # no permission, a read-only or special file system (/proc), ...
        raise CurateError(f"cannot create a folder in {out.parent} for {out}: {exc.strerror or exc}") from None
    with folder_lock(staging, wait=True):
        _mark_leftover(staging)
        staging.chmod(0o777 & ~UMASK)  # mkdtemp makes it private (0700); the output is an ordinary folder
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _swap_in(staging, out)


def recover_leftovers(out: Path) -> None:
    """Deal with what runs killed outright (SIGKILL, out of memory, a lost node) left beside `out`, hidden and
    as large as an output: a staging folder is deleted; an old output set aside is put back if `out` is missing
    (a kill between `_swap_in`'s two renames), else deleted. Only folders of our names that hold our mark are
    touched, and only when no live run holds them (it locks them before it marks them)."""
    if not out.parent.is_dir():
        return
    # mkdtemp's names: the prefix, then 8 of [a-z0-9_]
    ours = re.compile(re.escape(f".{out.name}") + f"({re.escape(STAGING_INFIX)}|{re.escape(ASIDE_INFIX)})[a-z0-9_]{{8}}")
    for folder in sorted(out.parent.glob(glob.escape(f".{out.name}.") + "*")):
        matched = ours.fullmatch(folder.name)
        if not matched or folder.is_symlink() or not (folder / LEFTOVER_MARK).is_file():
            continue
        with contextlib.suppress(OSError), folder_lock(folder) as held:  # OSError: held by a live run, or gone
            if held and matched.group(1) == ASIDE_INFIX and not (out.exists() or out.is_symlink()):
                (folder / LEFTOVER_MARK).unlink()
                os.replace(folder, out)
                log.warning("put %s back as %s: an interrupted run had set it aside", folder, out)
            elif held:
                log.warning("removing %s, left by an interrupted run", folder)
                shutil.rmtree(folder, ignore_errors=True)


def _mark_leftover(folder: Path) -> None:
    """Mark a folder this process has locked as one of ours, to be cleared up if the process is killed."""
    with contextlib.suppress(OSError):  # unmarked, it is never touched: the worst is a folder left behind
        (folder / LEFTOVER_MARK).touch()


@contextlib.contextmanager
def folder_lock(folder: Path, wait: bool = False) -> Iterator[bool]:
    """Hold an exclusive lock on `folder` during the block. Without `wait`, raise BlockingIOError if another
    process holds it. The lock goes with its process, so a killed run's folder is free. Yields False where
    there are no locks (Windows, some network file systems): nothing is held then."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    handle = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            held = True
        except BlockingIOError:
            raise
        except OSError:  # no locks on this file system
            held = False
        yield held
    finally:
        os.close(handle)


def _swap_in(staging: Path, out: Path) -> None:
    """Put `staging` in the place of `out`. The old output is renamed aside first and deleted last, so an
    interruption (Ctrl-C, SIGTERM) leaves the old output or the new one whole, never half of one and a staging
    folder (deleting a large old output first took long enough to be interrupted). The aside is locked and
    marked, so that a run after a kill puts it back or deletes it (`recover_leftovers`)."""
    aside = None
    with contextlib.ExitStack() as held:
        try:
            if out.exists() or out.is_symlink():
                aside = Path(tempfile.mkdtemp(prefix=f".{out.name}{ASIDE_INFIX}", dir=out.parent))
                aside.rmdir()  # a free name beside `out`: the rename below takes it
                os.replace(out, aside)
                if aside.is_dir() and not aside.is_symlink():
                    held.enter_context(folder_lock(aside, wait=True))
                    _mark_leftover(aside)
            os.replace(staging, out)
        except BaseException:
            if aside is not None and not (out.exists() or out.is_symlink()):
                with contextlib.suppress(OSError):
                    (aside / LEFTOVER_MARK).unlink()
                os.replace(aside, out)
            shutil.rmtree(staging, ignore_errors=True)
            raise
        with contextlib.suppress(OSError):  # the staging folder's, kept up to here: a kill between the renames
            (out / LEFTOVER_MARK).unlink()  # left it marked
        if aside is not None:
            remove_output(aside)


def clear_output(out: Path, inputs: Iterable[str | os.PathLike]) -> None:
    """Delete a previous output that --overwrite replaces, unless it holds one of the command's inputs."""
    refuse_inputs_inside(out, inputs)
    remove_output(out)


def manifest_inputs(manifest: str | os.PathLike, table: pa.Table) -> Iterator[Path]:
    """What a stage reading `manifest` reads: the manifest, and the folders of its images (listed lazily)."""
    from manifests.images import image_folders

    yield Path(manifest)
    yield from image_folders(table, manifest_dir(manifest))


def remove_output(out: Path) -> None:
    """Delete a previous output: a folder, a file, or a link (the link only, never what it points to)."""
    if out.is_symlink() or not out.is_dir():
        out.unlink()
    else:
        shutil.rmtree(out)


def make_folder(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a folder on the way should be, no permission, ...
        raise CurateError(f"cannot create folder {path}: {exc.strerror or exc}") from None


def refuse_inputs_inside(out: Path, inputs: Iterable[str | os.PathLike]) -> None:
    """One error if the existing output `out` is, or holds, one of the command's inputs: replacing it would delete them."""
    resolved = out.parent.resolve() / out.name if out.is_symlink() else out.resolve()  # a link goes, not its target
    for path in inputs:
        real = Path(path).resolve()
        if real == resolved or resolved in real.parents:
            raise CurateError(f"output directory {out} holds the input {path}: replacing it would delete the input; "
                              "choose another --out")


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call `write(tmp_path)` on a temp file beside `path`, then rename it to `path` (removed on failure)."""
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _temp_beside(path: Path) -> Path:
    """A new empty file in `path`'s folder (created if needed), to be renamed to `path` when complete."""
    make_folder(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp makes it private (0600); the output is an ordinary file
    os.close(fd)
    return Path(tmp)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
