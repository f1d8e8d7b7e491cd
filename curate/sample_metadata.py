"""Generate LAION-schema parquet metadata with class names planted in realistic captions.

Used by `curate demo` (the embedded offline default), the benchmark and the tests. Captions are
drawn from a fixed vocabulary of common LAION words (5-25 words, ~70-130 characters), and a
fraction of rows name one of the given classes inside a caption template.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

VOCABULARY = (
    "the a of and with for in on at to by from new vintage photo image stock picture white black red blue green "
    "yellow pink gold silver wooden large small beautiful modern classic home wall art print poster canvas design "
    "pattern shirt dress women men kids baby wedding party birthday christmas summer winter spring autumn garden "
    "kitchen bedroom living room table chair lamp light house street city night sunset beach sea mountain tree "
    "forest river lake sky cloud road car bike train boat plane dog cat bird horse fish flower leaf rose gold "
    "ring necklace earrings bracelet watch bag shoes boots jacket coat hat logo icon vector illustration drawing "
    "cartoon background texture frame card book cover free download hd wallpaper high quality royalty set of two "
    "three best top sale cheap online shop store brand collection style fashion look outfit cute funny love happy"
).split()
DEFAULT_URL_PREFIX = "https://images.example.com/"
TEMPLATES = (
    "{} photo stock image",
    "a beautiful {} in the garden",
    "vintage poster of a {} print",
    "{} close up high quality",
    "my new {} at the show",
)


def sample_captions(rng: np.random.Generator, n: int, class_names: Sequence[str], plant_rate: float) -> list[str]:
    """n captions; about plant_rate of them name a class (inside a template, with random words around)."""
    vocab = np.array(VOCABULARY)
    lengths = rng.integers(5, 26, size=n)
    words = rng.choice(vocab, size=(n, 25))
    captions = [" ".join(row[:k]) for row, k in zip(words.tolist(), lengths.tolist())]
    planted = np.flatnonzero(rng.random(n) < plant_rate)
    names = rng.integers(0, len(class_names), size=len(planted)) if class_names else []
    templates = rng.integers(0, len(TEMPLATES), size=len(planted))
    for row, name, template in zip(planted.tolist(), names, templates.tolist()):
        captions[row] = TEMPLATES[template].format(class_names[name]) + " " + captions[row][:40]
    return captions


def laion_batch(rng: np.random.Generator, start: int, n: int, class_names: Sequence[str], plant_rate: float,
                url_prefix: str = DEFAULT_URL_PREFIX) -> pa.Table:
    """A LAION-schema table (URL, TEXT, WIDTH, HEIGHT, similarity, hash, punsafe, pwatermark)."""
    ids = np.arange(start, start + n)
    urls = [f"{url_prefix}{i // 1000}/{i}.jpg" for i in ids.tolist()]
    return pa.table({
        "URL": pa.array(urls, pa.string()),
        "TEXT": pa.array(sample_captions(rng, n, class_names, plant_rate), pa.string()),
        "WIDTH": pa.array(rng.integers(64, 2048, n), pa.int32()),
        "HEIGHT": pa.array(rng.integers(64, 2048, n), pa.int32()),
        "similarity": pa.array(rng.uniform(0.28, 0.45, n), pa.float64()),
        "hash": pa.array(rng.integers(-(2**62), 2**62, n), pa.int64()),
        "punsafe": pa.array(rng.beta(0.5, 8, n), pa.float32()),
        "pwatermark": pa.array(rng.beta(0.7, 4, n), pa.float32()),
    })


def write_laion_sample(
    out_dir: str | Path,
    rows: int,
    class_names: Sequence[str],
    plant_rate: float = 0.002,
    files: int = 1,
    seed: int = 0,
    chunk_rows: int = 500_000,
    row_group_rows: int = 128 * 1024,
    url_prefix: str = DEFAULT_URL_PREFIX,
) -> list[Path]:
    """Write `rows` rows over `files` parquet files (part-00000.parquet, ...); returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per_file = -(-rows // files)
    paths, start = [], 0
    for index in range(files):
        path = out_dir / f"part-{index:05d}.parquet"
        n_file = min(per_file, rows - start)
        writer = None
        for offset in range(0, n_file, chunk_rows):
            table = laion_batch(rng, start + offset, min(chunk_rows, n_file - offset), class_names, plant_rate, url_prefix)
            writer = writer or pq.ParquetWriter(path, table.schema, compression="snappy")
            writer.write_table(table, row_group_size=row_group_rows)
        if writer:
            writer.close()
            paths.append(path)
        start += n_file
    return paths
