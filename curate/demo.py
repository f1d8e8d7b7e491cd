"""`curate demo`: the embedded offline default, end to end on generated data (no network, no downloads).

    [1/6] sample LAION-schema metadata whose captions name the demo task's classes
    [2/6] curate retrieve          -> OUT/retrieved
    [3/6] images for the retrieved URLs, drawn and served on 127.0.0.1 (the stand-in for the web):
          most show their class's shape, some are off-domain noise, some are missing (404)
    [4/6] curate download          -> OUT/downloaded   (img2dataset, from the local server)
    [5/6] curate filter            -> OUT/filtered     (builtin tiny-clip, top 80 % per class, decontaminated
                                                        against the eval folder)
    [6/6] finetune-and-probe       -> OUT/finetune     (tiny-clip, a few CPU epochs, eval on drawn shapes)
Each step writes its usual output folder, so the demo doubles as a walk-through of the commands.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from curate.console import format_command
from curate.errors import CurateError
from curate.localserver import serve_directory
from curate.sample_metadata import write_laion_sample
from curate.tasks import Task, builtin_task_file, load_task

DEMO_TASK = builtin_task_file("demo")  # the package's own file: a file named "demo" in the working folder cannot stand in
IMAGE_SIZE = 64
OFF_DOMAIN_EVERY = 8  # every 8th retrieved URL serves noise instead of its class's shape
MISSING_EVERY = 20  # every 20th retrieved URL is missing on the server (a 404 for img2dataset)


def run_demo(out: str | Path | None = None, rows: int = 20000, overwrite: bool = False, epochs: int = 3,
             echo: Callable[[str], None] = print) -> Path:
    """Run the offline pipeline into `out` (a new temp folder if None); returns the folder."""
    out = Path(out) if out else Path(tempfile.mkdtemp(prefix="curate-demo-"))
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise CurateError(f"demo folder {out} is not empty (use --overwrite to replace it)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    task = load_task(DEMO_TASK)
    web = out / "web"
    web.mkdir()
    with serve_directory(web) as (base_url, _requests):
        retrieved = _retrieve(out, task, rows, f"{base_url}/img/", echo)
        _draw_served_images(retrieved, f"{base_url}/img/", web / "img", task, echo)
        downloaded = _download(out, retrieved, echo)
    eval_dir = _eval_folder(out, task, echo)
    filtered = _filter(out, downloaded, eval_dir, echo)
    _finetune(out, filtered, eval_dir, epochs, echo)
    echo(f"demo finished: every step's manifest.parquet and report.json are under {out}")
    return out


def _retrieve(out: Path, task: Task, rows: int, url_prefix: str, echo) -> Path:
    from curate.retrieve import retrieve

    echo(f"[1/6] writing {rows:,} rows of LAION-schema sample metadata to {out / 'metadata'}")
    write_laion_sample(out / "metadata", rows, task.class_names, plant_rate=0.02, files=2, seed=0, url_prefix=url_prefix)
    options = {"task": DEMO_TASK, "metadata": [str(out / "metadata")], "out": out / "retrieved"}
    echo("[2/6] " + format_command("curate retrieve", options))
    result = retrieve(**options)
    echo(result.summary())
    return out / "retrieved" / "manifest.parquet"


def _draw_served_images(manifest: Path, url_prefix: str, folder: Path, task: Task, echo) -> None:
    """Write the image behind each retrieved URL: its class's shape, off-domain noise, or nothing."""
    from manifests import read_manifest
    from train.synthetic_world import draw_shape

    table = read_manifest(manifest)
    rng = np.random.default_rng(0)
    urls, labels = table.column("url").to_pylist(), table.column("label").to_pylist()
    for index, (url, label) in enumerate(zip(urls, labels)):
        if index % MISSING_EVERY == MISSING_EVERY - 1:
            continue
        path = folder / url[len(url_prefix):]
        path.parent.mkdir(parents=True, exist_ok=True)
        if index % OFF_DOMAIN_EVERY == OFF_DOMAIN_EVERY - 1:
            image = _noise_image(rng)
        else:
            image = draw_shape(task.class_names[label], rng, size=IMAGE_SIZE)
        image.save(path, format="JPEG", quality=90)
    echo(f"[3/6] drew {len(urls)} images (1 in {OFF_DOMAIN_EVERY} off-domain noise, 1 in {MISSING_EVERY} missing) "
         f"and served them on {url_prefix}")


def _noise_image(rng: np.random.Generator):
    from PIL import Image

    return Image.fromarray(rng.integers(0, 256, size=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))


def _download(out: Path, manifest: Path, echo) -> Path:
    from curate.download import download

    options = {"manifest": manifest, "out": out / "downloaded", "processes": 1, "threads": 8, "image_size": IMAGE_SIZE,
               "samples_per_shard": 200, "timeout": 5}
    echo("[4/6] " + format_command("curate download", options))
    result = download(**options)
    echo(result.summary())
    return out / "downloaded" / "manifest.parquet"


def _eval_folder(out: Path, task: Task, echo) -> Path:
    from train.demo import demo_eval_folder

    folder = demo_eval_folder(out, task.class_names)
    echo(f"      eval data: drawn shapes in {folder}/{{train,val,test}}/<class>/")
    return folder


def _filter(out: Path, manifest: Path, eval_dir: Path, echo) -> Path:
    from curate.filter import filter_images

    # tiny-clip has random weights: its scores carry no meaning, so the demo keeps the top 80 % per class
    # instead of the protocol's absolute threshold (0.2 with ViT-B-16), and only flags exact duplicates.
    options = {"task": DEMO_TASK, "manifest": manifest, "out": out / "filtered", "clip_model": "tiny-clip", "percentile": 80,
               "decontaminate": eval_dir / "test", "cosine_threshold": 0.9999, "workers": 0, "device": "cpu"}
    echo("[5/6] " + format_command("curate filter", options))
    result = filter_images(**options)
    echo(result.summary())
    return out / "filtered" / "manifest.parquet"


def _finetune(out: Path, manifest: Path, eval_dir: Path, epochs: int, echo) -> None:
    from train.demo import demo_finetune

    echo("[6/6] finetune-and-probe on the filtered set")
    demo_finetune([manifest], out, eval_task=str(DEMO_TASK), eval_data=eval_dir, epochs=epochs, echo=echo)
