"""`curate download` through the real CLI against a local HTTP server (127.0.0.1), img2dataset for real.

One module-wide server serves 24 generated PNG/JPEG images; the manifest also names 3 missing
files (404), one truncated JPEG and one row without URL. Shards of 8 rows: 4 shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from helpers_cli import assert_cli_error
from helpers_http import serve_images, write_image, write_truncated_jpeg
from PIL import Image

from curate.cli import cli
from curate.download import download
from curate.errors import CurateError
from manifests import read_manifest, read_report, uid_for_url, write_manifest
from manifests.images import read_image

CLASSES = ["red circle", "green/square", "blue: triangle"]
COLORS = [(220, 30, 30), (30, 200, 30), (30, 30, 220)]
GOOD, MISSING, TRUNCATED = 24, ("gone-1.jpg", "gone-2.png", "gone-3.jpg"), "broken.jpg"
PER_SHARD = 8
SIZE = 48


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("www")
    for i in range(GOOD):
        write_image(folder / f"img-{i:02d}.{'png' if i % 2 else 'jpg'}", COLORS[i % 3], size=(30 + i, 20 + 2 * i))
    write_truncated_jpeg(folder / TRUNCATED)
    with serve_images(folder) as (base_url, log):
        yield folder, base_url, log


@pytest.fixture(scope="module")
def source_manifest(server, tmp_path_factory):
    """29 rows: good images interleaved with 404s, the truncated JPEG and a row without url."""
    folder, base_url, _ = server
    names = [f"img-{i:02d}.{'png' if i % 2 else 'jpg'}" for i in range(GOOD)]
    for position, bad in zip((3, 11, 19, 26), (*MISSING, TRUNCATED)):
        names.insert(position, bad)
    names.insert(14, None)
    rows = []
    for i, name in enumerate(names):
        url = f"{base_url}/{name}" if name else None
        rows.append({
            "uid": uid_for_url(url) if url else "no-url-row", "label": i % 3, "class_name": CLASSES[i % 3],
            "source": "retrieved", "caption": f"a photo of a {CLASSES[i % 3]} #{i}", "url": url,
            "matched_text": CLASSES[i % 3], "width": 100 + i, "height": 50 + i, "laion_similarity": 0.3 + i / 100,
        })
    path = tmp_path_factory.mktemp("in") / "manifest.parquet"
    write_manifest(pa.Table.from_pylist(rows), path)
    return path, rows


def _cli(*args: str):
    return CliRunner().invoke(cli, ["download", *args], catch_exceptions=False)


def _download_args(manifest: Path, out: Path, *extra: str) -> list[str]:
    return ["--manifest", str(manifest), "--out", str(out), "--threads", "4", "--image-size", str(SIZE),
            "--samples-per-shard", str(PER_SHARD), "--timeout", "5", *extra]


@pytest.fixture(scope="module")
def files_run(server, source_manifest, tmp_path_factory):
    _, _, log = server
    log.clear()
    out = tmp_path_factory.mktemp("dl") / "files"
    result = _cli(*_download_args(source_manifest[0], out))
    assert result.exit_code == 0, result.output
    return out, result, log.paths


def test_download_files_counts_columns_and_images(server, source_manifest, files_run):
    folder, _, _ = server
    _, rows = source_manifest
    out, result, _ = files_run
    good = [r for r in rows if r["url"] and "img-" in r["url"]]
    assert f"downloaded {GOOD} of {len(rows)} images" in result.stdout
    manifest = read_manifest(out)
    got = manifest.to_pylist()
    assert [r["uid"] for r in got] == [r["uid"] for r in good]  # input order
    for mine, theirs in zip(got, good):
        for column in ("label", "class_name", "source", "caption", "url", "matched_text", "width", "height"):
            assert mine[column] == theirs[column], column
        assert mine["laion_similarity"] == pytest.approx(theirs["laion_similarity"])
        served = (folder / theirs["url"].rsplit("/", 1)[1]).read_bytes()
        assert mine["sha256"] == hashlib.sha256(served).hexdigest()  # of the downloaded bytes
        assert (mine["image_width"], mine["image_height"]) == (SIZE, SIZE)
        assert mine["image_path"].startswith("images/") and mine["image_path"].endswith(".jpg")
        with Image.open(out / mine["image_path"]) as image:
            assert image.size == (SIZE, SIZE)
            image.load()
    assert "shard" not in manifest.column_names and "key" not in manifest.column_names


def test_download_failed_list_and_report(source_manifest, files_run):
    _, rows = source_manifest
    out, _, requests = files_run
    failed = pq.read_table(out / "failed.parquet").to_pylist()
    by_name = {(r["url"] or "").rsplit("/", 1)[-1]: r for r in failed}
    assert set(by_name) == {*MISSING, TRUNCATED, ""}
    assert [r["uid"] for r in failed] == [r["uid"] for r in rows if not (r["url"] and "img-" in r["url"])]
    for name in MISSING:
        assert (by_name[name]["status"], by_name[name]["error_message"]) == ("failed_to_download", "HTTP Error 404: File not found")
    # img2dataset (OpenCV) cannot decode a JPEG cut in half: the download succeeds, the resize fails
    assert (by_name[TRUNCATED]["status"], by_name[TRUNCATED]["error_message"]) == ("failed_to_resize", "Image decoding error")
    assert (by_name[""]["status"], by_name[""]["error_message"]) == ("skipped", "missing url")

    report = read_report(out)
    assert report["counts"] == {"input_rows": 29, "missing_url": 1, "not_web_url": 0, "attempted": 28, "success": 24, "failed": 5,
                                "failed_to_download": 3, "failed_to_resize": 1}
    assert report["top_errors"][0] == {"error": "HTTP Error 404: File not found", "count": 3}
    assert {e["error"] for e in report["top_errors"]} == {"HTTP Error 404: File not found", "Image decoding error", "missing url"}
    per_class = {c["class_name"]: (c["label"], c["input"], c["success"]) for c in report["per_class"]}
    expected = {}
    for i, row in enumerate(rows):
        label, n, ok = expected.get(row["class_name"], (i % 3, 0, 0))
        expected[row["class_name"]] = (label, n + 1, ok + int(bool(row["url"]) and "img-" in row["url"]))
    assert per_class == expected
    assert report["shards"] == {"total": 4, "skipped": 0, "samples_per_shard": PER_SHARD}
    assert report["resumed"] is False and report["img2dataset"]["enable_wandb"] is False
    assert report["throughput"]["urls"] == 28 and report["throughput"]["images"] == 24
    assert sorted(requests) == sorted(f"/{r['url'].rsplit('/', 1)[1]}" for r in rows if r["url"])  # each URL once
    assert not (out / "img2dataset_input.parquet").exists()


def test_resume_fetches_only_the_unfinished_shard(server, source_manifest, files_run, tmp_path):
    """An interrupted run (shard 00001 unfinished, no final manifest) is resumed; only shard 1 is fetched again."""
    _, _, log = server
    manifest_path, rows = source_manifest
    first, _, _ = files_run
    out = tmp_path / "resumed"
    shutil.copytree(first, out)
    for name in ("manifest.parquet", "report.json", "failed.parquet", "images/00001_stats.json"):
        (out / name).unlink()
    (out / "images/00001/999999.jpg").write_bytes(b"stale leftover of the interrupted run")

    other_options = _cli("--manifest", str(manifest_path), "--out", str(out), "--image-size", "32",
                         "--samples-per-shard", str(PER_SHARD))
    assert other_options.exit_code == 2 and "interrupted download of other rows or image options" in other_options.stderr

    log.clear()
    result = _cli(*_download_args(manifest_path, out))
    assert result.exit_code == 0, result.output
    sendable = [r for r in rows if r["url"]]
    shard_1 = sendable[PER_SHARD: 2 * PER_SHARD]
    assert sorted(log.paths) == sorted(f"/{r['url'].rsplit('/', 1)[1]}" for r in shard_1)
    assert "3 of 4 shards already done" in result.stdout
    assert read_manifest(out).to_pylist() == read_manifest(first).to_pylist()
    assert pq.read_table(out / "failed.parquet").equals(pq.read_table(first / "failed.parquet"))
    assert not (out / "images/00001/999999.jpg").exists()
    report = read_report(out)
    assert report["resumed"] is True and report["shards"]["skipped"] == 3
    assert report["throughput"]["urls"] == len(shard_1)


def test_all_shards_done_but_no_manifest_rebuilds_without_fetching(server, source_manifest, files_run, tmp_path):
    _, _, log = server
    out = tmp_path / "crashed-at-the-end"
    shutil.copytree(files_run[0], out)
    (out / "manifest.parquet").unlink()
    log.clear()
    result = _cli(*_download_args(source_manifest[0], out))
    assert result.exit_code == 0, result.output
    assert log.paths == []
    assert read_manifest(out).to_pylist() == read_manifest(files_run[0]).to_pylist()
    assert read_report(out)["shards"]["skipped"] == 4


def test_finished_output_is_refused_without_overwrite(source_manifest, files_run):
    out, _, _ = files_run
    before = (out / "manifest.parquet").stat().st_mtime_ns
    result = _cli(*_download_args(source_manifest[0], out))
    message = f"curate: error: output directory {out} already holds a finished download (use --overwrite to replace it)"
    assert_cli_error(result, message)
    assert result.stderr.strip() == message
    assert (out / "manifest.parquet").stat().st_mtime_ns == before


def test_webdataset_output_matches_files_output(source_manifest, files_run, tmp_path):
    out = tmp_path / "wds"
    out.mkdir()
    (out / "manifest.parquet").write_bytes(b"a finished earlier download")  # replaced thanks to --overwrite
    result = _cli(*_download_args(source_manifest[0], out, "--output-format", "webdataset", "--overwrite"))
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    files_manifest = read_manifest(files_run[0])
    assert manifest.column("uid").equals(files_manifest.column("uid"))
    assert "image_path" not in manifest.column_names
    assert sorted(set(manifest.column("shard").to_pylist())) == [f"shards/0000{i}.tar" for i in range(4)]
    for row, files_row in zip(manifest.to_pylist(), files_manifest.to_pylist()):
        data, ext = read_image(row, out)
        assert ext == "jpg"
        assert data == read_image(files_row, files_run[0])[0]  # same bytes as the files format
    assert read_report(out)["files"]["images"] == "shards"


def test_png_encoding_downloads(source_manifest, tmp_path):
    """img2dataset's default quality (95) is no png compression level (0-9): it refused every png download."""
    rows = [row for row in source_manifest[1] if row["url"] and "img-" in row["url"]][:4]
    manifest = tmp_path / "four.parquet"
    write_manifest(pa.Table.from_pylist(rows), manifest)
    result = _cli(*_download_args(manifest, tmp_path / "png", "--encode-format", "png"))
    assert result.exit_code == 0, result.output
    downloaded = read_manifest(tmp_path / "png").to_pylist()
    assert [row["uid"] for row in downloaded] == [row["uid"] for row in rows]
    for row in downloaded:
        data, ext = read_image(row, tmp_path / "png")
        assert ext == "png" and data.startswith(b"\x89PNG")


def test_stdout_holds_only_the_summary(source_manifest, tmp_path):
    """img2dataset's worker processes print statistics: they go to stderr with its other output."""
    curate = Path(sys.executable).parent / "curate"
    done = subprocess.run([str(curate), "download", *_download_args(source_manifest[0], tmp_path / "d")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("downloaded 24 of 29 images to ") and done.stdout.count("\n") == 1, done.stdout
    assert "worker  - success" in done.stderr
    closed = subprocess.run([str(curate), "download", *_download_args(source_manifest[0], tmp_path / "e")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300,
                            preexec_fn=lambda: os.close(1))  # run as `curate download ... 1>&-`
    assert "Traceback" not in closed.stderr and (tmp_path / "e" / "manifest.parquet").exists(), closed.stderr[-2000:]


def test_bad_input_and_options(tmp_path, source_manifest):
    no_url = tmp_path / "no-url.parquet"
    write_manifest(pa.table({"uid": ["a"], "label": [0], "class_name": ["x"], "source": ["synthetic"], "caption": ["c"]}), no_url)
    out = tmp_path / "never"
    result = _cli("--manifest", str(no_url), "--out", str(out))
    message = f"curate: error: manifest {no_url} has no 'url' column: download needs a retrieved manifest (curate retrieve)"
    assert_cli_error(result, message, out)
    assert result.stderr.strip() == message

    own_row = tmp_path / "own-row.parquet"
    write_manifest(read_manifest(source_manifest[0]).append_column("__row", pa.array([0] * len(source_manifest[1]))), own_row)
    assert_cli_error(_cli("--manifest", str(own_row), "--out", str(out)), "has a column named '__row', which download uses", out)

    missing = _cli("--manifest", str(tmp_path / "nope.parquet"), "--out", str(out))
    assert_cli_error(missing, "manifest not found", out)

    stranger = tmp_path / "not-a-download"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    refused = _cli("--manifest", str(source_manifest[0]), "--out", str(stranger))
    assert_cli_error(refused, "is not a download folder")
    assert (stranger / "notes.txt").read_text() == "mine"

    inside = tmp_path / "inside"
    inside.mkdir()
    own = inside / "manifest.parquet"
    shutil.copy(source_manifest[0], own)
    refused = _cli("--manifest", str(own), "--out", str(inside), "--overwrite")
    assert_cli_error(refused, f"output directory {inside} holds the input {own}")
    assert read_manifest(own).num_rows == len(source_manifest[1])

    with pytest.raises(CurateError, match="unknown resize mode 'squash'"):
        download(source_manifest[0], tmp_path / "x", resize_mode="squash")
    with pytest.raises(CurateError, match="out of range: threads"):
        download(source_manifest[0], tmp_path / "x", threads=0)
    assert not (tmp_path / "x").exists()


def test_only_web_urls_are_fetched(server, tmp_path):
    """img2dataset opens URLs with urllib: file: URLs read local files, data: URLs decode inline bytes, and both
    became "downloaded" images."""
    import base64

    folder, base_url, log = server
    private = tmp_path / "private.jpg"
    shutil.copy(folder / "img-00.jpg", private)
    inline = "data:image/jpeg;base64," + base64.b64encode(private.read_bytes()).decode()
    urls = [f"{base_url}/img-02.jpg", private.as_uri(), inline, f"{base_url.replace('http', 'HTTP', 1)}/img-04.jpg",
            "ftp://127.0.0.1/x.jpg"]
    manifest = tmp_path / "m.parquet"
    write_manifest(pa.table({"uid": [f"u{i}" for i in range(5)], "label": [0] * 5, "class_name": ["x"] * 5,
                             "source": ["retrieved"] * 5, "caption": ["c"] * 5, "url": urls}), manifest)
    log.clear()
    result = _cli(*_download_args(manifest, tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert read_manifest(tmp_path / "out").column("uid").to_pylist() == ["u0", "u3"]
    assert sorted(log.paths) == ["/img-02.jpg", "/img-04.jpg"]
    failed = pq.read_table(tmp_path / "out" / "failed.parquet").select(["uid", "status", "error_message"]).to_pylist()
    assert failed == [{"uid": f"u{i}", "status": "skipped", "error_message": "not an http(s) url"} for i in (1, 2, 4)]
    counts = read_report(tmp_path / "out")["counts"]
    assert (counts["missing_url"], counts["not_web_url"], counts["attempted"]) == (0, 3, 2)


def test_out_with_glob_characters_is_refused(source_manifest, tmp_path):
    """img2dataset found finished shards with a glob: out 'exp[1]' took exp1's finished shards for its own."""
    out = tmp_path / "exp[1]"
    assert_cli_error(_cli(*_download_args(source_manifest[0], out)),
                     f"curate: error: output path {out} holds a glob character (* ? [)", out)


def test_a_second_download_into_a_folder_being_written_is_refused(source_manifest, files_run, tmp_path):
    """Two runs into one folder deleted each other's shards; one left a shard marked done without its results."""
    from manifests.io import folder_lock

    out = tmp_path / "busy"
    shutil.copytree(files_run[0], out)
    (out / "manifest.parquet").unlink()
    (out / "images/00001_stats.json").unlink()
    with folder_lock(out):  # as the live run holds it
        result = _cli(*_download_args(source_manifest[0], out))
    assert_cli_error(result, f"curate: error: another curate download is writing to {out}: wait for it to end")
    assert (out / "images/00001.parquet").exists()  # its shards untouched

    (out / "images/00001.parquet").unlink()
    (out / "images/00001_stats.json").write_text("{}")  # a shard marked done whose results are gone
    assert_cli_error(_cli(*_download_args(source_manifest[0], out)),
                     f"curate: error: img2dataset output in {out / 'images'} is damaged: shard 00001's results cannot be read")


def test_overwrite_locks_the_folder_it_writes_not_the_one_it_deleted(source_manifest, files_run, tmp_path, monkeypatch):
    """--overwrite locked OUT, deleted it, and wrote into a new OUT that another run had made meanwhile, unlocked."""
    import contextlib

    import curate.download
    from manifests.io import folder_lock

    out = tmp_path / "raced"
    shutil.copytree(files_run[0], out)
    remove_output = curate.download.remove_output
    with contextlib.ExitStack() as other_run:
        def deleted_then_made_by_another_run(path):
            remove_output(path)
            path.mkdir()
            other_run.enter_context(folder_lock(path))

        monkeypatch.setattr(curate.download, "remove_output", deleted_then_made_by_another_run)
        result = _cli(*_download_args(source_manifest[0], out, "--overwrite"))
    assert_cli_error(result, f"another curate download is writing to {out}")


def test_an_output_holding_the_input_or_a_foreign_state_is_named(source_manifest, tmp_path):
    inside = tmp_path / "inside"
    inside.mkdir()
    own = inside / "manifest.parquet"
    shutil.copy(source_manifest[0], own)  # not a "finished download", and --overwrite would not help
    assert_cli_error(_cli("--manifest", str(own), "--out", str(inside)), f"output directory {inside} holds the input {own}")
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "download_state.json").write_text("[]")
    assert_cli_error(_cli(*_download_args(source_manifest[0], odd)), f"output directory {odd} already exists and is not a download folder")


def test_interrupted_output_with_no_resume_is_refused(source_manifest, tmp_path):
    out = tmp_path / "half"
    out.mkdir()
    (out / "download_state.json").write_text(json.dumps({"stage": "download", "fingerprint": "x"}))
    result = _cli(*_download_args(source_manifest[0], out, "--no-resume"))
    assert result.exit_code == 2 and "holds an interrupted download (resume it, or use --overwrite)" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("signal_name", "status", "said"), [("SIGINT", 1, "\nAborted!\n"), ("SIGTERM", 143, "")])
def test_interrupted_run_resumes_only_missing_shards(tmp_path, signal_name, status, said):
    """Ctrl-C (SIGINT), or a scheduler's SIGTERM, to a real `curate download` after its first shard; the re-run
    fetches only the rest."""
    import os
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "www").mkdir()
    for i in range(20):
        write_image(tmp_path / "www" / f"{i}.jpg", COLORS[i % 3])
    with serve_images(tmp_path / "www", delay=0.25) as (base_url, log):
        urls = [f"{base_url}/{i}.jpg" for i in range(20)]
        write_manifest(pa.table({"uid": [uid_for_url(u) for u in urls], "label": [i % 3 for i in range(20)],
                                 "class_name": [CLASSES[i % 3] for i in range(20)], "source": ["retrieved"] * 20,
                                 "caption": ["c"] * 20, "url": urls}), tmp_path / "m.parquet")
        out = tmp_path / "out"
        args = ["download", "--manifest", str(tmp_path / "m.parquet"), "--out", str(out), "--threads", "1",
                "--samples-per-shard", "5", "--image-size", "16"]
        root = Path(__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
        process = subprocess.Popen([sys.executable, "-m", "curate.cli", *args], cwd=root, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + 120
        while not (out / "images" / "00000_stats.json").exists() and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
        os.killpg(process.pid, getattr(signal, signal_name))  # as a terminal or a scheduler does: the whole group
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == status and said in stderr.decode(), stderr.decode()[-2000:]
        if signal_name == "SIGTERM":
            assert "Traceback" not in stderr.decode(), stderr.decode()[-2000:]
        assert not (out / "manifest.parquet").exists() and not (out / "images" / "_tmp").exists()
        done = sorted(p.name[:5] for p in (out / "images").glob("*_stats.json"))
        assert 1 <= len(done) < 4
        first_requests = set(log.paths)

        log.clear()
        result = _cli(*args[1:])
        assert result.exit_code == 0, result.output
        unfinished = [u for i, u in enumerate(urls) if f"{i // 5:05d}" not in done]
        assert sorted(log.paths) == sorted(u.replace(base_url, "") for u in unfinished)
        assert {u.replace(base_url, "") for u in urls} - set(log.paths) <= first_requests
        manifest = read_manifest(out)
        assert manifest.column("uid").to_pylist() == [uid_for_url(u) for u in urls]
        assert all((out / p).exists() for p in manifest.column("image_path").to_pylist())
        assert len(list((out / "images").rglob("*.jpg"))) == 20


def test_exported_img2dataset_script_downloads_from_where_the_export_lies(source_manifest, tmp_path):
    manifest, rows = source_manifest
    quoted = tmp_path / "m" / "manifest.parquet"  # a column name with a quote must not break the script
    quoted.parent.mkdir()
    write_manifest(read_manifest(manifest).append_column("it's", pa.array(["x"] * len(rows))), quoted)
    manifest = quoted
    result = CliRunner().invoke(cli, ["export", "--manifest", str(manifest), "--format", "img2dataset",
                                      "--out", str(tmp_path / "exp")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    moved = tmp_path / "moved"
    (tmp_path / "exp").rename(moved)  # the script finds its input wherever the folder ends up
    script = moved / "img2dataset_command.sh"
    assert "'[\"uid\", \"label\", \"class_name\", \"source\", \"matched_text\", \"laion_similarity\", \"it'\"'\"'s\"]'" in script.read_text()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([str(script), "--processes_count", "1", "--thread_count", "4", "--timeout", "5"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    saved = pd.concat([pd.read_parquet(p) for p in sorted((moved / "images").glob("*.parquet"))])
    assert (saved["status"] == "success").sum() == GOOD
    by_url = dict(zip(saved["url"], saved["uid"], strict=True))
    assert all(by_url[row["url"]] == row["uid"] for row in rows if row["url"])  # additional columns saved
