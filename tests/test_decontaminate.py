"""Decontamination: planted copies of eval images and in-train duplicates are found, nothing else.

The builtin tiny-clip has random weights: its embeddings are not semantic, and unrelated generated
images reach cosine ~0.99 with it (mean ~0.95). The tests therefore set the CLIP cosine threshold to
0.9999 (only pixel-identical copies) and let phash find the resized / recompressed copies.
The generated 6x6 colour grids land at phash distance 0-6 from their JPEG q75 / resized copies
(measured over 30 images; unrelated ones >= 18 apart), so the planted tests use a radius of 8;
the default radius 4 is tested on synthetic hashes.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers_cli import assert_cli_error
from helpers_images import (
    SHAPES_TASK,
    TINY,
    add_rows,
    embed_manifest,
    make_image,
    make_image_manifest,
    write_clip_retrieval,
    write_task_file,
)
from PIL import Image

from curate.cli import cli
from curate.decontaminate import _Finder, decontaminate
from curate.filter import filter_images
from manifests.io import read_manifest, write_manifest

STRICT = 0.9999  # tiny-clip: only identical pixels are CLIP duplicates
RADIUS = 8


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture()
def planted(tmp_path):
    """Eval folder (split/class/*.png, 6 images), a train manifest of 9 unrelated images plus three planted
    rows: a resized JPEG copy of eval image 0, a recompressed JPEG copy of eval image 1, and a JPEG copy
    of the first train row placed last."""
    eval_dir = tmp_path / "eval"
    evals = [make_image(eval_dir / "test" / f"class{i % 2}" / f"e{i}.png", seed=500 + i, size=64) for i in range(6)]
    manifest = make_image_manifest(tmp_path, per_class=3)
    images = manifest.parent / "images"
    Image.open(evals[0]).convert("RGB").resize((48, 48), Image.BICUBIC).save(images / "copy-resized.jpg", quality=85)
    Image.open(evals[1]).convert("RGB").save(images / "copy-recompressed.jpg", quality=75)
    first = read_manifest(manifest).slice(0, 1).to_pylist()[0]
    Image.open(manifest.parent / first["image_path"]).convert("RGB").save(images / "train-dup.jpg", quality=90)
    add_rows(manifest, [
        {"uid": "copy-resized", "label": 0, "class_name": "red circle", "image_path": "images/copy-resized.jpg"},
        {"uid": "copy-recompressed", "label": 1, "class_name": "green square", "image_path": "images/copy-recompressed.jpg"},
        {"uid": "train-dup", "label": 2, "class_name": "blue triangle", "image_path": "images/train-dup.jpg"},
    ])
    return write_task_file(tmp_path, SHAPES_TASK), manifest, eval_dir, first["uid"]


def test_filter_drops_exactly_the_planted_duplicates(planted, tmp_path):
    task, manifest, eval_dir, first_uid = planted
    result = filter_images(task, manifest, tmp_path / "out", threshold=-1, decontaminate=eval_dir,
                           cosine_threshold=STRICT, phash_distance=RADIUS, **TINY)
    assert result.counts["decontaminated"] == 3 and result.counts["kept"] == 9
    kept = set(read_manifest(tmp_path / "out").column("uid").to_pylist())
    assert not kept & {"copy-resized", "copy-recompressed", "train-dup"} and first_uid in kept
    pairs = {row["uid"]: row for row in pq.read_table(tmp_path / "out" / "decontamination.parquet").to_pylist()}
    assert pairs["copy-resized"]["match"] == "test/class0/e0.png" and pairs["copy-resized"]["match_kind"] == "eval"
    assert pairs["copy-recompressed"]["match"] == "test/class1/e1.png"
    assert pairs["train-dup"]["match"] == first_uid and pairs["train-dup"]["match_kind"] == "train"
    assert {row["method"] for row in pairs.values()} == {"phash"}
    assert all(row["hamming"] <= RADIUS and row["cosine"] is None for row in pairs.values())
    report = json.loads((tmp_path / "out" / "report.json").read_text())["decontamination"]
    assert report["counts"] == {"eval_phash": 2, "eval_clip": 0, "train_phash": 1, "train_clip": 0,
                                "unreadable": 0, "dropped": 3, "kept": 9}
    assert report["eval_images"] == 6 and len(report["pairs"]) == 3
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "decontamination.parquet", "manifest.parquet", "report.json", "score_hist.png"]  # no spill file left in OUT


def test_training_embeddings_wait_in_a_file_beside_the_output_not_in_memory(planted, tmp_path, monkeypatch):
    import curate.decontaminate as decontaminate_module

    task, manifest, eval_dir, _ = planted
    seen = []
    original = decontaminate_module.decontaminate

    def spy(*args, train_embeddings=None, **kwargs):
        seen.append((type(train_embeddings), train_embeddings.filename, train_embeddings.shape))
        return original(*args, train_embeddings=train_embeddings, **kwargs)

    monkeypatch.setattr(decontaminate_module, "decontaminate", spy)
    result = filter_images(task, manifest, tmp_path / "out", threshold=-1, decontaminate=eval_dir,
                           cosine_threshold=STRICT, phash_distance=RADIUS, **TINY)
    [(kind, filename, shape)] = seen
    assert kind is np.memmap and filename is None and shape[0] == 12  # a nameless file: nothing to clean up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "out", "task.yaml", "train"]
    assert result.counts["decontaminated"] == 3


def test_relative_paths_from_the_working_folder(planted, tmp_path, monkeypatch):
    task, manifest, eval_dir, _ = planted
    monkeypatch.chdir(tmp_path)
    result = filter_images(task, manifest.relative_to(tmp_path), "out-rel", threshold=-1, decontaminate="eval",
                           cosine_threshold=STRICT, phash_distance=RADIUS, **TINY)
    report = json.loads((tmp_path / "out-rel" / "report.json").read_text())["decontamination"]
    assert report["eval_unreadable"] == 0 and report["counts"]["eval_phash"] == 2
    assert result.counts["decontaminated"] == 3


def test_decontamination_runs_after_the_score_rule_and_before_the_cap(planted, tmp_path):
    task, manifest, eval_dir, _ = planted
    result = filter_images(task, manifest, tmp_path / "out", threshold=-1, per_class_cap=2,
                           decontaminate=eval_dir, cosine_threshold=STRICT, phash_distance=RADIUS, **TINY)
    assert result.counts["decontaminated"] == 3 and result.counts["kept"] == 6  # 2 clean rows per class
    assert result.counts["capped"] == 3
    # a threshold just above train-dup's score: the score rule drops it, so decontamination never sees it
    scored = read_manifest(filter_images(task, manifest, tmp_path / "scores", threshold=-1, **TINY).out).to_pandas()
    scores = dict(zip(scored.uid, scored.clip_score, strict=True))
    cut = float(scores["train-dup"]) + 1e-4
    assert scores["copy-resized"] > cut and scores["copy-recompressed"] > cut  # the eval copies pass the score rule
    below = sum(score < cut for score in scores.values())
    cut_run = filter_images(task, manifest, tmp_path / "cut", threshold=cut, per_class_cap=2,
                            decontaminate=eval_dir, cosine_threshold=STRICT, phash_distance=RADIUS, **TINY)
    assert cut_run.counts["dropped_score"] == below  # train-dup among them
    assert cut_run.counts["decontaminated"] == 2  # one fewer: only the two eval copies
    pairs = {row["uid"] for row in cut_run.report["decontamination"]["pairs"]}
    assert pairs == {"copy-resized", "copy-recompressed"}
    assert cut_run.counts["kept"] == 12 - below - 2 - cut_run.counts["capped"]


def test_decontaminate_alone_embeds_the_training_images_itself(planted):
    task, manifest, eval_dir, _ = planted
    table = read_manifest(manifest)
    result = decontaminate(table, manifest.parent, eval_dir, cosine_threshold=STRICT, phash_distance=RADIUS, **TINY)
    dropped = {uid for uid, keep in zip(table.column("uid").to_pylist(), result.keep, strict=True) if not keep}
    assert dropped == {"copy-resized", "copy-recompressed", "train-dup"}
    loose = decontaminate(table, manifest.parent, eval_dir, cosine_threshold=0.95, phash_distance=RADIUS, **TINY)
    assert loose.counts["dropped"] > 3  # what a random tiny model does at the ViT-B-16 default


def test_an_eval_file_name_that_is_not_utf8_is_written_escaped(planted):
    task, manifest, eval_dir, _ = planted
    folder = eval_dir / "test" / "class0"
    os.rename(folder / "e0.png", os.path.join(os.fsencode(folder), b"caf\xe9.png"))  # bytes no UTF-8 decoder takes
    table = read_manifest(manifest)
    result = decontaminate(table, manifest.parent, eval_dir, cosine_threshold=STRICT, phash_distance=RADIUS, **TINY)
    matched = dict(zip(result.pairs.column("uid").to_pylist(), result.pairs.column("match").to_pylist(), strict=True))
    assert matched["copy-resized"] == "test/class0/caf\\xe9.png"


def test_clip_signal_on_precomputed_embeddings(tmp_path):
    """No pixels on the embeddings path: only CLIP similarity. An eval image identical to a training
    image and a training embedding repeated under another url are found."""
    from curate.models import load_clip

    manifest = make_image_manifest(tmp_path, per_class=2)
    table = read_manifest(manifest)
    feats = embed_manifest(load_clip("tiny-clip", None), manifest)
    files = [manifest.parent / p for p in table.column("image_path").to_pylist()]
    urls = table.column("url").to_pylist()
    folder = write_clip_retrieval(tmp_path / "emb", np.concatenate([feats, feats[3:4]]), urls + ["https://x/dup.png"])
    eval_dir = tmp_path / "eval"
    make_image(eval_dir / "a" / "other.png", seed=777)
    (eval_dir / "a" / "same.png").write_bytes(files[1].read_bytes())
    dup = table.slice(3, 1).to_pylist()[0] | {"uid": "dup", "url": "https://x/dup.png"}
    candidates = tmp_path / "cand" / "manifest.parquet"
    rows = table.drop_columns(["image_path"]).to_pylist() + [{k: v for k, v in dup.items() if k != "image_path"}]
    write_manifest(pa.Table.from_pylist(rows), candidates)
    result = filter_images(write_task_file(tmp_path, SHAPES_TASK), candidates, tmp_path / "out", threshold=-1, embeddings=folder,
                           decontaminate=eval_dir, cosine_threshold=STRICT, phash_distance=RADIUS, **TINY)
    decon = result.report["decontamination"]
    assert decon["phash"].startswith("skipped") and decon["counts"]["eval_clip"] == 1 and decon["counts"]["train_clip"] == 1
    pairs = {row["uid"]: row for row in decon["pairs"]}
    assert pairs[table.column("uid")[1].as_py()]["match"] == "a/same.png"
    assert pairs["dup"]["match"] == table.column("uid")[3].as_py() and pairs["dup"]["cosine"] > STRICT
    assert result.counts["kept"] == 5


def _brute_force_greedy(hashes: np.ndarray, radius: int) -> set[int]:
    bits = np.unpackbits(hashes, axis=1).astype(bool)
    kept, dropped = [], set()
    for i in range(len(hashes)):
        if any((bits[i] != bits[k]).sum() <= radius for k in kept):
            dropped.add(i)
        else:
            kept.append(i)
    return dropped


def _finder(n: int, radius: int, cosine: float = 0.99, urls: list[str | None] | None = None) -> _Finder:
    table = pa.table({"uid": [f"u{i}" for i in range(n)], "class_name": ["c"] * n})
    if urls is not None:
        table = table.append_column("url", pa.array(urls, pa.string()))
    return _Finder(table, np.ones(n, dtype=bool), [], radius, cosine)


def _unit_rows(count: int, seed: int = 4) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, 16))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("method", ["clip", "phash"])
def test_rows_of_one_url_are_no_duplicates_of_each_other(method):
    """--multi-class duplicate gives one image a row per class, under one URL: in-train dedup keeps them all,
    and still drops the same image under another URL. A URL-less row is its own image."""
    v = _unit_rows(2) if method == "clip" else np.random.default_rng(5).integers(0, 256, (2, 8), dtype=np.uint8)
    rows = v[[0, 0, 0, 1, 0, 0, 0]]
    urls = ["a", "a", "a", "b", "c", None, None]
    finder = _finder(len(rows), 4, urls=urls)
    finder.inside_train(method, rows)
    assert finder.alive.tolist() == [True, True, True, True, False, False, False]
    assert [p["match"] for p in finder.pairs] == ["u0", "u0", "u0"]


def test_a_url_whose_first_row_is_a_duplicate_loses_all_its_rows():
    rows = _unit_rows(2)[[0, 1, 0, 0, 0]]
    finder = _finder(len(rows), 4, urls=["x", "y", "a", "a", "a"])
    finder.inside_train("clip", rows)
    assert finder.alive.tolist() == [True, True, False, False, False]
    assert {p["uid"]: p["match"] for p in finder.pairs} == {"u2": "u0", "u3": "u0", "u4": "u0"}
    assert finder.counts["train_clip"] == 3


def test_the_first_alive_row_of_a_url_speaks_for_it():
    """The URL's first row was dropped before (an eval copy, unreadable): its next alive row is compared."""
    rows = _unit_rows(2)[[0, 1, 1, 1]]
    finder = _finder(len(rows), 4, urls=["x", "a", "a", "y"])
    finder.alive[1] = False
    finder.inside_train("clip", rows)
    assert finder.alive.tolist() == [True, False, True, False]
    assert finder.pairs[-1] == {"uid": "u3", "class_name": "c", "match": "u2", "match_kind": "train", "method": "clip",
                                "hamming": None, "cosine": pytest.approx(1.0, abs=1e-6)}


def test_phash_radius_is_inclusive_and_exact():
    rng = np.random.default_rng(0)
    base = np.unpackbits(rng.integers(0, 256, (1, 8), dtype=np.uint8), axis=1)
    four, five = base.copy(), base.copy()
    four[0, :4] ^= 1
    five[0, 10:15] ^= 1
    finder = _finder(3, 4)
    finder.inside_train("phash", np.packbits(np.concatenate([base, four, five]), axis=1))
    assert finder.alive.tolist() == [True, False, True]
    assert finder.pairs[0]["hamming"] == 4 and finder.pairs[0]["match"] == "u0"


def test_multi_index_hashing_matches_brute_force_across_blocks(monkeypatch):
    """Clusters of near hashes spread over several blocks: the same rows as an exhaustive greedy pass."""
    import curate.decontaminate as module

    monkeypatch.setattr(module, "BLOCK", 64)
    rng = np.random.default_rng(1)
    centres = np.unpackbits(rng.integers(0, 256, (40, 8), dtype=np.uint8), axis=1)
    rows = centres[rng.integers(0, 40, 400)].copy()
    for row in rows:
        row[rng.choice(64, size=rng.integers(0, 7), replace=False)] ^= 1
    hashes = np.packbits(rows, axis=1)
    finder = _finder(len(hashes), 4)
    finder.inside_train("phash", hashes)
    assert set(np.flatnonzero(~finder.alive)) == _brute_force_greedy(hashes, 4)


@pytest.mark.parametrize("threshold", [0.9999, 1.0])
def test_exact_copies_of_float16_embeddings_are_duplicates_at_any_threshold(threshold):
    """Stored as float16 (as filter stores them), a vector's cosine with itself was 0.9994..1.0006: exact copies
    fell either side of a strict threshold."""
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((200, 32))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float16)
    finder = _finder(400, 4, cosine=threshold)
    finder.inside_train("clip", np.concatenate([vectors, vectors]))
    assert set(np.flatnonzero(~finder.alive)) == set(range(200, 400))


@pytest.mark.parametrize(("setup", "message"), [
    ("missing", "eval folder not found"),
    ("empty", "holds no image files"),
    ("phash", "phash distance must be in [0, 16], got 20"),
    ("corrupt", "none of the 2 eval images in"),
])
def test_cli_rejects_bad_decontamination_input(planted, tmp_path, runner, setup, message):
    task, manifest, eval_dir, _ = planted
    extra = []
    if setup == "missing":
        eval_dir = tmp_path / "nowhere"
    elif setup == "empty":
        eval_dir = tmp_path / "empty"
        (eval_dir / "cls").mkdir(parents=True)
        (eval_dir / "cls" / "notes.txt").write_text("no images here")
    elif setup == "corrupt":
        eval_dir = tmp_path / "corrupt"
        (eval_dir / "cls").mkdir(parents=True)
        for name in ("a.jpg", "b.png"):
            (eval_dir / "cls" / name).write_bytes(b"not an image")
    else:
        extra = ["--phash-distance", "20"]
    out = tmp_path / "out"
    result = runner.invoke(cli, ["filter", "--task", str(task), "--manifest", str(manifest), "--out", str(out),
                                 "--clip-model", "tiny-clip", "--decontaminate", str(eval_dir), *extra])
    assert_cli_error(result, message, out)


def test_flat_inner_product_search_matches_faiss(monkeypatch):
    import faiss

    from curate.decontaminate import _FlatIP

    rng = np.random.default_rng(2)
    base = rng.standard_normal((300, 16)).astype(np.float32)
    queries = np.concatenate([base[:20] + 0.05 * rng.standard_normal((20, 16)).astype(np.float32),
                              rng.standard_normal((30, 16)).astype(np.float32)])
    ours, theirs = _FlatIP(16), faiss.IndexFlatIP(16)
    monkeypatch.setattr(_FlatIP, "PART", 64)  # several parts
    monkeypatch.setattr(_FlatIP, "QUERIES", 16)  # several query slices
    ours.add(base)
    theirs.add(base)
    (v1, i1), (v2, i2) = ours.search(queries, 1), theirs.search(queries, 1)
    assert (i1 == i2).all() and np.allclose(v1, v2, atol=1e-4)
    l1, d1, r1 = ours.range_search(queries, 3.0)
    l2, d2, r2 = theirs.range_search(queries, 3.0)
    assert (l1 == l2).all()
    for q in range(len(queries)):
        assert sorted(r1[l1[q]:l1[q + 1]]) == sorted(r2[l2[q]:l2[q + 1]])
    assert _FlatIP(16).search(queries[:2], 1)[1].tolist() == [[-1], [-1]]
