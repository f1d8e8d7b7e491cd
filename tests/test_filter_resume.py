"""curate filter's image pass resumes after a kill: finished chunks are read back, the rest is scored, and the
outputs are those of a run that was never stopped. Offline: tiny-clip on CPU, generated images."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers_images import (
    SHAPES_TASK,
    TINY,
    embed_manifest,
    make_image_manifest,
    write_clip_retrieval,
    write_task_file,
)

import curate.filter
import curate.score_store
from curate.errors import CurateError
from curate.filter import filter_images
from curate.score_store import store_folder
from manifests.io import read_manifest

pytestmark = pytest.mark.usefixtures("torch_one_thread")
SCORE = curate.filter.score_embeddings
OPTIONS = {**TINY, "batch_size": 2, "threshold": -1}  # chunks of 4 rows (below): 12 rows are chunks at 0, 4 and 8


@pytest.fixture()
def shapes(tmp_path, monkeypatch):
    monkeypatch.setattr(curate.score_store, "CHUNK_TARGET_ROWS", 4)
    return write_task_file(tmp_path, SHAPES_TASK), make_image_manifest(tmp_path, per_class=[5, 4, 3])


class _Scoring:
    """Counts the rows the image pass scores; with `stop_after` batches, the next one is a Ctrl-C."""

    def __init__(self, monkeypatch, stop_after: int | None = None):
        self.rows, self.batches, self.stop_after = 0, 0, stop_after
        monkeypatch.setattr(curate.filter, "score_embeddings", self)

    def __call__(self, feats, *args, **kwargs):
        if self.batches == self.stop_after:
            raise KeyboardInterrupt
        self.batches += 1
        self.rows += len(feats)
        return SCORE(feats, *args, **kwargs)


def _killed_run(monkeypatch, batches: int, *args, **options) -> _Scoring:
    """Run filter_images with a Ctrl-C after `batches` batches; returns a counter of what later runs score."""
    _Scoring(monkeypatch, stop_after=batches)
    with pytest.raises(KeyboardInterrupt):
        filter_images(*args, **options)
    return _Scoring(monkeypatch)


def _same_outputs(one, other, names=("manifest.parquet",)) -> None:
    for name in names:
        assert pq.read_table(one / name).equals(pq.read_table(other / name)), name


def _eval_copies(tmp_path, manifest, rows):
    """An eval folder holding exact copies of the images of these manifest rows."""
    paths = read_manifest(manifest).column("image_path").to_pylist()
    folder = tmp_path / "eval" / "test" / "a"
    folder.mkdir(parents=True)
    for row in rows:
        shutil.copy(manifest.parent / paths[row], folder / f"copy{row}.png")
    return tmp_path / "eval"


@pytest.mark.parametrize("decontaminate", [False, True])
def test_a_killed_image_pass_resumes_where_it_stopped_with_the_same_outputs(shapes, tmp_path, monkeypatch, decontaminate):
    task, manifest = shapes
    options = dict(OPTIONS)
    if decontaminate:  # copies of a row scored before the kill (its phash and embedding come back from the store)
        options |= dict(decontaminate=_eval_copies(tmp_path, manifest, [1, 9]), phash_distance=8, cosine_threshold=0.9999)
    reference = filter_images(task, manifest, tmp_path / "ref", **options)
    assert not store_folder(tmp_path / "ref").exists()

    out = tmp_path / "out"
    scoring = _killed_run(monkeypatch, 5, task, manifest, out, **options)
    assert not out.exists()
    assert sorted(p.name for p in store_folder(out).glob("chunk-*")) == ["chunk-000000000000.npz", "chunk-000000000004.npz"]

    result = filter_images(task, manifest, out, **options)
    assert scoring.rows == 4  # only the chunk at row 8
    assert result.counts == reference.counts
    assert (result.report["rows_resumed"], reference.report["rows_resumed"]) == (8, 0)
    _same_outputs(out, tmp_path / "ref", ("manifest.parquet", "decontamination.parquet") if decontaminate else ("manifest.parquet",))
    if decontaminate:
        assert result.report["decontamination"]["counts"]["eval_phash"] == 2
    assert not store_folder(out).exists()


def test_scores_of_other_settings_are_refused_or_with_overwrite_discarded(shapes, tmp_path, monkeypatch):
    task, manifest = shapes
    out = tmp_path / "out"
    _killed_run(monkeypatch, 2, task, manifest, out, **OPTIONS)
    with pytest.raises(CurateError, match=r"holds the scores of an interrupted filter run with other settings "
                                          r"\(batch_size, chunk_rows, mode, texts differ\): run it again as it was"):
        filter_images(task, manifest, out, **{**OPTIONS, "mode": "classname", "batch_size": 3})
    scoring = _Scoring(monkeypatch)
    filter_images(task, manifest, out, **{**OPTIONS, "mode": "classname", "overwrite": True})
    assert scoring.rows == 12
    assert not store_folder(out).exists()


def test_overwrite_keeps_the_scores_of_the_same_settings(shapes, tmp_path, monkeypatch):
    """--overwrite replaces a finished OUT; scores of the same settings are what the run would compute again."""
    task, manifest = shapes
    scoring = _killed_run(monkeypatch, 2, task, manifest, tmp_path / "out", **OPTIONS)
    filter_images(task, manifest, tmp_path / "out", **OPTIONS, overwrite=True)
    assert scoring.rows == 8


def test_a_damaged_chunk_file_is_scored_again(shapes, tmp_path, monkeypatch):
    task, manifest = shapes
    out = tmp_path / "out"
    filter_images(task, manifest, tmp_path / "ref", **OPTIONS)
    scoring = _killed_run(monkeypatch, 4, task, manifest, out, **OPTIONS)
    second = store_folder(out) / "chunk-000000000004.npz"
    second.write_bytes(second.read_bytes()[:100])
    filter_images(task, manifest, out, **OPTIONS)
    assert scoring.rows == 8
    _same_outputs(out, tmp_path / "ref")


def test_a_changed_manifest_is_not_resumed(shapes, tmp_path, monkeypatch):
    task, manifest = shapes
    _killed_run(monkeypatch, 2, task, manifest, tmp_path / "out", **OPTIONS)
    table = read_manifest(manifest)
    pq.write_table(table.slice(0, 11), manifest)
    with pytest.raises(CurateError, match=r"\(manifest_bytes, manifest_mtime_ns, rows differ\)"):
        filter_images(task, manifest, tmp_path / "out", **OPTIONS)


def test_another_batch_size_is_not_resumed_even_with_the_same_chunks(shapes, tmp_path, monkeypatch):
    """Batches of 2 and of 4 make the same 4-row chunks, but not the same batches (scores may differ in the last bits)."""
    task, manifest = shapes
    _killed_run(monkeypatch, 2, task, manifest, tmp_path / "out", **OPTIONS)
    with pytest.raises(CurateError, match=r"\(batch_size differ\)"):
        filter_images(task, manifest, tmp_path / "out", **{**OPTIONS, "batch_size": 4})


def test_a_chunk_that_cannot_be_read_whole_adds_nothing(shapes, tmp_path, monkeypatch):
    """A chunk without the phash a decontaminating run needs is scored again, and its read errors are not kept."""
    task, manifest = shapes
    options = {**OPTIONS, "decontaminate": _eval_copies(tmp_path, manifest, [9]), "phash_distance": 8, "cosine_threshold": 0.9999}
    paths = read_manifest(manifest).column("image_path").to_pylist()
    image = manifest.parent / paths[1]
    good = image.read_bytes()
    image.write_bytes(b"not an image")
    scoring = _killed_run(monkeypatch, 2, task, manifest, tmp_path / "out", **options)
    first = store_folder(tmp_path / "out") / "chunk-000000000000.npz"
    with np.load(first) as saved:
        assert saved["bad_rows"].tolist() == [1]
        kept = {name: saved[name] for name in ("scores", "bad_rows", "bad_errors")}
    np.savez(first, **kept)  # no phash
    image.write_bytes(good)
    result = filter_images(task, manifest, tmp_path / "out", **options)
    assert scoring.rows == 12 and result.counts["unreadable"] == 0


def test_a_store_folder_without_chunks_or_fingerprint_is_no_obstacle(shapes, tmp_path, monkeypatch):
    """Killed between making the folder and writing its fingerprint, or while writing its first chunk: nothing was
    scored, nothing is refused."""
    task, manifest = shapes
    store_folder(tmp_path / "out").mkdir()
    (store_folder(tmp_path / "out") / "partial-000000000000.npz").write_bytes(b"cut short")
    scoring = _Scoring(monkeypatch)
    filter_images(task, manifest, tmp_path / "out", **OPTIONS)
    assert scoring.rows == 12 and not store_folder(tmp_path / "out").exists()


def test_a_run_killed_in_decontamination_resumes_with_the_same_outputs(shapes, tmp_path, monkeypatch):
    """Decontamination copies the store's embeddings: moving the passing rows to the front in place, as it does
    with its own spill, would leave the store's rows out of place for the resumed run."""
    import curate.decontaminate

    task, manifest = shapes
    options = {**OPTIONS, "decontaminate": _eval_copies(tmp_path, manifest, [9]), "phash_distance": 0,
               "cosine_threshold": 0.97, "percentile": 50, "threshold": None}
    filter_images(task, manifest, tmp_path / "ref", **options)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(curate.decontaminate, "decontaminate", killed)
        with pytest.raises(KeyboardInterrupt):
            filter_images(task, manifest, tmp_path / "out", **options)
    scoring = _Scoring(monkeypatch)
    filter_images(task, manifest, tmp_path / "out", **options)
    assert scoring.rows == 0
    _same_outputs(tmp_path / "out", tmp_path / "ref", ("manifest.parquet", "decontamination.parquet"))


def test_a_lost_embeddings_file_is_not_taken_for_zeros(shapes, tmp_path, monkeypatch):
    """Without the embeddings of the saved chunks, their rows are scored again (zeros would miss duplicates)."""
    task, manifest = shapes
    options = {**OPTIONS, "decontaminate": _eval_copies(tmp_path, manifest, [1]), "phash_distance": 0,
               "cosine_threshold": 0.97, "percentile": 50, "threshold": None}
    filter_images(task, manifest, tmp_path / "ref", **options)
    scoring = _killed_run(monkeypatch, 4, task, manifest, tmp_path / "out", **options)
    (store_folder(tmp_path / "out") / "embeddings.f16").unlink()
    filter_images(task, manifest, tmp_path / "out", **options)
    assert scoring.rows == 12
    _same_outputs(tmp_path / "out", tmp_path / "ref", ("manifest.parquet", "decontamination.parquet"))


def test_the_kind_of_device_is_part_of_the_fingerprint():
    """CUDA encodes in float16, the CPU in float32: their scores are not mixed (the GPU's index does not matter)."""
    from curate.filter import _score_fingerprint

    def fingerprint(device):
        return _score_fingerprint(manifest_path, table, "tiny-clip", None, "domain", np.eye(2), 8, device, False)

    manifest_path = Path(__file__)
    table = pa.table({"uid": ["a"]})
    assert fingerprint("cuda:0") == fingerprint("cuda:1") != fingerprint("cpu")


def test_a_finished_run_of_the_embeddings_path_removes_a_stale_image_store(shapes, tmp_path, monkeypatch):
    from curate.models import load_clip

    task, manifest = shapes
    _killed_run(monkeypatch, 2, task, manifest, tmp_path / "out", **OPTIONS)
    assert store_folder(tmp_path / "out").exists()
    table = read_manifest(manifest)
    folder = write_clip_retrieval(tmp_path / "emb", embed_manifest(load_clip("tiny-clip", None), manifest),
                                  table.column("url").to_pylist())
    filter_images(task, manifest, tmp_path / "out", **OPTIONS, embeddings=folder)
    assert (tmp_path / "out" / "manifest.parquet").exists() and not store_folder(tmp_path / "out").exists()


SLOW_FILTER = """
import sys, time
import curate.embeddings, curate.score_store
curate.score_store.CHUNK_TARGET_ROWS = 4
read = curate.embeddings.ImageRows.__getitem__
curate.embeddings.ImageRows.__getitem__ = lambda self, index: (time.sleep(0.2), read(self, index))[1]
from curate.cli import main
sys.argv = ["curate", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_sigterm_stops_like_ctrl_c_and_the_run_resumes(shapes, tmp_path, monkeypatch, workers):
    """A scheduler's SIGTERM (preemption) to the process group unwinds: exit status 143, no staging folder left,
    no traceback (the loader's workers die of it too), the saved chunks kept for the next run. Python's default
    died on the spot and left the staging folder."""
    task, manifest = shapes
    out = tmp_path / "out"
    command = [sys.executable, "-c", SLOW_FILTER, "filter", "-t", str(task), "-m", str(manifest), "-o", str(out),
               "--clip-model", "tiny-clip", "--device", "cpu", "--workers", workers, "--batch-size", "2", "--threshold", "-1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    first = store_folder(out) / "chunk-000000000000.npz"
    deadline = time.monotonic() + 120
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143 and "Traceback" not in stderr.decode(), stderr.decode()[-3000:]
    assert first.exists() and not out.exists() and not list(tmp_path.glob(".out.partial-*"))
    scoring = _Scoring(monkeypatch)
    filter_images(task, manifest, out, **OPTIONS)
    assert 0 < scoring.rows <= 8
