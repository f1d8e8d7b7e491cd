"""The classifier (CLIP image encoder + a head from the task's templates) and layer freezing.

Head (seed 004): the per-class mean of normalised template embeddings, renormalised, times the
model's logit scale; image features are L2-normalised before the head. The zero-shot head is the
same text classifier, kept fixed, so zero-shot accuracy can be measured with the current encoder.

Layers (seeds 000/001): layer 1 = the stem (patch embedding, class token, positional embedding,
ln_pre), then one layer per transformer block, then the head (ln_post, proj and the
classification head). `freeze_layers(N)` freezes the first N layers and, with `reinit`,
re-initialises the rest (open_clip's ViT blocks are not re-initialised by `init_parameters`, so
this module does it: `reset_parameters` where a module has one, normal(width^-0.5) otherwise).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from curate.errors import CurateError

STEM = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "patch_dropout")


class ClipClassifier(nn.Module):
    """features = normalise(visual(images)); logits = head(features); zero-shot logits = features @ text head."""

    def __init__(self, visual, head_weight, zero_shot_weight):
        super().__init__()
        self.visual = visual
        n_classes, dim = head_weight.shape
        self.head = torch.nn.Linear(dim, n_classes)
        with torch.no_grad():
            self.head.weight.copy_(head_weight)
            self.head.bias.zero_()
        self.register_buffer("zero_shot_weight", zero_shot_weight.clone(), persistent=False)

    def features(self, images):
        return torch.nn.functional.normalize(self.visual(images), dim=-1)

    def forward(self, images):
        return self.head(self.features(images))


def build_classifier(bundle, class_names: list[str], templates: list[str], head_state: dict | None = None, device: str = "cpu") -> ClipClassifier:
    """Wrap bundle.model.visual with a head from the templates (or `head_state`, from an earlier run)."""
    text = text_head(bundle, class_names, templates, device)
    classifier = ClipClassifier(bundle.model.visual, text, text)  # both are copied
    if head_state is not None:
        classifier.head.load_state_dict(head_state)
    return classifier.to(device)


def text_head(bundle, class_names: list[str], templates: list[str], device: str = "cpu"):
    """(n_classes, embed_dim): template-averaged normalised text embeddings x exp(logit_scale)."""
    from curate.models import text_classifier

    bundle.model.to(device)
    weights = text_classifier(bundle, class_names, templates, device=device).float().T
    with torch.no_grad():
        return weights * bundle.model.logit_scale.exp().float()


# ---------------------------------------------------------------- layers
def layer_names(classifier: ClipClassifier) -> list[str]:
    """The model's layers in order: stem, block1..blockL, head."""
    blocks = _blocks(classifier.visual)
    return ["stem", *(f"block{i + 1}" for i in range(len(blocks))), "head"]


def layer_of(parameter_name: str, n_blocks: int) -> int:
    """0-based layer index of a classifier parameter (by name)."""
    parts = parameter_name.split(".")
    if parts[0] == "visual":
        if parts[1:3] == ["transformer", "resblocks"]:
            return 1 + int(parts[3])
        if parts[1] in STEM:
            return 0
    return n_blocks + 1  # ln_post, proj, any pooling, and the classification head


def freeze_layers(classifier: ClipClassifier, n_frozen: int, reinit: bool = True, seed: int = 0) -> dict[str, Any]:
    """Freeze the first `n_frozen` layers; with `reinit` (and n_frozen > 0) re-initialise the rest.

    n_frozen = 0 trains everything from the loaded weights (plain finetuning; nothing is re-initialised).
    Returns a summary: layer count, frozen and trained layer names, parameter counts.
    """
    names = layer_names(classifier)
    n_blocks = len(names) - 2
    if not 0 <= n_frozen < len(names):
        raise CurateError(f"--freeze-blocks must be in 0..{len(names) - 1} for this model ({len(names)} layers: stem, "
                          f"{n_blocks} blocks, head); freezing all layers leaves nothing to train (use --eval-only)")
    for name, param in classifier.named_parameters():
        param.requires_grad_(layer_of(name, n_blocks) >= n_frozen)
    if reinit and n_frozen > 0:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        for index in range(n_frozen, len(names)):
            _reinit_layer(classifier, index, n_blocks)
        torch.random.set_rng_state(generator_state)
    trained = sum(p.numel() for p in classifier.parameters() if p.requires_grad)
    total = sum(p.numel() for p in classifier.parameters())
    return {
        "layers": len(names), "frozen": names[:n_frozen], "trained": names[n_frozen:],
        "reinitialised": bool(reinit and n_frozen > 0), "trained_params": trained, "total_params": total,
    }


def _blocks(visual):
    if not (hasattr(visual, "transformer") and hasattr(visual.transformer, "resblocks") and hasattr(visual, "conv1")):
        raise CurateError(f"layer freezing supports open_clip ViT image towers, not {type(visual).__name__}")
    return visual.transformer.resblocks


def _reinit_layer(classifier: ClipClassifier, index: int, n_blocks: int) -> None:
    visual = classifier.visual
    width = visual.conv1.out_channels
    if index == 0:
        modules = [getattr(visual, n) for n in STEM if isinstance(getattr(visual, n, None), nn.Module)]
        params = [getattr(visual, n) for n in ("class_embedding", "positional_embedding") if hasattr(visual, n)]
    elif index <= n_blocks:
        modules, params = [visual.transformer.resblocks[index - 1]], []
    else:
        modules = [m for n, m in visual.named_children() if n not in (*STEM, "transformer")]
        params = [p for n, p in visual.named_parameters(recurse=False) if n not in STEM]
        _reinit_head(classifier)
    for module in modules:
        _reinit_module(module, width)
    for param in params:
        nn.init.normal_(param.data, std=width**-0.5)


def _reinit_module(module, width: int) -> None:
    """reset_parameters where a module has it; attention in-projections and loose weights: normal(width^-0.5)."""
    for sub in module.modules():
        if isinstance(sub, nn.MultiheadAttention):
            if sub.in_proj_weight is not None:
                nn.init.normal_(sub.in_proj_weight.data, std=width**-0.5)
            if sub.in_proj_bias is not None:
                nn.init.zeros_(sub.in_proj_bias.data)
        elif hasattr(sub, "reset_parameters"):
            sub.reset_parameters()
        else:
            for param in sub.parameters(recurse=False):
                if param.ndim >= 2:
                    nn.init.normal_(param.data, std=width**-0.5)


def _reinit_head(classifier: ClipClassifier) -> None:
    """A random head of the same scale as the text head: random unit rows x the text head's norm."""
    with torch.no_grad():
        scale = classifier.head.weight.norm(dim=1, keepdim=True).mean()
        weight = torch.nn.functional.normalize(torch.randn_like(classifier.head.weight), dim=1)
        classifier.head.weight.copy_(weight * scale)
        classifier.head.bias.zero_()
