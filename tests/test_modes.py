"""evaluating(): eval + inference mode, every submodule's flag restored."""

from __future__ import annotations

import pytest
import torch

import torchkeep
from torchkeep.tutorial import TheModelClass


def test_eval_inside_and_flags_restored_per_submodule(images: torch.Tensor) -> None:
    model = TheModelClass()
    model.train()
    model.bn.eval()  # a deliberately mixed state, e.g. a frozen BatchNorm
    before = {name: m.training for name, m in model.named_modules()}
    with torchkeep.evaluating(model) as same:
        assert same is model
        assert all(not m.training for m in model.modules())
        assert torch.is_inference_mode_enabled()
        first, second = model(images), model(images)
        assert torch.equal(first, second)  # Dropout is off
        assert not first.requires_grad
    assert {name: m.training for name, m in model.named_modules()} == before
    assert not torch.is_inference_mode_enabled()


def test_flags_restored_when_the_body_raises() -> None:
    model = TheModelClass().train()
    with pytest.raises(ValueError, match="boom"), torchkeep.evaluating(model):
        raise ValueError("boom")
    assert all(m.training for m in model.modules())


def test_batchnorm_statistics_do_not_move(images: torch.Tensor) -> None:
    model = TheModelClass().train()
    stats = model.bn.running_mean.clone()
    with torchkeep.evaluating(model):
        model(images)
    assert torch.equal(model.bn.running_mean, stats)


def test_inference_false_keeps_autograd(images: torch.Tensor) -> None:
    model = TheModelClass()
    x = images.clone().requires_grad_(True)
    with torchkeep.evaluating(model, inference=False):
        model(x).sum().backward()
    assert x.grad is not None
