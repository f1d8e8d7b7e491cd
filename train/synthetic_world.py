"""A small learnable world of coloured shapes, for tests and the offline demo.

Class names are "<colour> <shape>" (the demo task: "red circle", "green square", "blue triangle",
"yellow star", "purple cross"); each image is one shape, jittered in position, size, rotation
and hue, on a noisy background. `make_shape_world` writes an eval ImageFolder
(`eval/{train,val,test}/<class name>/*.png`), a training manifest with its images
(`train/manifest.parquet`, `image_path` relative to it, plus a report.json), and a task file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path

import numpy as np

from curate.tasks import ClassSpec, builtin_task

DEMO_TASK = builtin_task("demo")  # its class names are what this module draws
DEMO_CLASSES = tuple(DEMO_TASK.class_names)
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 205, 35),
    "purple": (140, 50, 180), "orange": (240, 140, 30), "cyan": (40, 200, 210), "pink": (240, 120, 180),
    "black": (20, 20, 20), "white": (245, 245, 245), "brown": (120, 75, 35), "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")


@dataclasses.dataclass
class ShapeWorld:
    """Where `make_shape_world` wrote things."""

    root: Path
    eval_dir: Path
    manifest: Path
    task_file: Path
    classes: tuple[str, ...]


def parse_class(name: str) -> tuple[tuple[int, int, int], str]:
    """Colour and shape of a class name; unknown words get a colour/shape derived from the name's hash."""
    words = name.lower().split()
    digest = int(hashlib.md5(name.encode("utf-8")).hexdigest(), 16)
    colour = next((COLOURS[w] for w in words if w in COLOURS), None)
    shape = next((w for w in words if w in SHAPES), None)
    if colour is None:
        colour = tuple(int(40 + (digest >> s) % 200) for s in (0, 8, 16))
    return colour, shape or SHAPES[(digest >> 24) % len(SHAPES)]


def draw_shape(class_name: str, rng: np.random.Generator, size: int = 32):
    """One RGB PIL image of the class's shape in its colour, jittered by `rng`."""
    from PIL import Image, ImageDraw

    colour, shape = parse_class(class_name)
    background = rng.integers(150, 235)
    noise = rng.normal(0, 12, size=(size, size, 3))
    image = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8), "RGB")
    fill = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in colour)
    radius = size * rng.uniform(0.22, 0.36)
    cx, cy = (size / 2 + rng.uniform(-0.12, 0.12, size=2) * size).tolist()
    angle = rng.uniform(0, 2 * math.pi)
    draw = ImageDraw.Draw(image)
    _SHAPE_DRAWERS[shape](draw, cx, cy, radius, angle, fill)
    return image


def make_shape_world(
    root: str | Path,
    classes: tuple[str, ...] | list[str] = DEMO_CLASSES,
    per_class: int = 20,
    eval_per_class: dict[str, int] | int = 12,
    size: int = 32,
    splits: tuple[str, ...] = ("train", "val", "test"),
    source: str = "real",
    task_name: str = "shapes",
    seed: int = 0,
) -> ShapeWorld:
    """Write an eval ImageFolder, a training manifest of `per_class` images per class and a task file."""
    root = Path(root)
    classes = tuple(classes)
    write_eval_folder(root / "eval", classes, eval_per_class, size, splits, seed)
    manifest = write_train_manifest(root / "train", classes, per_class, size, source, task_name, seed)
    task_file = root / "task.yaml"
    task_file.write_text(_task_yaml(task_name, classes), encoding="utf-8")
    return ShapeWorld(root, root / "eval", manifest, task_file, classes)


def write_eval_folder(
    root: str | Path,
    classes: tuple[str, ...] | list[str] = DEMO_CLASSES,
    per_class: dict[str, int] | int = 12,
    size: int = 32,
    splits: tuple[str, ...] = ("train", "val", "test"),
    seed: int = 0,
) -> Path:
    """`root/{split}/<class name>/NNNNN.png`: an eval ImageFolder (per_class: one count, or one per split)."""
    root = Path(root)
    counts = per_class if isinstance(per_class, dict) else {s: per_class for s in splits}
    for split_index, split in enumerate(splits):
        rng = np.random.default_rng([seed, 1 + split_index])
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(counts[split]):
                draw_shape(name, rng, size).save(folder / f"{i:05d}.png")
    return root


def write_train_manifest(
    folder: str | Path,
    classes: tuple[str, ...] | list[str] = DEMO_CLASSES,
    per_class: int = 20,
    size: int = 32,
    source: str = "real",
    task_name: str = "shapes",
    seed: int = 0,
) -> Path:
    """`folder/manifest.parquet` (+ images/, report.json): `per_class` drawn images per class."""
    from manifests.io import write_manifest, write_report

    folder = Path(folder)
    table = _write_train_images(folder, tuple(classes), per_class, size, source, task_name, seed)
    write_manifest(table, folder / "manifest.parquet")
    write_report(folder, {"stage": "synthetic_world", "task": task_name, "seed": seed, "rows": table.num_rows})
    return folder / "manifest.parquet"


def _write_train_images(folder: Path, classes, per_class: int, size: int, source: str, task_name: str, seed: int):
    import pyarrow as pa

    from manifests.uid import uid_for_synthetic

    rng = np.random.default_rng([seed, 0])
    rows = {"uid": [], "label": [], "class_name": [], "source": [], "caption": [], "image_path": []}
    for label, name in enumerate(classes):
        (folder / "images" / str(label)).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            relative = f"images/{label}/{i:05d}.png"
            draw_shape(name, rng, size).save(folder / relative)
            caption = f"a photo of a {name}"
            rows["uid"].append(uid_for_synthetic(task_name, f"{caption} {i}", seed))
            rows["label"].append(label)
            rows["class_name"].append(name)
            rows["source"].append(source)
            rows["caption"].append(caption)
            rows["image_path"].append(relative)
    return pa.table({**rows, "label": pa.array(rows["label"], pa.int32())})


def _task_yaml(name: str, classes) -> str:
    """The demo task's texts with this world's name and classes."""
    import yaml

    task = dataclasses.replace(DEMO_TASK, name=name, classes=tuple(ClassSpec(c) for c in classes))
    return yaml.safe_dump(task.to_dict(), sort_keys=False, allow_unicode=True)


def _polygon(cx, cy, radius, angle, corners, inner=None):
    points = []
    steps = corners * (2 if inner else 1)
    for k in range(steps):
        r = radius if (inner is None or k % 2 == 0) else radius * inner
        a = angle + 2 * math.pi * k / steps
        points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return points


def _circle(draw, cx, cy, r, angle, fill):
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)


def _square(draw, cx, cy, r, angle, fill):
    draw.polygon(_polygon(cx, cy, r * 1.1, angle, 4), fill=fill)


def _triangle(draw, cx, cy, r, angle, fill):
    draw.polygon(_polygon(cx, cy, r * 1.2, angle, 3), fill=fill)


def _star(draw, cx, cy, r, angle, fill):
    draw.polygon(_polygon(cx, cy, r * 1.25, angle, 5, inner=0.45), fill=fill)


def _diamond(draw, cx, cy, r, angle, fill):
    draw.polygon(_polygon(cx, cy, r * 1.2, 0.0, 4), fill=fill)


def _cross(draw, cx, cy, r, angle, fill):
    arm = r * 0.35
    for a in (angle, angle + math.pi / 2):
        dx, dy = math.cos(a), math.sin(a)
        px, py = -dy * arm, dx * arm
        draw.polygon([(cx - dx * r + px, cy - dy * r + py), (cx + dx * r + px, cy + dy * r + py),
                      (cx + dx * r - px, cy + dy * r - py), (cx - dx * r - px, cy - dy * r - py)], fill=fill)


_SHAPE_DRAWERS = {"circle": _circle, "square": _square, "triangle": _triangle, "star": _star, "cross": _cross, "diamond": _diamond}
