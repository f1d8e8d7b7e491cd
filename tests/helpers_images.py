"""Generated-image fixtures: small distinct images, image manifests, task files, clip-retrieval layouts,
the tiny-clip options and embeddings the filter / decontaminate tests share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from manifests.io import write_manifest
from manifests.uid import uid_for_url

CLASSES = ("red circle", "green square", "blue triangle")
SHAPES_TASK = {"name": "shapes", "domain_text": ["a photo of a shape"], "templates": ["a photo of a {}.", "a drawing of a {}."],
               "classes": list(CLASSES)}
TINY = {"clip_model": "tiny-clip", "device": "cpu", "workers": 0, "batch_size": 8}  # filter options: offline, CPU, in-process


def make_image(path: Path, seed: int, size: int = 48, quality: int = 90) -> Path:
    """A distinct image: a seeded 6x6 grid of random colours, upscaled, with mild noise (jpg or png)."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    image = Image.fromarray(grid).resize((size, size), Image.BILINEAR)
    noisy = np.asarray(image, dtype=np.int16) + rng.integers(-8, 9, (size, size, 3))
    image = Image.fromarray(noisy.clip(0, 255).astype(np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=quality) if path.suffix.lower() in (".jpg", ".jpeg") else image.save(path)
    return path


def make_image_manifest(
    tmp_path: Path,
    per_class: int | list[int] = 4,
    classes: tuple[str, ...] = CLASSES,
    size: int = 48,
    folder: str = "train",
    seed: int = 0,
    suffix: str = ".png",
) -> Path:
    """Write `per_class` generated images per class under tmp_path/folder/images/ and a manifest
    (uid, label, class_name, source, caption, url, image_path relative) next to them; returns its path."""
    root = Path(tmp_path) / folder
    counts = per_class if isinstance(per_class, list) else [per_class] * len(classes)
    rows = []
    for label, (name, count) in enumerate(zip(classes, counts)):
        for i in range(count):
            relative = f"images/{label:03d}_{i:04d}{suffix}"
            make_image(root / relative, seed=seed * 100_000 + label * 1000 + i, size=size)
            url = f"https://example.com/{folder}/{label}/{i}{suffix}"
            rows.append({"uid": uid_for_url(url), "label": label, "class_name": name, "source": "retrieved",
                         "caption": f"a {name} number {i}", "url": url, "image_path": relative})
    path = root / "manifest.parquet"
    write_manifest(pa.Table.from_pylist(rows), path)
    return path


def add_rows(manifest: Path, rows: list[dict]) -> Path:
    """Append rows (dicts with at least uid, label, class_name, image_path) to a manifest, rewriting it."""
    from manifests.io import read_manifest

    table = read_manifest(manifest).to_pylist()
    full = [{"source": "retrieved", "caption": "", "url": None, **row} for row in rows]
    write_manifest(pa.Table.from_pylist(table + full), manifest)
    return manifest


def write_task_file(folder: Path, data: dict | list[str], name: str = "task") -> Path:
    """Write a YAML task from a dict (or a text task from a list of class names) into `folder`; returns its path."""
    import yaml

    if isinstance(data, list):
        path = Path(folder) / f"{name}.txt"
        path.write_text("\n".join(data) + "\n", encoding="utf-8")
    else:
        path = Path(folder) / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def embed_manifest(bundle, manifest: Path) -> np.ndarray:
    """tiny-clip (or any bundle's) image embeddings of a manifest's image_path rows, in row order: (N, d) float32."""
    import torch

    from curate.models import encode_images
    from manifests.io import read_manifest

    paths = read_manifest(manifest).column("image_path").to_pylist()
    pixels = torch.stack([bundle.preprocess_val(Image.open(Path(manifest).parent / p).convert("RGB")) for p in paths])
    return encode_images(bundle, pixels).numpy()


def write_clip_retrieval(out_dir: Path, embeddings: np.ndarray, urls: list[str], shards: int = 2) -> Path:
    """Write embeddings + urls in clip-retrieval layout (img_emb/img_emb_N.npy, metadata/metadata_N.parquet)."""
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    (out_dir / "img_emb").mkdir(parents=True, exist_ok=True)
    (out_dir / "metadata").mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(urls), shards + 1).astype(int)
    for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        np.save(out_dir / "img_emb" / f"img_emb_{n}.npy", embeddings[a:b])
        pq.write_table(pa.table({"url": urls[a:b], "caption": [f"c{i}" for i in range(a, b)]}),
                       out_dir / "metadata" / f"metadata_{n}.parquet")
    return out_dir
