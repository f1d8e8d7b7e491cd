"""The manifest: schema, reading/writing, reports, uids and exporters (DESIGN §4)."""

from manifests.io import (
    ManifestWriter,
    iter_manifest,
    manifest_dir,
    read_manifest,
    read_report,
    staged_output_dir,
    write_json,
    write_manifest,
    write_report,
)
from manifests.schema import COLUMNS, IMAGE_COLUMNS, IMAGE_LOCATION_COLUMNS, REQUIRED_COLUMNS, SOURCES, conform, validate
from manifests.uid import hashed_subset_rank, seeded_ranks, seeded_subset_per_class, uid_for_synthetic, uid_for_url

__all__ = [
    "COLUMNS",
    "ManifestWriter",
    "IMAGE_COLUMNS",
    "IMAGE_LOCATION_COLUMNS",
    "REQUIRED_COLUMNS",
    "SOURCES",
    "conform",
    "hashed_subset_rank",
    "iter_manifest",
    "manifest_dir",
    "read_manifest",
    "read_report",
    "seeded_ranks",
    "seeded_subset_per_class",
    "staged_output_dir",
    "uid_for_synthetic",
    "uid_for_url",
    "validate",
    "write_json",
    "write_manifest",
    "write_report",
]
