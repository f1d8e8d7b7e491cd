"""The choice lists of stage options, in one place light enough for the CLI to import at start-up (no pyarrow,
numpy or torch): the stages check their arguments against them, the CLI offers them as click choices."""

from collections.abc import Iterable

from curate.errors import CurateError

DATA_FOLDERS = {"files": "images", "webdataset": "shards"}  # download output format -> img2dataset's folder in OUT
RESIZE_MODES = ("border", "keep_ratio", "keep_ratio_largest", "center_crop", "no")  # img2dataset's resize modes
ENCODE_FORMATS = ("jpg", "png", "webp")  # formats a download saves images in
FILTER_MODES = ("domain", "classname")  # what `curate filter` scores a row against
MATCH_MODES = ("word", "substring")  # how `curate retrieve` matches a class term in a caption
MULTI_CLASS = ("drop", "duplicate")  # what `curate retrieve` does with a caption naming several classes
# finetune-and-probe: --select-by -> the val metric that picks the best epoch; --precision; --keep-checkpoints;
# --mix-mode (MixData, MixLoss: train.data.BatchPlan)
SELECT_BY = {"linear_probe": "val_linear_probe_top1", "head": "val_head_top1", "zero_shot": "val_zero_shot_top1"}
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
KEEP_CHECKPOINTS = ("last", "all")
MIX_MODES = ("data", "loss")


def check_choice(option: str, value: object, choices: Iterable[str]) -> None:
    """One CurateError naming the option and its choices if `value` is not one of them (for calls from Python,
    which click's choices do not cover)."""
    choices = tuple(choices)
    if value not in choices:
        raise CurateError(f"{option} must be one of {', '.join(choices)}, got {value!r}")
