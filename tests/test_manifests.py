from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.errors import CurateError
from manifests import (
    ManifestWriter,
    hashed_subset_rank,
    iter_manifest,
    read_manifest,
    staged_output_dir,
    uid_for_synthetic,
    uid_for_url,
    write_manifest,
    write_report,
)


def table(**overrides):
    data = {"uid": ["a", "b"], "label": [0, 1], "class_name": ["x", "y"], "source": ["retrieved", "synthetic"], "caption": ["c1", "c2"]}
    data.update(overrides)
    return pa.table(data)


def test_write_conforms_types_and_column_order(tmp_path):
    t = table().append_column("extra", pa.array([1, 2])).append_column("url", pa.array(["u1", "u2"]))
    written = write_manifest(t, tmp_path / "manifest.parquet")
    assert written.column_names == ["uid", "label", "class_name", "source", "caption", "url", "extra"]
    assert written.schema.field("label").type == pa.int32()
    assert read_manifest(tmp_path).equals(written)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (table().drop_columns(["label", "caption"]), "missing required column(s): label, caption"),
        (table(source=["retrieved", "scraped"]), "unknown source value(s) ['scraped']"),
        (table(label=[0, -1]), "negative label"),
        (table(uid=["a", None]), "empty values in column 'uid'"),
        (table(label=["zero", "one"]), "cannot be read as int32"),
    ],
)
def test_validation_errors(tmp_path, bad, message):
    pq.write_table(bad, tmp_path / "m.parquet")
    with pytest.raises(CurateError) as error:
        read_manifest(tmp_path / "m.parquet")
    assert message in str(error.value)


def rows(n, start=0):
    return pa.table({"uid": [f"u{i}" for i in range(start, start + n)], "label": [i % 3 for i in range(start, start + n)],
                     "class_name": ["x"] * n, "source": ["retrieved"] * n, "caption": [f"c{i}" for i in range(start, start + n)]})


def test_writer_row_groups_do_not_depend_on_how_rows_were_split(tmp_path):
    splits = {"one": [(0, 25)], "many": [(0, 3), (3, 1), (4, 0), (4, 17), (21, 4)]}
    for name, pieces in splits.items():
        with ManifestWriter(tmp_path / name / "manifest.parquet", ["uid", "label", "class_name", "source", "caption"], row_group_rows=10) as writer:
            for start, count in pieces:
                writer.write(rows(count, start))
        assert writer.rows == 25
        meta = pq.read_metadata(tmp_path / name / "manifest.parquet")
        assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [10, 10, 5]
    assert (tmp_path / "one" / "manifest.parquet").read_bytes() == (tmp_path / "many" / "manifest.parquet").read_bytes()
    assert read_manifest(tmp_path / "one").column("uid").to_pylist() == [f"u{i}" for i in range(25)]


def test_writer_fills_a_column_a_piece_lacks_with_nulls_and_orders_columns(tmp_path):
    with ManifestWriter(tmp_path / "m.parquet", ["hash", "caption", "uid", "label", "class_name", "source", "url"]) as writer:
        writer.write(rows(2).append_column("url", pa.array(["a", "b"])))
        writer.write(rows(1, 2).append_column("hash", pa.array([7], pa.int64())))
    written = read_manifest(tmp_path / "m.parquet")
    assert written.column_names == ["uid", "label", "class_name", "source", "caption", "url", "hash"]
    assert written.column("url").to_pylist() == ["a", "b", None]
    assert written.column("hash").to_pylist() == [None, None, 7]


def test_writer_with_no_rows_writes_an_empty_manifest_with_its_columns(tmp_path):
    with ManifestWriter(tmp_path / "m.parquet", ["uid", "label", "class_name", "source", "caption", "url"]):
        pass
    written = read_manifest(tmp_path / "m.parquet")
    assert written.num_rows == 0 and written.column_names[-1] == "url"


def test_writer_leaves_nothing_when_the_block_fails_or_a_piece_is_invalid(tmp_path):
    with pytest.raises(RuntimeError), ManifestWriter(tmp_path / "a.parquet", ["uid", "label", "class_name", "source", "caption"]) as writer:
        writer.write(rows(3))
        raise RuntimeError("killed")
    with pytest.raises(CurateError, match="negative label"), \
            ManifestWriter(tmp_path / "b.parquet", ["uid", "label", "class_name", "source", "caption"]) as writer:
        writer.write(rows(2))
        writer.write(table(label=[0, -1]))
    assert os.listdir(tmp_path) == []


def test_read_only_some_columns_whole_or_a_row_group_at_a_time(tmp_path):
    written = write_manifest(table(url=["u1", "u2"], width=[3, 4]), tmp_path / "manifest.parquet")
    wanted = ("width", "image_path")  # the file has no image_path: skipped
    assert read_manifest(tmp_path, columns=wanted).column_names == ["uid", "label", "class_name", "source", "caption", "width"]
    assert read_manifest(tmp_path, columns=()).equals(written.drop_columns(["url", "width"]))
    with ManifestWriter(tmp_path / "groups.parquet", ["uid", "label", "class_name", "source", "caption"], row_group_rows=10) as writer:
        writer.write(rows(25))
    groups = list(iter_manifest(tmp_path / "groups.parquet", columns=()))
    assert [g.num_rows for g in groups] == [10, 10, 5]
    assert pa.concat_tables(groups).equals(read_manifest(tmp_path / "groups.parquet"))
    with pytest.raises(CurateError, match="missing required column"):
        next(iter_manifest(_parquet(table().drop_columns(["source"]), tmp_path / "bad.parquet")))
    own = [g.column_names for g in iter_manifest(tmp_path / "groups.parquet", columns=("uid", "label"), check=False)]
    assert own == [["uid", "label"]] * 3  # a stage's own file read back: just the columns asked for


def _parquet(data: pa.Table, path):
    pq.write_table(data, path)
    return path


def test_unreadable_and_missing_manifest(tmp_path):
    (tmp_path / "m.parquet").write_text("nope")
    for read in (read_manifest, lambda path: next(iter_manifest(path))):
        with pytest.raises(CurateError, match="cannot read manifest"):
            read(tmp_path / "m.parquet")
        with pytest.raises(CurateError, match="manifest not found"):
            read(tmp_path / "missing.parquet")


def test_failed_write_leaves_previous_file(tmp_path):
    path = tmp_path / "m.parquet"
    write_manifest(table(), path)
    before = path.read_bytes()
    with pytest.raises(CurateError):
        write_manifest(table().drop_columns(["uid"]), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.parquet"]


def test_a_write_that_fails_midway_leaves_the_previous_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "m.parquet"
    write_manifest(table(), path)
    before = path.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", disk_full)
    with pytest.raises(OSError, match="disk full"):
        write_manifest(table(caption=["new", "new"]), path)
    with pytest.raises(OSError, match="disk full"), ManifestWriter(tmp_path / "w.parquet", table().column_names) as writer:
        writer.write(table())
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.parquet"]


def test_writer_refuses_a_piece_with_a_column_it_was_not_opened_with(tmp_path):
    with pytest.raises(CurateError, match="column\\(s\\) the writer was not opened with: clip_score"), \
            ManifestWriter(tmp_path / "m.parquet", table().column_names) as writer:
        writer.write(table().append_column("clip_score", pa.array([0.1, 0.2], pa.float32())))
    assert os.listdir(tmp_path) == []


def test_staged_output_dir_only_appears_on_success(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), staged_output_dir(out) as staging:
        (staging / "half.txt").write_text("x")
        raise RuntimeError("boom")
    assert not out.exists() and os.listdir(tmp_path) == []
    with staged_output_dir(out) as staging:
        write_report(staging, {"stage": "test"})
    assert (out / "report.json").exists()
    with pytest.raises(CurateError, match="already exists"), staged_output_dir(out):
        pass


@pytest.mark.parametrize("interrupted", ["placing the new output", "deleting the old one"])
def test_an_interrupted_overwrite_leaves_one_whole_output_and_no_staging(tmp_path, monkeypatch, interrupted):
    """Ctrl-C or SIGTERM at the very end of --overwrite: the old output deleted first was left half gone, beside
    the staging folder."""
    import manifests.io

    out = tmp_path / "out"
    out.mkdir()
    for i in range(5):
        (out / f"old{i}.txt").write_text("old")
    calls, replace = [], os.replace

    def stopped_at_second_rename(*args):  # 1: the old output aside, 2: the new one in place
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return replace(*args)

    def stopped(_path):
        raise KeyboardInterrupt

    if interrupted == "placing the new output":
        monkeypatch.setattr(os, "replace", stopped_at_second_rename)
    else:
        monkeypatch.setattr(manifests.io, "remove_output", stopped)
    with pytest.raises(KeyboardInterrupt), staged_output_dir(out, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    left = sorted(p.name for p in tmp_path.iterdir())
    if interrupted == "placing the new output":
        assert left == ["out"] and sorted(os.listdir(out)) == [f"old{i}.txt" for i in range(5)]
    else:
        assert os.listdir(out) == ["new.txt"] and [n[:14] for n in left] == [".out.replaced-", "out"]


STAGING_HOLDER = """
import sys, time
from manifests.io import staged_output_dir
with staged_output_dir(sys.argv[1]) as staging:
    (staging / "half.txt").write_text("x")
    print(staging, flush=True)
    time.sleep(120)
"""


def _start_staging(out):
    """A process filling a staging folder for `out`, and that folder."""
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", STAGING_HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    return process, Path(process.stdout.readline().strip())


def test_a_killed_runs_hidden_leftovers_are_removed_and_a_live_runs_staging_stays(tmp_path, caplog):
    """SIGKILL (out of memory, a scheduler's last word) left `.OUT.partial-*` beside OUT for good: hidden, and as
    large as the output. Only marked folders of our names that no live run holds go: never a user's folder
    named like ours, nor a staging folder just made and not yet locked and marked."""
    import signal

    from manifests.io import LEFTOVER_MARK

    out = tmp_path / "out"
    live, live_staging = _start_staging(out)
    killed, killed_staging = _start_staging(out)
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait(30)
        aside = tmp_path / ".out.replaced-abcd_123"  # an old output whose deletion was interrupted, OUT in place
        aside.mkdir()
        (aside / LEFTOVER_MARK).touch()
        out.mkdir()
        kept = [tmp_path / ".out2.partial-abcd_123", tmp_path / ".out.partial-mine", tmp_path / ".out.partial-20261122",
                tmp_path / ".out.replaced-original"]  # another output's; a user's (unmarked); one just made by mkdtemp
        for folder in kept:
            folder.mkdir()
            (folder / "keep.txt").write_text("mine")
        (kept[0] / LEFTOVER_MARK).touch()
        assert (killed_staging / LEFTOVER_MARK).exists() and (live_staging / "half.txt").exists()
        with caplog.at_level("WARNING", logger="manifests.io"), staged_output_dir(out, overwrite=True) as staging:
            write_report(staging, {"stage": "test"})
        assert not killed_staging.exists() and not aside.exists() and (out / "report.json").exists()
        assert (live_staging / "half.txt").exists() and all((folder / "keep.txt").exists() for folder in kept)
        assert sorted(r.getMessage() for r in caplog.records) == [
            f"removing {folder}, left by an interrupted run" for folder in sorted([killed_staging, aside])]
        assert sorted(os.listdir(out)) == ["report.json"]  # no mark in the output
    finally:
        live.kill()
        live.wait(30)


KILLED_BETWEEN_RENAMES = """
import os, signal, sys
from pathlib import Path
from manifests.io import staged_output_dir
replace = os.replace
def killed_before_the_new_output_is_placed(source, target):
    if Path(source).name.startswith(".out.partial-"):
        os.kill(os.getpid(), signal.SIGKILL)
    return replace(source, target)
os.replace = killed_before_the_new_output_is_placed
with staged_output_dir(sys.argv[1], overwrite=True) as staging:
    (staging / "new.txt").write_text("new")
"""


def test_an_old_output_set_aside_by_a_killed_run_is_put_back(tmp_path, caplog):
    """A kill between the two renames of --overwrite left the only copy of the old output in `.OUT.replaced-*`;
    the next run deleted it, and then failed."""
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    done = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_RENAMES, str(out)], timeout=60)
    assert done.returncode == -9
    [aside] = tmp_path.glob(".out.replaced-*")
    [staging] = tmp_path.glob(".out.partial-*")
    assert not out.exists() and (aside / "old.txt").read_text() == "old" and (staging / "new.txt").exists()
    with caplog.at_level("WARNING", logger="manifests.io"), pytest.raises(CurateError, match="already exists"):
        with staged_output_dir(out):
            pass
    assert sorted(os.listdir(out)) == ["old.txt"] and sorted(os.listdir(tmp_path)) == ["out"]
    assert sorted(r.getMessage() for r in caplog.records) == [
        f"put {aside} back as {out}: an interrupted run had set it aside", f"removing {staging}, left by an interrupted run"]


def test_staged_output_replaces_a_link_not_its_target_and_names_a_blocked_path(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(target)
    with staged_output_dir(link, overwrite=True, inputs=[target / "keep.txt"]) as staging:  # the link goes, not the input
        write_report(staging, {"stage": "test"})
    assert not link.is_symlink() and (link / "report.json").exists()
    assert (target / "keep.txt").read_text() == "mine"
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(CurateError, match=f"^cannot create folder {blocker}: "), staged_output_dir(blocker / "run"):
        pass


def test_uids_are_stable_and_distinct():
    assert uid_for_url("http://a") == uid_for_url("http://a") != uid_for_url("http://b")
    assert len(uid_for_url("http://a")) == 32
    assert uid_for_url("http://a", 3).endswith("-3")
    assert uid_for_synthetic("t", "cap", 1) != uid_for_synthetic("t", "cap", 2)
    assert hashed_subset_rank("a", 0) != hashed_subset_rank("a", 1)


def test_image_rows_build_each_rows_dict_on_access_and_hold_no_python_object_per_row():
    import tracemalloc

    from manifests.images import image_rows

    files = pa.concat_tables([pa.table({"uid": ["a", "b"], "image_path": ["a.png", None], "shard": ["s", "s"]}),
                              pa.table({"uid": ["c"], "image_path": ["c.png"], "shard": ["s"]})])
    rows = image_rows(files)
    assert len(rows) == 3 and rows[2] == {"uid": "c", "image_path": "c.png"}
    assert list(rows) == [{"uid": "a", "image_path": "a.png"}, {"uid": "b", "image_path": None}, {"uid": "c", "image_path": "c.png"}]
    with pytest.raises(IndexError):
        rows[3]
    assert image_rows(pa.table({"uid": ["w"], "shard": ["s.tar"], "key": ["k"]}))[0] == {"uid": "w", "shard": "s.tar", "key": "k"}
    n = 100_000
    big = pa.table({"uid": [f"u{i}" for i in range(n)], "image_path": [f"{i}.png" for i in range(n)]})
    tracemalloc.start()
    rows = image_rows(big)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(rows) == n and peak < 1_000_000  # row dicts would be ~30 MB (Arrow buffers are not traced)


def test_reports_write_nan_and_infinities_as_null(tmp_path):
    """JSON has no NaN: JSON.parse and strict readers refused a report holding one."""
    import json

    write_report(tmp_path, {"stage": "test", "loss": float("nan"), "nested": {"best": [1.5, float("inf")]}})

    def refuse(constant):
        raise ValueError(constant)

    report = json.loads((tmp_path / "report.json").read_text(), parse_constant=refuse)
    assert (report["loss"], report["nested"]) == (None, {"best": [1.5, None]})
