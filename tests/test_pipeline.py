"""The retrieved-data path end to end through the real CLI: retrieve -> download -> filter -> export.

Metadata captions name the classes; their URLs point at a local server (127.0.0.1) holding drawn
images, a few of them missing. Every stage's output folder is the next one's --manifest.
"""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers_http import serve_images
from helpers_images import CLASSES

from curate.cli import cli
from manifests import read_manifest
from manifests.images import open_image
from train.synthetic_world import draw_shape, write_eval_folder

MISSING = {4, 9}  # rows whose image the server does not have


@pytest.fixture
def world(tmp_path, write_task):
    """A server with drawn images, LAION parquet naming the classes (plus noise rows), and a task file."""
    www = tmp_path / "www"
    www.mkdir()
    rng = np.random.default_rng(0)
    with serve_images(www) as (base_url, log):
        urls, captions = [], []
        for i in range(15):
            name = CLASSES[i % 3]
            urls.append(f"{base_url}/{i}.jpg")
            captions.append(f"my {name.upper()} drawing #{i}")
            if i not in MISSING:
                draw_shape(name, rng, size=40).save(www / f"{i}.jpg", format="JPEG")
        urls += [f"{base_url}/noise-{i}.jpg" for i in range(5)]
        captions += ["a photo of a dog", "circles and squares", None, "", "red circles"]
        pq.write_table(pa.table({"URL": urls, "TEXT": captions}), tmp_path / "laion.parquet")
        task = write_task({"name": "shapes", "domain_text": ["a drawing of a shape"], "classes": list(CLASSES)})
        yield tmp_path, task, log


def invoke(runner, *args):
    result = runner.invoke(cli, list(map(str, args)))
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("output_format", ["files", "webdataset"])
def test_retrieve_download_filter_export(world, runner, output_format):
    root, task, log = world
    invoke(runner, "retrieve", "--task", task, "--metadata", root / "laion.parquet", "--out", root / "candidates")
    candidates = read_manifest(root / "candidates")
    assert candidates.num_rows == 15
    assert candidates.column("label").to_pylist() == [i % 3 for i in range(15)]

    invoke(runner, "download", "--manifest", root / "candidates", "--out", root / "images", "--image-size", 32,
           "--output-format", output_format, "--samples-per-shard", 6, "--threads", 4)
    downloaded = read_manifest(root / "images")
    assert downloaded.num_rows == 13
    assert set(downloaded.column("url").to_pylist()) == set(candidates.column("url").to_pylist()) - {
        candidates.column("url")[i].as_py() for i in MISSING}
    assert downloaded.column("caption").to_pylist()[:2] == ["my RED CIRCLE drawing #0", "my GREEN SQUARE drawing #1"]
    assert pq.read_table(root / "images" / "failed.parquet").num_rows == 2
    assert len(log.paths) == 15  # each candidate URL fetched once, no noise row

    invoke(runner, "filter", "--task", task, "--manifest", root / "images", "--out", root / "filtered",
           "--clip-model", "tiny-clip", "--threshold", -1, "--workers", 0, "--device", "cpu")
    filtered = read_manifest(root / "filtered")
    assert filtered.num_rows == 13
    assert filtered.column("uid").to_pylist() == downloaded.column("uid").to_pylist()
    assert pa.types.is_float32(filtered.schema.field("clip_score").type)
    rows = filtered.to_pylist()
    assert all(open_image(row, root / "filtered").size == (32, 32) for row in rows)  # paths rebased to filtered/
    report = json.loads((root / "filtered" / "report.json").read_text())
    assert report["counts"]["kept"] == 13 and (root / "filtered" / "score_hist.png").stat().st_size > 0

    invoke(runner, "export", "--manifest", root / "filtered", "--format", "imagefolder", "--out", root / "folder")
    for label, name in enumerate(CLASSES):
        expected = sum(1 for row in rows if row["label"] == label)
        assert len(list((root / "folder" / name).iterdir())) == expected
    invoke(runner, "export", "--manifest", root / "filtered", "--format", "webdataset", "--out", root / "wds")
    members = [m for tar in sorted((root / "wds").glob("*.tar")) for m in tarfile.open(tar).getnames()]
    assert sum(m.endswith(".cls") for m in members) == 13


def test_filter_keeps_top_half_per_class_and_finetune_reads_it(world, runner, tmp_path):
    root, task, _ = world
    invoke(runner, "retrieve", "--task", task, "--metadata", root / "laion.parquet", "--out", root / "candidates")
    invoke(runner, "download", "--manifest", root / "candidates", "--out", root / "images", "--image-size", 32, "--threads", 4)
    invoke(runner, "filter", "--task", task, "--manifest", root / "images", "--out", root / "filtered",
           "--clip-model", "tiny-clip", "--percentile", 50, "--workers", 0, "--device", "cpu")
    kept = pd.read_parquet(root / "filtered" / "manifest.parquet")
    assert kept.groupby("class_name").size().to_dict() == {"blue triangle": 3, "green square": 2, "red circle": 2}

    write_eval_folder(root / "eval", CLASSES, per_class=4, size=32, seed=3)
    result = runner.invoke(cli, list(map(str, [
        "finetune-and-probe", "--train", root / "filtered", "--eval-task", task, "--eval-data", root / "eval",
        "--model", "tiny-clip", "--epochs", 1, "--batch-size", 4, "--warmup", 0, "--lr", 1e-3, "--workers", 0,
        "--device", "cpu", "--select-by", "head", "--out", root / "finetuned"])))
    assert result.exit_code == 0, result.output
    report = json.loads((root / "finetuned" / "report.json").read_text())
    assert report["n_train_images"] == 7  # every filtered image was found through the rebased paths
    assert {"head_top1", "zero_shot_top1", "linear_probe_top1"} <= set(report["metrics"]["best"])
