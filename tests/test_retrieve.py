"""`curate retrieve` end to end: semantics of DESIGN §3 through the real stage and CLI."""

from __future__ import annotations

import json
import os
import stat

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers_cli import assert_cli_error

import manifests.io
from curate.cli import cli
from curate.errors import CurateError
from curate.retrieve import retrieve
from manifests import read_manifest, seeded_subset_per_class, uid_for_url
from manifests.io import read_report

TASK = {"name": "planes", "classes": ["737", "737-800", "A320", {"name": "rose", "require_any": ["flower"]}]}


def run(runner, *args):
    result = runner.invoke(cli, ["retrieve", *args])
    return result


def manifest_rows(out):
    return pd.read_parquet(out / "manifest.parquet")


def test_retrieve_basic_funnel_and_columns(tmp_path, write_task, write_laion, runner):
    meta = write_laion(
        [
            ("u1", "Boeing 737-800 at dawn"),
            ("u2", "an A320 and a 737 at the gate"),  # ambiguous
            ("u3", "my A320 photo"),
            ("u1", "737-800 again, same url"),  # duplicate url
            (None, "A320 without url"),
            ("u5", None),
            ("u6", ""),
            ("u7", "rose flower"),
            ("u8", "rose gold"),
            ("u9", "nothing here"),
        ],
        WIDTH=pa.array([100] * 10, pa.int32()),
        HEIGHT=pa.array([200] * 10, pa.int32()),
        similarity=pa.array([0.3] * 10, pa.float64()),
    )
    out = tmp_path / "out"
    result = run(runner, "--task", str(write_task(TASK)), "--metadata", str(meta), "--out", str(out))
    assert result.exit_code == 0, result.output
    rows = manifest_rows(out)
    assert rows["url"].tolist() == ["u1", "u3", "u7"]
    assert rows["class_name"].tolist() == ["737-800", "A320", "rose"]
    assert rows["label"].tolist() == [1, 2, 3]
    assert rows["matched_text"].tolist() == ["737-800", "A320", "rose"]
    assert rows["source"].unique().tolist() == ["retrieved"]
    assert rows["uid"].tolist() == [uid_for_url(u) for u in ["u1", "u3", "u7"]]
    assert list(rows.columns[:7]) == ["uid", "label", "class_name", "source", "caption", "url", "matched_text"]
    assert {"width", "height", "laion_similarity"} <= set(rows.columns)
    report = json.loads((out / "report.json").read_text())
    funnel = report["funnel"]
    assert funnel == {
        "rows_scanned": 10, "skipped_empty": 2, "filtered_quality": 0, "candidates": 7, "matched": 6,
        "ambiguous": 1, "ambiguous_extra_rows": 0, "no_url": 1, "duplicates": 1, "capped": 0, "kept": 3,
    }
    dropped = funnel["ambiguous"] + funnel["no_url"] + funnel["filtered_quality"] + funnel["duplicates"] + funnel["capped"]
    assert funnel["kept"] == funnel["matched"] - dropped  # the funnel adds up
    assert report["per_class"] == {"737": 0, "737-800": 1, "A320": 1, "rose": 1}
    assert report["task"] == "planes" and report["command"] and "duckdb" in report["versions"]
    assert report["settings"]["threads"] == os.cpu_count() and report["settings"]["engine"] == "hyperscan"
    assert "kept" in result.output and "rows_scanned" in result.output


def test_a_manifest_given_as_metadata_again_keeps_its_carried_columns(tmp_path, write_task, write_laion):
    meta = write_laion([("u1", "a 737 jet"), ("u2", "an A320")], similarity=pa.array([0.31, 0.42]), WIDTH=pa.array([640, 320], pa.int32()))
    retrieve(task=write_task(TASK), metadata=[str(meta)], out=tmp_path / "a")
    retrieve(task=write_task(TASK), metadata=[str(tmp_path / "a" / "manifest.parquet")], out=tmp_path / "b")
    first, again = manifest_rows(tmp_path / "a"), manifest_rows(tmp_path / "b")
    assert again["laion_similarity"].tolist() == first["laion_similarity"].tolist() == pytest.approx([0.31, 0.42])
    assert again["width"].tolist() == [640, 320] and again["uid"].tolist() == first["uid"].tolist()


def test_multi_class_duplicate_emits_one_row_per_class(tmp_path, write_task, write_laion):
    meta = write_laion([("u1", "an A320 and a 737 at the gate"), ("u2", "a 737")])
    result = retrieve(task=write_task(TASK), metadata=[str(meta)], out=tmp_path / "o", multi_class="duplicate")
    rows = manifest_rows(tmp_path / "o")
    assert rows[["url", "class_name"]].values.tolist() == [["u1", "A320"], ["u1", "737"], ["u2", "737"]]
    assert rows["uid"].is_unique
    assert rows["uid"].tolist()[:2] == [uid_for_url("u1", 2), uid_for_url("u1", 0)]
    assert result.funnel["ambiguous"] == 1 and result.funnel["ambiguous_extra_rows"] == 1


@pytest.mark.parametrize(("option", "value", "message"), [
    ("match_mode", "regex", "--match must be one of word, substring, got 'regex'"),
    ("multi_class", "keep", "--multi-class must be one of drop, duplicate, got 'keep'"),
])
def test_bad_choice_from_python_is_a_curate_error_and_writes_nothing(tmp_path, write_task, write_laion, option, value, message):
    meta = write_laion([("u1", "a 737")])
    with pytest.raises(CurateError, match=message):
        retrieve(task=write_task(TASK), metadata=[str(meta)], out=tmp_path / "o", **{option: value})
    assert not (tmp_path / "o").exists()


def test_a_file_whose_captions_are_all_null(tmp_path, write_task, write_laion):
    write_laion([("n1", None), ("n2", None)], name="a.parquet")
    meta = write_laion([("u1", "a 737"), ("u2", "")], name="b.parquet")
    result = retrieve(task=write_task(TASK), metadata=[str(meta.parent)], out=tmp_path / "o")
    assert manifest_rows(tmp_path / "o")["url"].tolist() == ["u1"]
    assert result.funnel["rows_scanned"] == 4 and result.funnel["skipped_empty"] == 3 and result.funnel["no_url"] == 0


def test_files_sorted_by_path_then_row_order_and_first_url_wins(tmp_path, write_task, write_laion):
    b = write_laion([("dup", "A320 second file"), ("b1", "737 b")], name="b.parquet")
    a = write_laion([("a1", "737 a"), ("dup", "A320 first file")], name="a.parquet")
    retrieve(task=write_task(TASK), metadata=[str(b), str(a)], out=tmp_path / "o")
    rows = manifest_rows(tmp_path / "o")
    assert rows["url"].tolist() == ["a1", "dup", "b1"]
    assert rows.loc[rows.url == "dup", "caption"].item() == "A320 first file"


def test_globs_and_folders(tmp_path, write_task, write_laion):
    write_laion([("a", "737")], name="x1.parquet")
    write_laion([("b", "A320")], name="x2.parquet")
    result = retrieve(task=write_task(TASK), metadata=[str(tmp_path / "meta" / "x*.parquet")], out=tmp_path / "o1")
    assert result.funnel["kept"] == 2
    result = retrieve(task=write_task(TASK), metadata=[str(tmp_path / "meta")], out=tmp_path / "o2")
    assert result.funnel["kept"] == 2


def test_spark_folders_and_links_read_each_file_once(tmp_path, write_task, write_laion):
    """Spark writes `laion.parquet/` folders of part files; a link (or a loop of links) names a file again."""
    spark = tmp_path / "meta" / "laion.parquet"
    spark.mkdir(parents=True)
    write_laion([("a", "737")], name="laion.parquet/part-00000.snappy.parquet")
    write_laion([("b", "A320"), ("c", "nothing")], name="x2.parquet")
    (tmp_path / "meta" / "again.parquet").symlink_to(tmp_path / "meta" / "x2.parquet")
    (spark / "loop").symlink_to(spark)
    result = retrieve(task=write_task(TASK), metadata=[str(tmp_path / "meta"), str(tmp_path / "meta" / "**" / "*.parquet")],
                      out=tmp_path / "o")
    assert result.funnel["rows_scanned"] == 3 and result.funnel["kept"] == 2


def test_quality_filters(tmp_path, write_task, write_laion):
    meta = write_laion(
        [("a", "737"), ("b", "737"), ("c", "737"), ("d", "737"), ("e", "737"), ("f", "737"), ("g", "737")],
        punsafe=pa.array([0.01, 0.9, 0.01, None, 0.01, 0.01, 0.01], pa.float32()),
        pwatermark=pa.array([0.1, 0.1, 0.8, 0.1, 0.1, 0.1, 0.1], pa.float32()),
        WIDTH=pa.array([500, 500, 500, 500, 50, None, 500], pa.int32()),  # a side not known fails --min-side
        HEIGHT=pa.array([400, 400, 400, 400, 400, 400, None], pa.int32()),
    )
    result = retrieve(task=write_task(TASK), metadata=[str(meta)], out=tmp_path / "o",
                      max_punsafe=0.5, max_pwatermark=0.5, min_side=100)
    assert manifest_rows(tmp_path / "o")["url"].tolist() == ["a"]
    assert result.funnel["filtered_quality"] == 6


def test_per_class_cap_is_seeded_and_deterministic(tmp_path, write_task, write_laion):
    meta = write_laion([(f"u{i}", "737" if i % 2 else "A320") for i in range(40)])
    task = write_task(TASK)
    picks = []
    for seed, name in [(1, "a"), (1, "b"), (2, "c")]:
        result = retrieve(task=task, metadata=[str(meta)], out=tmp_path / name, per_class_cap=5, seed=seed)
        rows = manifest_rows(tmp_path / name)
        assert rows.groupby("class_name").size().to_dict() == {"737": 5, "A320": 5}
        assert result.funnel["capped"] == 30
        assert rows["url"].map(lambda u: int(u[1:])).is_monotonic_increasing  # input order kept
        picks.append(rows["url"].tolist())
    assert picks[0] == picks[1]
    assert picks[0] != picks[2]


def test_cap_over_many_row_groups_keeps_what_an_in_memory_cap_keeps(tmp_path, write_task, write_laion, monkeypatch):
    import manifests.io

    monkeypatch.setattr(manifests.io, "ROW_GROUP_ROWS", 7)
    meta = write_laion([(f"u{i}", ["737", "A320", "a 737-800 here"][i % 3]) for i in range(60)])
    task = write_task(TASK)
    retrieve(task=task, metadata=[str(meta)], out=tmp_path / "all")
    result = retrieve(task=task, metadata=[str(meta)], out=tmp_path / "capped", per_class_cap=6, seed=3)
    assert pq.read_metadata(tmp_path / "all" / "manifest.parquet").num_row_groups == 9
    everything = read_manifest(tmp_path / "all")
    keep = seeded_subset_per_class(everything.column("uid").to_pylist(), everything.column("label").to_numpy(), 3, lambda n: min(n, 6))
    assert read_manifest(tmp_path / "capped").equals(everything.filter(pa.array(keep)))
    assert result.per_class == {"737": 6, "737-800": 6, "A320": 6, "rose": 0}
    assert result.funnel["capped"] == 42 and result.funnel["kept"] == 18
    assert sorted(p.name for p in (tmp_path / "capped").iterdir()) == ["manifest.parquet", "report.json"]


def test_laion_and_datacomp_files_together_give_every_carried_column(tmp_path, write_task, write_laion):
    write_laion([("l1", "an A320")], name="a.parquet", hash=pa.array([11], pa.int64()))
    pq.write_table(pa.table({"uid": ["x1"], "url": ["d1"], "text": ["a 737"]}), tmp_path / "meta" / "b.parquet")
    retrieve(task=write_task(TASK), metadata=[str(tmp_path / "meta")], out=tmp_path / "o")
    rows = read_manifest(tmp_path / "o")
    assert rows.column("url").to_pylist() == ["l1", "d1"]
    assert rows.column("hash").to_pylist() == [11, None]
    assert rows.column("source_uid").to_pylist() == [None, "x1"]


def test_two_runs_give_identical_manifest_bytes(tmp_path, write_task, write_laion):
    meta = write_laion([(f"u{i}", f"photo {i} of a 737-800") for i in range(100)])
    for name in ("a", "b"):
        retrieve(task=write_task(TASK), metadata=[str(meta)], out=tmp_path / name, per_class_cap=30, seed=3)
    assert (tmp_path / "a" / "manifest.parquet").read_bytes() == (tmp_path / "b" / "manifest.parquet").read_bytes()


def test_datacomp_schema_is_detected(tmp_path, write_task):
    path = tmp_path / "dc.parquet"
    pq.write_table(pa.table({
        "uid": ["x1", "x2"], "url": ["http://a", "http://b"], "text": ["an A320", "no"],
        "original_width": pa.array([640, 10], pa.int64()), "original_height": pa.array([480, 10], pa.int64()),
    }), path)
    retrieve(task=write_task(TASK), metadata=[str(path)], out=tmp_path / "o")
    rows = manifest_rows(tmp_path / "o")
    assert rows[["url", "source_uid", "width", "height"]].values.tolist() == [["http://a", "x1", 640, 480]]


def test_explicit_columns(tmp_path, write_task):
    path = tmp_path / "custom.parquet"
    pq.write_table(pa.table({"link": ["http://a"], "alt": ["A320 gate"]}), path)
    retrieve(task=write_task(TASK), metadata=[str(path)], out=tmp_path / "o", url_col="link", caption_col="alt")
    assert manifest_rows(tmp_path / "o")["url"].tolist() == ["http://a"]


def test_no_match_writes_an_empty_valid_manifest(tmp_path, write_task, write_laion):
    meta = write_laion([("a", "nothing")])
    result = retrieve(task=write_task(TASK), metadata=[str(meta)], out=tmp_path / "o")
    assert result.funnel["kept"] == 0
    assert read_manifest(tmp_path / "o").num_rows == 0


@pytest.mark.parametrize("umask", [0o002, 0o022])
def test_outputs_get_the_umask_modes_not_private_temp_ones(tmp_path, write_task, write_laion, runner, monkeypatch, umask):
    """Staging folders and files are made private (0700/0600) by mkdtemp/mkstemp; outputs follow the umask (read
    once at import, so the test sets what was read: under a private umask 077 the test could not fail)."""
    monkeypatch.setattr(manifests.io, "UMASK", umask)
    out = tmp_path / "o"
    result = run(runner, "-t", str(write_task(TASK)), "-m", str(write_laion([("a", "737")])), "-o", str(out))
    assert result.exit_code == 0, result.output
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in (out, out / "manifest.parquet", out / "report.json")}
    folder, file = 0o777 & ~umask, 0o666 & ~umask
    assert modes == {"o": folder, "manifest.parquet": file, "report.json": file}


def test_manifest_reads_in_duckdb_and_export_formats(tmp_path, write_task, write_laion, runner):
    meta = write_laion([("http://x/1.jpg", "737 jet"), ("http://x/2.jpg", "A320 jet")])
    retrieve(task=write_task(TASK), metadata=[str(meta)], out=tmp_path / "o")
    count = duckdb.sql(f"SELECT count(*) FROM '{tmp_path / 'o' / 'manifest.parquet'}'").fetchall()[0][0]
    assert count == 2
    for fmt, name in [("img2dataset", "img2dataset_input.parquet"), ("csv", "manifest.csv"), ("jsonl", "manifest.jsonl")]:
        result = runner.invoke(cli, ["export", "--manifest", str(tmp_path / "o"), "--format", fmt, "--out", str(tmp_path / fmt)])
        assert result.exit_code == 0, result.output
        assert (tmp_path / fmt / name).exists()
        assert read_report(tmp_path / fmt)["task"] == "planes"  # from the input manifest's report
    exported = pq.read_table(tmp_path / "img2dataset" / "img2dataset_input.parquet")
    assert exported.column_names[:2] == ["url", "caption"] and "label" in exported.column_names
    assert len((tmp_path / "jsonl" / "manifest.jsonl").read_text().splitlines()) == 2
    assert pd.read_csv(tmp_path / "csv" / "manifest.csv")["class_name"].tolist() == ["737", "A320"]


def test_ctrl_c_closes_a_connection_the_reader_thread_still_uses_quietly():
    """Ctrl-C can land while pass 1's reader thread is inside a DuckDB call: closing the connection then
    raised 'connection is busy' over the KeyboardInterrupt (a traceback instead of 'Aborted!')."""
    import contextlib
    import threading
    import time

    from curate.retrieve import _closed

    con = duckdb.connect()
    started = threading.Event()

    def busy():
        started.set()
        with contextlib.suppress(duckdb.Error):
            con.execute("SELECT count(*) FROM range(10000000000) t(x) WHERE x % 7 = 3").fetchall()

    reader = threading.Thread(target=busy, daemon=True)
    reader.start()
    started.wait()
    time.sleep(0.3)
    with pytest.raises(KeyboardInterrupt), _closed(con):
        raise KeyboardInterrupt
    reader.join(timeout=20)
    assert not reader.is_alive()  # its query was interrupted


# ---------------------------------------------------------------- bad input, through the CLI
def test_missing_caption_column(tmp_path, write_task, runner):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"URL": ["a"], "words": ["737"]}), path)
    out = tmp_path / "out"
    result = run(runner, "-t", str(write_task(TASK)), "-m", str(path), "-o", str(out))
    assert_cli_error(result, "has no caption column (looked for TEXT, text, caption, CAPTION); name it with --caption-col", out)


def test_named_column_missing(tmp_path, write_task, write_laion, runner):
    out = tmp_path / "out"
    result = run(runner, "-t", str(write_task(TASK)), "-m", str(write_laion([("a", "737")])), "-o", str(out), "--url-col", "link")
    assert_cli_error(result, "has no column 'link'", out)


def test_glob_matching_nothing(tmp_path, write_task, runner):
    out = tmp_path / "out"
    result = run(runner, "-t", str(write_task(TASK)), "-m", str(tmp_path / "nope-*.parquet"), "-o", str(out))
    assert_cli_error(result, "no file matches", out)


@pytest.mark.parametrize("content", [b"not a parquet file at all", b"PAR1" + b"\0" * 64])
def test_non_parquet_file(tmp_path, write_task, runner, content):
    path = tmp_path / "bad.parquet"
    path.write_bytes(content)
    out = tmp_path / "out"
    result = run(runner, "-t", str(write_task(TASK)), "-m", str(path), "-o", str(out))
    assert_cli_error(result, "is not a readable parquet file", out)


def test_a_damaged_page_mid_file_is_one_error(tmp_path, write_task, runner):
    """The footer reads, but a caption page in the fourth row group does not decode."""
    path = tmp_path / "damaged.parquet"
    count = 50_000
    pq.write_table(pa.table({"URL": [f"http://a/{i}" for i in range(count)], "TEXT": [f"a 737 no. {i * 7919 % 10007}" for i in range(count)]}),
                   path, compression="zstd", row_group_size=10_000)
    start = pq.read_metadata(path).row_group(3).column(1).data_page_offset + 40
    data = bytearray(path.read_bytes())
    data[start : start + 200] = bytes(b ^ 0x5A for b in data[start : start + 200])
    path.write_bytes(bytes(data))
    out = tmp_path / "out"
    result = run(runner, "-t", str(write_task(TASK)), "-m", str(path), "-o", str(out))
    assert_cli_error(result, f"cannot read {path}: ", out)


def test_a_column_named_like_duckdbs_row_number_is_one_error(tmp_path, write_task, runner):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"File_Row_Number": [7], "URL": ["u1"], "TEXT": ["a 737"]}), path)
    out = tmp_path / "out"
    result = run(runner, "-t", str(write_task(TASK)), "-m", str(path), "-o", str(out))
    assert_cli_error(result, f"{path} has a column named 'file_row_number', a name DuckDB's parquet reader keeps", out)


def test_task_with_no_classes(tmp_path, write_task, write_laion, runner):
    out = tmp_path / "out"
    result = run(runner, "-t", str(write_task({"name": "x", "classes": []})), "-m", str(write_laion([("a", "b")])), "-o", str(out))
    assert_cli_error(result, "no classes", out)


def test_existing_output_refused_unless_overwrite(tmp_path, write_task, write_laion, runner):
    meta, task = write_laion([("a", "737")]), write_task(TASK)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run(runner, "-t", str(task), "-m", str(meta), "-o", str(out))
    assert_cli_error(result, "already exists (use --overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    result = run(runner, "-t", str(task), "-m", str(meta), "-o", str(out), "--overwrite")
    assert result.exit_code == 0 and not (out / "keep.txt").exists()
    assert read_manifest(out).num_rows == 1


def test_an_output_holding_the_inputs_is_refused_even_with_overwrite(tmp_path, write_task, write_laion, runner):
    meta, task = write_laion([("a", "737"), ("b", "A320")]), write_task(TASK)
    folder = meta.parent
    result = run(runner, "-t", str(task), "-m", str(folder), "-o", str(folder), "--overwrite")
    assert_cli_error(result, f"output directory {folder} holds the input {meta}: replacing it would delete the input")
    assert meta.exists()
    inside = folder / "candidates"  # its manifest is a parquet under the input folder: the next run would read it
    assert run(runner, "-t", str(task), "-m", str(folder), "-o", str(inside)).exit_code == 0
    result = run(runner, "-t", str(task), "-m", str(folder), "-o", str(inside), "--overwrite")
    assert_cli_error(result, f"holds the input {inside / 'manifest.parquet'}")
    assert read_manifest(inside).num_rows == 2


def test_quality_filter_without_its_column(tmp_path, write_task, write_laion, runner):
    out = tmp_path / "out"
    result = run(runner, "-t", str(write_task(TASK)), "-m", str(write_laion([("a", "737")])), "-o", str(out), "--max-punsafe", "0.5")
    assert_cli_error(result, "needs a 'punsafe' column", out)


def test_failure_midway_leaves_no_output(tmp_path, write_task, write_laion, runner):
    good = write_laion([("a", "737")], name="a.parquet")
    (tmp_path / "meta" / "b.parquet").write_bytes(good.read_bytes()[:-40])  # truncated footer
    out = tmp_path / "out"
    result = run(runner, "-t", str(write_task(TASK)), "-m", str(tmp_path / "meta"), "-o", str(out))
    assert_cli_error(result, "b.parquet", out)


@pytest.mark.parametrize(("url", "column", "message"), [
    (["http://h/1"], "TEXT", "column 'TEXT' (the caption) holds int64, not text; name the caption column with --caption-col"),
    ([b"http://h/1"], "TEXT", "column 'TEXT' (the caption) holds int64, not text; name the caption column with --caption-col"),
    (["http://h/1"], "URL", "column 'URL' (the url) holds int64, not text; name the url column with --url-col"),
])
def test_url_or_caption_column_without_text(tmp_path, write_task, runner, url, column, message):
    table = {"URL": url, "TEXT": ["a 737"]}  # the url as text or as bytes (read as text)
    table[column] = [737]
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table(table), path)
    out = tmp_path / "out"
    assert_cli_error(run(runner, "-t", str(write_task(TASK)), "-m", str(path), "-o", str(out)), message, out)


def test_a_column_named_twice_is_one_clear_error(tmp_path, write_task, runner):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table([pa.array(["u1"]), pa.array(["u2"]), pa.array(["a 737"])], names=["URL", "URL", "TEXT"]), path)
    out = tmp_path / "out"
    assert_cli_error(run(runner, "-t", str(write_task(TASK)), "-m", str(path), "-o", str(out)), "more than one column named 'URL'", out)


def test_columns_whose_names_differ_only_in_case_are_told_apart(tmp_path, write_task):
    # DuckDB reads 'url' and 'URL' of one file as 'url' and 'URL_1': the LAION names must still be the ones read
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"url": ["http://lower/1"], "text": ["no plane"], "URL": ["http://upper/1"], "TEXT": ["a 737 here"]}), path)
    retrieve(task=write_task(TASK), metadata=[str(path)], out=tmp_path / "o")
    assert manifest_rows(tmp_path / "o")[["url", "caption"]].values.tolist() == [["http://upper/1", "a 737 here"]]


def test_captions_and_urls_stored_as_bytes_are_read_as_text(tmp_path, write_task):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"URL": pa.array([b"http://h/1", b"http://h/2"]), "TEXT": pa.array([b"a 737 \xff jet", b"nothing"])}), path)
    retrieve(task=write_task(TASK), metadata=[str(path)], out=tmp_path / "o")
    assert manifest_rows(tmp_path / "o")[["url", "caption"]].values.tolist() == [["http://h/1", "a 737 ? jet"]]


def test_dictionary_encoded_columns_are_read_as_their_values(tmp_path, write_task):
    """pandas writes its `category` columns as dictionaries: the text and numbers inside are what counts."""
    path = tmp_path / "m.parquet"
    pd.DataFrame({"URL": ["http://h/1", "http://h/2", "http://h/3"], "TEXT": ["a 737 jet", "nothing", "an A320"],
                  "WIDTH": [640, 640, 320]}).astype("category").to_parquet(path)
    retrieve(task=write_task(TASK), metadata=[str(path)], out=tmp_path / "o")
    rows = manifest_rows(tmp_path / "o")
    assert rows[["url", "caption", "width"]].values.tolist() == [["http://h/1", "a 737 jet", 640], ["http://h/3", "an A320", 320]]


def test_carried_columns_of_other_types(tmp_path, write_task, write_laion, caplog):
    """Numbers of another type are cast (NaN and what does not fit become NULL); text where the manifest
    wants a number is not carried, with a warning; anything is carried as the text of a text column."""
    meta = write_laion(
        [("u1", "a 737"), ("u2", "an A320")],
        WIDTH=pa.array([640.0, float("nan")]), HEIGHT=pa.array([480, 2**40], pa.int64()),
        hash=pa.array(["ab", "cd"]), uid=pa.array([11, 12], pa.int64()),
    )
    (meta.parent / "part-1.parquet").write_bytes(meta.read_bytes())  # the same URLs: duplicates, dropped
    retrieve(task=write_task(TASK), metadata=[str(meta.parent)], out=tmp_path / "o")
    rows = read_manifest(tmp_path / "o")
    assert rows.column("width").to_pylist() == [640, None] and rows.schema.field("width").type == pa.int32()
    assert rows.column("height").to_pylist() == [480, None]
    assert rows.column("source_uid").to_pylist() == ["11", "12"]
    assert "hash" not in rows.column_names
    warnings = [r.getMessage() for r in caplog.records if "not carrying" in r.getMessage()]
    assert warnings == ["not carrying column 'hash' (in 2 of 2 files): it holds string, the manifest's hash is int64"]


def _unchecked_strings(values: list[bytes]) -> pa.Array:
    """A string array holding the given bytes as they are, invalid UTF-8 included (as some scrapes do)."""
    raw = pa.array(values, pa.binary())
    return pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())


def test_invalid_utf8_caption_is_matched_with_its_bad_bytes_replaced(tmp_path, write_task):
    path = tmp_path / "m.parquet"
    captions = [b"a 737 \xff\xfe at the gate", b"an A320 here", b"caf\xe9 with no plane"]
    pq.write_table(pa.table({"URL": ["u1", "u2", "u3"], "TEXT": _unchecked_strings(captions)}), path)
    result = retrieve(task=write_task(TASK), metadata=[str(path)], out=tmp_path / "o")
    rows = manifest_rows(tmp_path / "o")
    assert rows["url"].tolist() == ["u1", "u2"]
    assert rows["caption"].tolist() == ["a 737 ?? at the gate", "an A320 here"]
    assert rows["class_name"].tolist() == ["737", "A320"]
    assert result.funnel["rows_scanned"] == 3


def test_invalid_utf8_url_is_one_clear_error(tmp_path, write_task, runner):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"URL": _unchecked_strings([b"http://h/\xff"]), "TEXT": ["a 737"]}), path)
    out = tmp_path / "out"
    result = run(runner, "-t", str(write_task(TASK)), "-m", str(path), "-o", str(out))
    assert_cli_error(result, "is not valid UTF8", out)


def test_hostile_class_and_column_names_end_to_end(tmp_path, write_task, runner):
    names = ["colt's foot", "F-16A/B", "c++ (beta)", 'say "cheese"', "Pokémon card", "50%_off; DROP TABLE x"]
    path = tmp_path / "hostile.parquet"
    captions = [f"a caption about {name.upper()} here" for name in names] + ["nothing at all"]
    pq.write_table(pa.table({'li"nk': [f"http://h/{i}" for i in range(len(captions))], "te'xt": captions}), path)
    out = tmp_path / "out"
    result = run(runner, "-t", str(write_task({"name": "hostile", "classes": names})), "-m", str(path), "-o", str(out),
                 "--url-col", 'li"nk', "--caption-col", "te'xt")
    assert result.exit_code == 0, result.output
    assert manifest_rows(out)["class_name"].tolist() == names


def test_threads_option_gives_the_same_manifest(tmp_path, write_task, write_laion):
    meta = write_laion([(f"u{i}", f"{['737', 'A320', '737-800'][i % 3]} photo {i}") for i in range(300)])
    for name, threads in (("one", 1), ("two", 2)):
        retrieve(task=write_task(TASK), metadata=[str(meta)], out=tmp_path / name, threads=threads)
    assert (tmp_path / "one" / "manifest.parquet").read_bytes() == (tmp_path / "two" / "manifest.parquet").read_bytes()


def test_row_order_kept_across_many_row_groups_and_threads(tmp_path, write_task):
    from curate.sample_metadata import write_laion_sample

    names = ["737-800", "A320", "Cessna 172"]
    write_laion_sample(tmp_path / "meta", 30000, names, plant_rate=0.05, files=2, chunk_rows=4000, row_group_rows=1000)
    for name, threads in (("one", 1), ("two", 2)):
        retrieve(task=write_task({"name": "p", "classes": names}), metadata=[str(tmp_path / "meta")], out=tmp_path / name,
                 threads=threads)
    rows = manifest_rows(tmp_path / "two")
    ids = rows["url"].str.extract(r"/(\d+)\.jpg$")[0].astype(int)
    assert len(rows) > 1000 and ids.is_monotonic_increasing
    assert (tmp_path / "one" / "manifest.parquet").read_bytes() == (tmp_path / "two" / "manifest.parquet").read_bytes()


def test_pass_two_in_row_group_chunks_gives_the_same_manifest(tmp_path, write_task, monkeypatch):
    """Small batches: pass 2 runs once per run of whole row groups, each row group fetched once, same bytes."""
    import curate.retrieve as retrieve_module
    from curate.sample_metadata import write_laion_sample

    names = ["737-800", "A320", "Cessna 172"]
    write_laion_sample(tmp_path / "meta", 12000, names, plant_rate=0.05, files=1, chunk_rows=4000, row_group_rows=1000)
    task = write_task({"name": "p", "classes": names})
    retrieve(task=task, metadata=[str(tmp_path / "meta")], out=tmp_path / "whole")
    fetched = []
    original = retrieve_module.fetch_rows
    monkeypatch.setattr(retrieve_module, "fetch_rows", lambda con, source, rows: fetched.append(list(rows)) or original(con, source, rows))
    monkeypatch.setattr(retrieve_module, "BATCH_ROWS", 1000)
    monkeypatch.setattr(retrieve_module, "PASS2_ROWS", 2500)
    retrieve(task=task, metadata=[str(tmp_path / "meta")], out=tmp_path / "chunked")
    assert len(fetched) >= 3
    groups = [{row // 1000 for row in rows} for rows in fetched]
    assert all(a.isdisjoint(b) for i, a in enumerate(groups) for b in groups[i + 1:])
    assert [row for rows in fetched for row in rows] == sorted(row for rows in fetched for row in rows)
    assert (tmp_path / "whole" / "manifest.parquet").read_bytes() == (tmp_path / "chunked" / "manifest.parquet").read_bytes()


def test_pass_one_waits_when_pass_two_falls_behind(tmp_path, write_task, monkeypatch):
    """Memory stays bounded: with a slow pass 2, pass 1 runs at most MAX_PENDING (+ the one just queued) ahead."""
    import time

    import curate.retrieve as retrieve_module
    from curate.sample_metadata import write_laion_sample

    names = ["737-800", "A320", "Cessna 172"]
    write_laion_sample(tmp_path / "meta", 12000, names, plant_rate=0.05, files=1, chunk_rows=4000, row_group_rows=1000)
    produced, finished, ahead = [0], [0], []
    original_fetch, original_match = retrieve_module.fetch_rows, retrieve_module._match_file

    def slow_fetch(con, source, rows):
        time.sleep(0.03)
        table = original_fetch(con, source, rows)
        finished[0] += 1
        return table

    def counted_match(*args):
        for chunk in original_match(*args):
            produced[0] += 1
            ahead.append(produced[0] - finished[0])
            yield chunk

    monkeypatch.setattr(retrieve_module, "fetch_rows", slow_fetch)
    monkeypatch.setattr(retrieve_module, "_match_file", counted_match)
    monkeypatch.setattr(retrieve_module, "BATCH_ROWS", 1000)
    monkeypatch.setattr(retrieve_module, "PASS2_ROWS", 1000)
    retrieve(task=write_task({"name": "p", "classes": names}), metadata=[str(tmp_path / "meta")], out=tmp_path / "out")
    assert len(ahead) >= 5 and finished[0] == produced[0]
    assert max(ahead) <= retrieve_module.MAX_PENDING + 1
