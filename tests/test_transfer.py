"""freeze / unfreeze / trainable / param_groups / refresh_optimizer."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import torchkeep
from torchkeep.tutorial import TheModelClass


def step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor) -> None:
    model.train()
    optimizer.zero_grad()
    model(images).sum().backward()
    optimizer.step()


def test_frozen_backbone_stays_bitwise_equal_including_batchnorm_stats(images: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = TheModelClass()
    report = torchkeep.freeze(model)
    assert report.trainable == 0
    report = torchkeep.unfreeze(model, "fc2")
    assert report.changed == ("fc2.weight", "fc2.bias")
    assert report.trainable == 1001
    assert "bn" in report.eval_norm_layers
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(torchkeep.trainable(model), lr=0.5)
    step(model, optimizer, images)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"fc2.weight", "fc2.bias"}  # running_mean/var and num_batches_tracked included


def test_plain_requires_grad_false_lets_batchnorm_drift(images: torch.Tensor) -> None:
    """The trap freeze() closes: without bn='eval' the statistics move."""
    model = TheModelClass()
    for p in model.parameters():
        p.requires_grad_(False)
    model.fc2.requires_grad_(True)
    stats = model.bn.running_mean.clone()
    step(model, torch.optim.SGD(torchkeep.trainable(model), lr=0.5), images)
    assert not torch.equal(model.bn.running_mean, stats)


def test_bn_train_keeps_normalization_trainable(images: torch.Tensor) -> None:
    model = TheModelClass()
    torchkeep.freeze(model, bn="train")
    assert model.bn.weight.requires_grad
    assert not model.conv.weight.requires_grad
    stats = model.bn.running_mean.clone()
    model.train()
    model(images)
    assert not torch.equal(model.bn.running_mean, stats)


def test_unfreezing_a_batchnorm_returns_it_to_the_models_mode(images: torch.Tensor) -> None:
    model = TheModelClass()
    torchkeep.freeze(model)
    model.train()
    model(images)
    assert not model.bn.training
    torchkeep.unfreeze(model)
    assert model.bn.training
    stats = model.bn.running_mean.clone()
    model(images)
    assert not torch.equal(model.bn.running_mean, stats)
    assert torchkeep.unfreeze(model).changed == ()


@pytest.mark.parametrize(
    ("target", "frozen"),
    [
        ("fc1", {"fc1.weight", "fc1.bias"}),
        ("fc*.weight", {"fc1.weight", "fc2.weight"}),
        (nn.Linear, {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}),
    ],
)
def test_targets_by_name_glob_and_type(target: object, frozen: set[str]) -> None:
    model = TheModelClass()
    torchkeep.freeze(model, target)  # type: ignore[arg-type]
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == frozen


def test_target_by_module_instance_and_no_match() -> None:
    model = TheModelClass()
    torchkeep.freeze(model, model.conv)
    assert not model.conv.weight.requires_grad
    assert model.fc1.weight.requires_grad
    with pytest.raises(torchkeep.NoMatchError, match="classifier"):
        torchkeep.freeze(model, "classifier")
    with pytest.raises(torchkeep.NoMatchError, match="not part of the model"):
        torchkeep.freeze(model, nn.Linear(2, 2))
    with pytest.raises(torchkeep.NoMatchError, match="LSTM"):
        torchkeep.freeze(model, nn.LSTM)


def test_frozen_model_still_pickles_and_saves(tmp_path: object) -> None:
    model = TheModelClass()
    torchkeep.freeze(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)  # hooks are kept outside the module, so a whole-model pickle still works
    assert buffer.tell() > 0


def test_param_groups_exclude_frozen_and_split_decay_and_lr() -> None:
    model = TheModelClass()
    torchkeep.freeze(model, "conv")
    groups = torchkeep.param_groups(model, lr=1e-3, backbone_lr=1e-4, head="fc2", weight_decay=0.05)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"backbone", "backbone (no decay)", "head", "head (no decay)"}
    assert by_name["head"]["params"] == [model.fc2.weight]
    assert by_name["head (no decay)"]["params"] == [model.fc2.bias]
    assert by_name["backbone (no decay)"]["params"] == [model.bn.weight, model.bn.bias, model.fc1.bias]
    assert by_name["backbone"]["lr"] == 1e-4
    assert by_name["backbone (no decay)"]["weight_decay"] == 0.0
    held = {id(p) for g in groups for p in g["params"]}
    assert id(model.conv.weight) not in held
    assert id(model.conv.bias) not in held
    torch.optim.AdamW(groups)  # torch accepts them
    with pytest.raises(ValueError, match="head="):
        torchkeep.param_groups(model, lr=1e-3, backbone_lr=1e-4)


def test_refresh_optimizer_adds_unfrozen_parameters_and_keeps_state(images: torch.Tensor) -> None:
    model = TheModelClass()
    torchkeep.freeze(model)
    torchkeep.unfreeze(model, "fc2")
    optimizer = torch.optim.SGD(torchkeep.trainable(model), lr=0.1, momentum=0.9)
    step(model, optimizer, images)
    momentum = optimizer.state[model.fc2.weight]["momentum_buffer"].clone()
    torchkeep.unfreeze(model, "fc1")
    assert torchkeep.refresh_optimizer(optimizer, model, lr=0.01) == 2
    assert optimizer.param_groups[1]["lr"] == 0.01
    assert optimizer.param_groups[1]["momentum"] == 0.9
    assert torch.equal(optimizer.state[model.fc2.weight]["momentum_buffer"], momentum)
    before = model.fc1.weight.detach().clone()
    step(model, optimizer, images)
    assert not torch.equal(model.fc1.weight, before)
    assert torchkeep.refresh_optimizer(optimizer, model) == 0


def test_report_prints() -> None:
    model = TheModelClass()
    text = str(torchkeep.freeze(model, "fc1"))
    assert "frozen" in text
    assert "trainable" in text
