"""train.model and train.checkpoint: the head from templates, layer freezing / re-initialisation, checkpoints."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from helpers_train import CLASSES

from curate.errors import CurateError
from curate.models import load_clip, text_classifier
from train.checkpoint import check_architecture, read_checkpoint, save_checkpoint
from train.model import build_classifier, freeze_layers, layer_names, layer_of

TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def bundle(torch_one_thread):
    return load_clip("tiny-clip", None)


def _classifier(bundle):
    """A fresh classifier whose every weight is perturbed (so no value equals an init default)."""
    fresh = dataclasses.replace(bundle, model=copy.deepcopy(bundle.model))
    classifier = build_classifier(fresh, list(CLASSES), TEMPLATES)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in classifier.parameters():
            param.add_(torch.randn_like(param) * 0.05 + 0.01)
    return fresh, classifier


def test_head_is_template_average_times_logit_scale(bundle):
    classifier = build_classifier(bundle, list(CLASSES), TEMPLATES)
    text = text_classifier(bundle, list(CLASSES), TEMPLATES).T
    scale = bundle.model.logit_scale.exp().item()
    assert classifier.head.weight.shape == (5, 32)
    assert torch.allclose(classifier.head.weight, text * scale, atol=1e-5)
    assert torch.allclose(classifier.head.weight.norm(dim=1), torch.full((5,), scale), atol=1e-4)
    assert torch.count_nonzero(classifier.head.bias) == 0
    assert torch.equal(classifier.zero_shot_weight, classifier.head.weight.detach())
    images = torch.randn(3, 3, 32, 32)
    features = classifier.features(images)
    assert torch.allclose(features.norm(dim=1), torch.ones(3), atol=1e-5)  # normalised before the head
    assert torch.allclose(classifier(images), features @ classifier.head.weight.T, atol=1e-5)


def test_layers_counted_as_in_seed_001(bundle):
    classifier = build_classifier(bundle, list(CLASSES), TEMPLATES)
    assert layer_names(classifier) == ["stem", "block1", "block2", "block3", "block4", "head"]
    assert layer_of("visual.conv1.weight", 4) == 0
    assert layer_of("visual.positional_embedding", 4) == 0
    assert layer_of("visual.transformer.resblocks.2.mlp.c_fc.weight", 4) == 3
    assert layer_of("visual.proj", 4) == 5
    assert layer_of("head.weight", 4) == 5


@pytest.mark.parametrize("n_frozen", [1, 2, 5])
def test_freeze_freezes_first_layers_and_reinitialises_exactly_the_rest(bundle, n_frozen):
    _, classifier = _classifier(bundle)
    before = {n: p.detach().clone() for n, p in classifier.named_parameters()}
    summary = freeze_layers(classifier, n_frozen, reinit=True, seed=0)
    assert summary["layers"] == 6 and len(summary["frozen"]) == n_frozen and summary["reinitialised"]
    for name, param in classifier.named_parameters():
        frozen = layer_of(name, 4) < n_frozen
        assert param.requires_grad is not frozen, name
        assert torch.equal(param, before[name]) is frozen, name  # frozen kept, every other tensor re-initialised
    stem = {"visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre.weight", "visual.ln_pre.bias"}
    trained = {n for n, p in classifier.named_parameters() if p.requires_grad}
    if n_frozen == 5:
        assert trained == {"visual.ln_post.weight", "visual.ln_post.bias", "visual.proj", "head.weight", "head.bias"}
    assert not (stem & trained)


def test_reinit_is_seeded_and_head_keeps_its_scale(bundle):
    _, first = _classifier(bundle)
    _, second = _classifier(bundle)
    _, other = _classifier(bundle)

    def block(classifier):
        return classifier.visual.transformer.resblocks[3].attn.in_proj_weight

    before = block(first).detach().clone()
    freeze_layers(first, 3, seed=7)
    torch.manual_seed(123)  # the global RNG state must not matter, only the seed
    freeze_layers(second, 3, seed=7)
    freeze_layers(other, 3, seed=8)
    assert not torch.equal(block(first), before)  # the block was re-initialised
    assert torch.equal(block(first), block(second))
    assert torch.equal(first.head.weight, second.head.weight)
    assert not torch.equal(block(first), block(other))  # another seed, other weights
    assert not torch.equal(first.head.weight, other.head.weight)
    scale = first.zero_shot_weight.norm(dim=1).mean()
    assert torch.allclose(first.head.weight.norm(dim=1), torch.full((5,), float(scale)), rtol=0.05)


def test_no_reinit_keeps_weights_and_zero_freezes_nothing(bundle):
    _, classifier = _classifier(bundle)
    before = {n: p.detach().clone() for n, p in classifier.named_parameters()}
    freeze_layers(classifier, 3, reinit=False)
    assert all(torch.equal(p, before[n]) for n, p in classifier.named_parameters())
    assert {layer_of(n, 4) for n, p in classifier.named_parameters() if p.requires_grad} == {3, 4, 5}
    summary = freeze_layers(classifier, 0, reinit=True)
    assert not summary["reinitialised"] and all(p.requires_grad for p in classifier.parameters())
    assert all(torch.equal(p, before[n]) for n, p in classifier.named_parameters())


def test_freezing_every_layer_is_refused(bundle):
    _, classifier = _classifier(bundle)
    with pytest.raises(CurateError, match=r"0\.\.5.*--eval-only"):
        freeze_layers(classifier, 6)


def test_checkpoint_loads_back_through_the_registry(bundle, tmp_path):
    fresh, classifier = _classifier(bundle)
    path = save_checkpoint(tmp_path / "ck.pt", fresh, classifier, list(CLASSES), epoch=3, extra={"step": 9})
    loaded = load_clip("tiny-clip", str(path))
    for name, value in fresh.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name
    data = check_architecture(path, "tiny-clip")
    assert data["epoch"] == 3 and data["classes"] == list(CLASSES) and data["step"] == 9
    assert torch.equal(data["head"]["weight"], classifier.head.weight.detach())
    with pytest.raises(CurateError, match="is for model 'tiny-clip', not 'ViT-B-16'"):
        check_architecture(path, "ViT-B-16")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CurateError, match="cannot read checkpoint"):
        read_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(CurateError, match="cannot load CLIP 'tiny-clip' with pretrained"):
        load_clip("tiny-clip", str(tmp_path / "bad.pt"))
    for junk, error in [(b"hello\n", "KeyError"), (b"", "EOFError")]:  # what pickle makes of other files
        (tmp_path / "junk.pt").write_bytes(junk)
        with pytest.raises(CurateError, match=f"^cannot read checkpoint .*junk.pt: {error}"):
            read_checkpoint(tmp_path / "junk.pt")  # not mmap's advice to re-save the file
        with pytest.raises(CurateError, match=f"with pretrained '.*junk.pt': not a checkpoint open_clip reads \\({error}"):
            load_clip("tiny-clip", str(tmp_path / "junk.pt"))


def test_model_folders_and_checkpoints_resolve_to_the_model_asked_for(bundle, tmp_path, monkeypatch):
    import json

    from curate.models import CONFIG_DIR

    fresh, classifier = _classifier(bundle)
    checkpoint = save_checkpoint(tmp_path / "ck.pt", fresh, classifier, list(CLASSES), epoch=1)
    folder = tmp_path / "tiny-folder"  # open_clip's local-dir layout: a config and the weights
    folder.mkdir()
    config = json.loads((CONFIG_DIR / "tiny-clip.json").read_text())
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    torch.save(fresh.model.state_dict(), folder / "open_clip_pytorch_model.bin")
    loaded = load_clip(str(folder), None)
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in fresh.model.state_dict().items())
    with pytest.raises(CurateError, match="model folder .*tiny-folder brings its own weights, so checkpoint .*ck.pt' would be ignored"):
        load_clip(str(folder), str(checkpoint))  # open_clip dropped the checkpoint without a word
    (tmp_path / "copy.ckpt").write_bytes(checkpoint.read_bytes())  # a checkpoint by any name is a checkpoint
    renamed = load_clip("tiny-clip", str(tmp_path / "copy.ckpt"))
    assert all(torch.equal(renamed.model.state_dict()[k], v) for k, v in fresh.model.state_dict().items())
    with pytest.raises(CurateError, match="^checkpoint .*ck.pt does not fit model 'ViT-B-16'"):
        load_clip("ViT-B-16", str(checkpoint))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ViT-B-16").mkdir()  # a stray folder named like an architecture, without a config
    from curate.models import _resolve, default_pretrained

    assert _resolve("ViT-B-16", "") == ("ViT-B-16", None) and default_pretrained("ViT-B-16") == "laion2b_s34b_b88k"


def test_a_hub_tag_without_a_network_fails_at_once_with_what_to_do(monkeypatch):
    """Without a network the hub client retried each weight file for ~25 s (51 s for the default model)."""
    import socket
    import time

    def unreachable(*args, **kwargs):
        raise OSError("Network is unreachable")

    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    started = time.perf_counter()
    with pytest.raises(CurateError, match=r"^cannot load CLIP 'RN50' with pretrained 'openai': .*\(the Hugging Face hub "
                                          r"cannot be reached .*: give a checkpoint path, or '' for random weights\)$"):
        load_clip("RN50", "openai")
    assert time.perf_counter() - started < 20
