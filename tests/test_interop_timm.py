"""replace_head on real timm models (small configs, random init): every head, fresh and trainable."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import torchkeep

timm = pytest.importorskip("timm")

TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
MODELS: list[tuple[str, dict[str, Any], list[str]]] = [
    ("convnext_atto", {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)}, ["head.fc"]),
    ("resnet18", {"layers": [1, 1, 1, 1]}, ["fc"]),
    ("deit_tiny_distilled_patch16_224", TINY_VIT, ["head", "head_dist"]),
    ("vit_tiny_patch16_224", TINY_VIT, ["head"]),
    ("efficientnet_b0", {}, ["classifier"]),
]


def build(name: str, kwargs: dict[str, Any]) -> nn.Module:
    torch.manual_seed(0)
    model: nn.Module = timm.create_model(name, pretrained=False, **kwargs)
    return model


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("name", "kwargs", "heads"), MODELS, ids=[m[0] for m in MODELS])
def test_every_head_is_replaced_fresh_and_trainable_and_nothing_else_changes(
    name: str, kwargs: dict[str, Any], heads: list[str]
) -> None:
    model = build(name, kwargs)
    assert torchkeep.head_names(model) == heads
    before = snapshot(model)
    old_layers = {h: model.get_submodule(h) for h in heads}
    torchkeep.freeze(model)
    torchkeep.replace_head(model, 7)

    assert torchkeep.head_names(model) == heads
    assert model.num_classes == 7
    for head in heads:
        layer = model.get_submodule(head)
        assert isinstance(layer, nn.Linear)
        assert layer is not old_layers[head]
        assert layer.out_features == 7
        assert layer.in_features == old_layers[head].in_features
        assert all(p.requires_grad for p in layer.parameters())
    after = model.state_dict()
    head_keys = {f"{h}.{p}" for h in heads for p in ("weight", "bias")}
    assert set(before) - head_keys == set(after) - head_keys
    for key in set(before) - head_keys:
        assert torch.equal(after[key], before[key]), key
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == head_keys

    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)


def test_a_distilled_deit_trains_both_heads_to_the_new_classes() -> None:
    model = build("deit_tiny_distilled_patch16_224", TINY_VIT)
    torchkeep.replace_head(model, 3)
    model.set_distilled_training(True)
    model.train()
    logits, logits_dist = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 3)
    assert logits_dist.shape == (2, 3)
    (logits.sum() + logits_dist.sum()).backward()
    assert model.head.weight.grad is not None
    assert model.head_dist.weight.grad is not None


def test_timm_heads_keep_dtype_mode_and_take_dropout() -> None:
    model = build("resnet18", {"layers": [1, 1, 1, 1]}).to(torch.float64).eval()
    torchkeep.replace_head(model, 5, dropout=0.25)
    assert torchkeep.head_names(model) == ["fc.1"]
    assert isinstance(model.fc[0], nn.Dropout)
    assert model.fc[0].p == 0.25
    assert model.fc[1].weight.dtype == torch.float64
    assert not model.fc.training
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert out.shape == (2, 5)


def test_attr_still_overrides_timm_own_head() -> None:
    model = build("convnext_atto", {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)})
    norm_before = model.head.norm.weight.detach().clone()
    torchkeep.replace_head(model, 4, attr="head.fc")
    assert model.head.fc.out_features == 4
    assert torch.equal(model.head.norm.weight, norm_before)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 4)
