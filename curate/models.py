"""The model registry: every stage gets its CLIP model from here (DESIGN §1).

A model is named by
  * an open_clip architecture + pretrained tag (`ViT-B-16`, `laion2b_s34b_b88k`): downloaded by
    open_clip on first use when the machine is online, cached afterwards;
  * an open_clip architecture + a local checkpoint file (`--clip-pretrained /path/ckpt.pt`);
  * a folder holding `open_clip_config.json` and weights (open_clip's `local-dir:` layout);
  * a builtin offline model (`tiny-clip`), built from a config shipped in `model_configs/`,
    with seeded random weights unless a checkpoint is given.
The tiny model goes through the same open_clip code path as the real ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
from pathlib import Path
from typing import Any

from curate.errors import CurateError, first_line

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "model_configs"
BUILTIN_SEED = 0
DEFAULT_CLIP = ("ViT-B-16", "laion2b_s34b_b88k")
_registered = False


@dataclasses.dataclass
class ClipBundle:
    """An open_clip model with its transforms and tokenizer, and how it was named."""

    model: Any
    preprocess_train: Any
    preprocess_val: Any
    tokenizer: Any
    name: str
    pretrained: str | None

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return size[0] if isinstance(size, (tuple, list)) else int(size)


def builtin_model_names() -> list[str]:
    return sorted(path.stem for path in CONFIG_DIR.glob("*.json"))


def load_clip(name: str, pretrained: str | None, device: str = "cpu") -> ClipBundle:
    """Build an open_clip model from `name` (architecture, model folder or builtin) and `pretrained`: an
    open_clip tag, a checkpoint path, or None / '' for seeded random weights (a model folder brings its own).
    `resolve_pretrained(name, None)` gives the registry's default tag. CurateError if it cannot be built;
    a checkpoint written for another architecture is reported as not fitting the model."""
    open_clip = _open_clip()
    arch, tag = _resolve(name, pretrained)
    if arch not in open_clip.list_models() and not arch.startswith("local-dir:"):
        raise CurateError(f"unknown CLIP model '{name}'; builtin: {builtin_model_names()}, or an open_clip name")
    if tag is None:
        import torch

        torch.manual_seed(BUILTIN_SEED)  # builtin random weights are the same on every run
    offline = bool(tag) and not Path(tag).is_file() and not _hub_reachable()
    try:
        with _hub_offline(offline):
            model, train_tf, val_tf = open_clip.create_model_and_transforms(arch, pretrained=tag, device=device)
    except (RuntimeError, OSError, ValueError, pickle.UnpicklingError) as exc:  # UnpicklingError: not a checkpoint at all
        # torch's Module.load_state_dict raises a plain RuntimeError on missing / unexpected / mis-shaped keys
        if tag and Path(tag).is_file() and "Error(s) in loading state_dict" in str(exc):
            raise CurateError(f"checkpoint {pretrained} does not fit model '{name}' (another architecture?)") from None
        hint = (" (the Hugging Face hub cannot be reached and the weights are not in its local cache: give a checkpoint "
                "path, or '' for random weights)") if offline else ""
        raise CurateError(f"cannot load CLIP '{name}' with pretrained '{pretrained}': {first_line(exc)}{hint}") from None
    except Exception as exc:  # a file that is no checkpoint makes pickle raise KeyError, EOFError, IndexError...
        if not (tag and Path(tag).is_file()):
            raise
        if isinstance(exc, AssertionError):  # open_clip's own shape checks (pos_embed width) on another architecture
            raise CurateError(f"checkpoint {pretrained} does not fit model '{name}' (another architecture?)") from None
        raise CurateError(f"cannot load CLIP '{name}' with pretrained '{pretrained}': not a checkpoint open_clip reads "
                          f"({type(exc).__name__}: {first_line(exc)})") from None
    model.eval()
    tokenizer = open_clip.get_tokenizer(arch)
    return ClipBundle(model, train_tf, val_tf, tokenizer, name=name, pretrained=pretrained)


def text_classifier(bundle: ClipBundle, class_names: list[str], templates: list[str], device: str = "cpu"):
    """Per-class mean of normalised template embeddings, renormalised: a (embed_dim, n_classes) tensor."""
    import torch
    from open_clip import build_zero_shot_classifier

    with torch.no_grad():
        return build_zero_shot_classifier(
            bundle.model,
            tokenizer=bundle.tokenizer,
            classnames=class_names,
            templates=list(templates),
            num_classes_per_batch=10,
            device=device,
            use_tqdm=False,
        )


def encode_texts(bundle: ClipBundle, texts: list[str], device: str = "cpu"):
    """L2-normalised text embeddings, one row per text."""
    import torch

    with torch.no_grad():
        tokens = bundle.tokenizer(list(texts)).to(device)
        features = bundle.model.encode_text(tokens)
        return torch.nn.functional.normalize(features.float(), dim=-1)


def default_pretrained(name: str) -> str | None:
    """The pretrained tag used when none is given: DEFAULT_CLIP's for its architecture, none for builtin
    models and model folders, else open_clip's first listed tag for that architecture (None if it has none)."""
    if name in builtin_model_names() or _model_folder(name) is not None:
        return None
    if name == DEFAULT_CLIP[0]:
        return DEFAULT_CLIP[1]
    tags = _open_clip().list_pretrained_tags_by_model(name)
    return tags[0] if tags else None


def resolve_pretrained(name: str, pretrained: str | None) -> str | None:
    """None -> `default_pretrained(name)`; '' -> no weights (None); anything else as given."""
    if pretrained is None:
        return default_pretrained(name)
    return pretrained or None


def resolve_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; CurateError for a CUDA device on a machine without one."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except RuntimeError:
        raise CurateError(f"unknown device '{device}': use auto, cpu, cuda or cuda:N") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CurateError(f"device '{device}' requested but CUDA is not available")
    return device


def encode_images(bundle: ClipBundle, images, device: str = "cpu"):
    """L2-normalised float32 image embeddings of a preprocessed batch (autocast fp16 on CUDA)."""
    import contextlib

    import torch

    on_cuda = str(device).startswith("cuda")
    autocast = torch.autocast("cuda", dtype=torch.float16) if on_cuda else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        features = bundle.model.encode_image(images.to(device, non_blocking=on_cuda))
    return torch.nn.functional.normalize(features.float(), dim=-1)


def _resolve(name: str, pretrained: str | None) -> tuple[str, str | None]:
    """Map (name, pretrained) to open_clip's (architecture, pretrained) arguments."""
    _register_builtin_configs()
    folder = _model_folder(name)
    if folder is not None:
        if not (folder / "open_clip_config.json").exists():
            raise CurateError(f"model folder {name} has no open_clip_config.json")
        if pretrained:  # open_clip would load the folder's own weights and drop these without a word
            raise CurateError(f"model folder {name} brings its own weights, so checkpoint '{pretrained}' would be ignored: "
                              "give the checkpoint with the folder's architecture name instead")
        return f"local-dir:{folder.resolve()}", None
    if pretrained and (Path(pretrained).is_file() or "/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))):
        if not Path(pretrained).is_file():
            raise CurateError(f"checkpoint not found: {pretrained}")
        return name, str(pretrained)
    if name in builtin_model_names():
        if pretrained:
            raise CurateError(f"builtin model '{name}' takes a checkpoint path as pretrained, not the tag '{pretrained}'")
        return name, None
    return name, pretrained or None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all: without a network its client retries every weight file for
    about 25 s before failing. A proxy in the environment is trusted (a direct connection would not tell)."""
    import socket
    import urllib.parse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(key) for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = urllib.parse.urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _hub_offline(offline: bool):
    """The hub client in offline mode for the block (weights from its local cache only), when `offline`."""
    if not offline:
        yield
        return
    from huggingface_hub import constants

    previous, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _model_folder(name: str) -> Path | None:
    """`name` as a model folder: a folder with an open_clip config, or any folder not named like an open_clip
    architecture (a stray folder called ViT-B-16 in the working directory does not hide the architecture)."""
    folder = Path(name)
    if not folder.is_dir():
        return None
    if (folder / "open_clip_config.json").exists() or name not in _open_clip().list_models():
        return folder
    return None


def _register_builtin_configs() -> None:
    global _registered
    if not _registered:
        _open_clip().add_model_config(CONFIG_DIR)
        _registered = True


def _open_clip():
    try:
        import open_clip
    except ImportError:
        raise CurateError("open_clip is not installed: pip install open_clip_torch") from None
    return open_clip
