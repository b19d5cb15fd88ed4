"""save_checkpoint / load_checkpoint: the classic layout, plain torch.load, other tools' files."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import torchkeep


def make() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler


def train(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: object, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 4)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()  # type: ignore[attr-defined]
        losses.append(loss.item())
    return losses


def test_round_trip_restores_everything(tmp_path: Path) -> None:
    model, optimizer, scheduler = make()
    train(model, optimizer, scheduler, 3)
    path = torchkeep.save_checkpoint(
        tmp_path / "ckpt.tar",
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        epoch=3,
        step=30,
        loss=torch.tensor(0.25),
        metrics={"val_acc": np.float64(0.75)},
        extra={"config": {"width": 8}},
    )
    model2, optimizer2, scheduler2 = make()
    info = torchkeep.load_checkpoint(path, model=model2, optimizer=optimizer2, scheduler=scheduler2)
    assert (info.epoch, info.step, info.loss) == (3, 30, 0.25)
    assert info.metrics == {"val_acc": 0.75}
    assert type(info.metrics["val_acc"]) is float
    assert info.extra == {"config": {"width": 8}}
    assert info.restored == ("model", "optimizer", "scheduler")
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert scheduler2.state_dict() == scheduler.state_dict()
    # both continue identically
    torch.manual_seed(7)
    first = train(model, optimizer, scheduler, 3)
    torch.manual_seed(7)
    second = train(model2, optimizer2, scheduler2, 3)
    assert first == second


def test_plain_torch_load_reads_it_with_the_classic_keys(tmp_path: Path) -> None:
    model, optimizer, _ = make()
    path = torchkeep.save_checkpoint(tmp_path / "c.pt", model=model, optimizer=optimizer, epoch=1, loss=0.5)
    content = torch.load(path, weights_only=True)
    assert {"epoch", "model_state_dict", "optimizer_state_dict", "loss", "rng_state"} <= set(content)
    model2, optimizer2, _ = make()
    model2.load_state_dict(content["model_state_dict"])
    optimizer2.load_state_dict(content["optimizer_state_dict"])


def test_reads_a_hand_written_classic_checkpoint(tmp_path: Path) -> None:
    model, optimizer, scheduler = make()
    train(model, optimizer, scheduler, 2)
    torch.save(
        {
            "epoch": 4,
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": optimizer.state_dict(),
            "loss": 0.125,
        },
        tmp_path / "hand.tar",
    )
    model2, optimizer2, _ = make()
    info = torchkeep.load_checkpoint(tmp_path / "hand.tar", model=model2, optimizer=optimizer2)
    assert info.layout == "classic"
    assert (info.epoch, info.loss) == (4, 0.125)
    assert optimizer2.state_dict()["state"][0]["exp_avg"].equal(optimizer.state_dict()["state"][0]["exp_avg"])


def test_reads_a_lightning_layout_ckpt(tmp_path: Path) -> None:
    model, optimizer, scheduler = make()
    train(model, optimizer, scheduler, 2)
    torch.save(
        {
            "epoch": 2,
            "global_step": 20,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "optimizer_states": [optimizer.state_dict()],
            "lr_schedulers": [scheduler.state_dict()],
        },
        tmp_path / "last.ckpt",
    )
    model2, optimizer2, scheduler2 = make()
    info = torchkeep.load_checkpoint(
        tmp_path / "last.ckpt", model=model2, optimizer=optimizer2, scheduler=scheduler2
    )
    assert info.layout == "lightning"
    assert (info.epoch, info.step) == (2, 20)
    assert info.model_report is not None
    assert info.model_report.renamed["model.0.weight"] == "0.weight"
    assert torch.equal(model2[0].weight, model[0].weight)
    assert scheduler2.state_dict() == scheduler.state_dict()


def test_rng_state_is_restored_on_request(tmp_path: Path) -> None:
    model, _, _ = make()
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torchkeep.save_checkpoint(tmp_path / "c.pt", model=model)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    torchkeep.load_checkpoint(tmp_path / "c.pt", restore_rng=True)
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(1), expected[2])


def test_restore_rng_without_a_saved_state_warns(tmp_path: Path) -> None:
    model, _, _ = make()
    torch.save({"model_state_dict": model.state_dict()}, tmp_path / "c.pt")
    with pytest.warns(torchkeep.RngRestoreWarning, match="no RNG state"):
        torchkeep.load_checkpoint(tmp_path / "c.pt", model=model, restore_rng=True)


def test_cuda_rng_states_that_cannot_be_restored_are_named(tmp_path: Path) -> None:
    from torchkeep.rng import capture_rng_state, restore_rng_state

    state = capture_rng_state()
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 2  # as if saved on a 2-GPU machine
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")
    with pytest.warns(torchkeep.RngRestoreWarning, match="2 CUDA device"):
        restore_rng_state(state)


def test_missing_part_is_a_typed_error_and_nothing_changes(tmp_path: Path) -> None:
    model, _, _ = make()
    torchkeep.save_checkpoint(tmp_path / "c.pt", model=model)
    model2, optimizer2, _ = make()
    with torch.no_grad():
        model2[0].weight.fill_(3.0)
    with pytest.raises(torchkeep.CheckpointMismatchError, match="no optimizer state") as info:
        torchkeep.load_checkpoint(tmp_path / "c.pt", model=model2, optimizer=optimizer2)
    assert info.value.part == "optimizer"
    assert torch.all(model2[0].weight == 3.0)


def test_optimizer_with_other_param_groups_is_refused_before_loading(tmp_path: Path) -> None:
    model, optimizer, _ = make()
    torchkeep.save_checkpoint(tmp_path / "c.pt", model=model, optimizer=optimizer)
    model2, _, _ = make()
    with torch.no_grad():
        model2[0].weight.fill_(3.0)
    two_groups = torch.optim.AdamW([{"params": model2[0].parameters()}, {"params": model2[3].parameters()}])
    with pytest.raises(torchkeep.CheckpointMismatchError, match="1 parameter group"):
        torchkeep.load_checkpoint(tmp_path / "c.pt", model=model2, optimizer=two_groups)
    assert torch.all(model2[0].weight == 3.0)
    fewer = torch.optim.AdamW(model2[0].parameters())
    with pytest.raises(torchkeep.CheckpointMismatchError, match="parameter group 0 holds 6"):
        torchkeep.load_checkpoint(tmp_path / "c.pt", model=model2, optimizer=fewer)


def test_model_of_another_architecture(tmp_path: Path) -> None:
    model, _, _ = make()
    torchkeep.save_checkpoint(tmp_path / "c.pt", model=model)
    with pytest.raises(torchkeep.KeyMismatchError):
        torchkeep.load_checkpoint(tmp_path / "c.pt", model=nn.Sequential(nn.Linear(4, 3)))


def test_values_a_safe_loader_cannot_read_are_refused(tmp_path: Path) -> None:
    class Config:
        pass

    model, _, _ = make()
    with pytest.raises(torchkeep.UnserializableValueError, match=r"extra\['cfg'\]\['obj'\]") as info:
        torchkeep.save_checkpoint(tmp_path / "c.pt", model=model, extra={"cfg": {"obj": Config()}})
    assert "dataclasses.asdict" in str(info.value)
    assert not (tmp_path / "c.pt").exists()


def test_numpy_and_str_subclasses_become_plain_values(tmp_path: Path) -> None:
    model, _, _ = make()
    extra = {"arr": np.arange(3), "n": np.int32(4), "version": torch.__version__, "ok": np.bool_(True)}
    path = torchkeep.save_checkpoint(tmp_path / "c.pt", model=model, extra=extra)
    loaded = torch.load(path, weights_only=True)["extra"]
    assert torch.equal(loaded["arr"], torch.arange(3))
    assert loaded["n"] == 4
    assert type(loaded["version"]) is str
    assert loaded["ok"] is True


def test_unknown_suffix(tmp_path: Path) -> None:
    model, _, _ = make()
    with pytest.raises(torchkeep.UnsupportedSuffixError, match=r"\.tar"):
        torchkeep.save_checkpoint(tmp_path / "c.json", model=model)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(torchkeep.NotAStateDictError):
        torchkeep.load_checkpoint(tmp_path / "list.pt")


@pytest.mark.parametrize(
    ("content", "what"),
    [
        ({"pytorch-lightning_version": "2.4", "optimizer_states": {"adam": {}}}, "optimizer_states"),
        ({"pytorch-lightning_version": "2.4", "lr_schedulers": "cosine"}, "lr_schedulers"),
        ({"model_state_dict": {}, "metrics": "val_loss=0.1"}, "metrics"),
        ({"model_state_dict": {}, "extra": [1, 2]}, "extra"),
        ({"model_state_dict": {}, "loss": torch.tensor([0.1, 0.2, 0.3])}, "loss"),
        ({"model_state_dict": {}, "loss": 10**400}, "loss"),
        ({"model_state_dict": {}, "epoch": "three"}, "epoch"),
        ({"model_state_dict": [1]}, "model_state_dict"),
    ],
)
def test_entries_of_the_wrong_type_are_refused_before_anything_changes(
    tmp_path: Path, content: dict[str, object], what: str
) -> None:
    path = tmp_path / "odd.ckpt"
    torch.save(content, path)
    model, _, _ = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(torchkeep.NotAStateDictError, match=what):
        torchkeep.load_checkpoint(path, model=model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_scalar_tensor_loss_is_still_read(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    torch.save({"model_state_dict": {}, "loss": torch.tensor(0.25), "epoch": 2}, path)
    info = torchkeep.load_checkpoint(path)
    assert (info.loss, info.epoch) == (0.25, 2)


def test_an_optimizer_state_torch_would_choke_on_is_a_mismatch(tmp_path: Path) -> None:
    model, optimizer, _ = make()
    path = tmp_path / "c.pt"
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": {"param_groups": "x"}}, path)
    with pytest.raises(torchkeep.CheckpointMismatchError, match="param_groups"):
        torchkeep.load_checkpoint(path, model=model, optimizer=optimizer)


def test_pytorch_examples_imagenet_layout(tmp_path: Path) -> None:
    model, optimizer, scheduler = make()
    train(model, optimizer, scheduler, 2)
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(
        {
            "epoch": 3,
            "arch": "resnet18",
            "state_dict": model.state_dict(),
            "best_acc1": torch.tensor(71.5),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        },
        path,
    )
    fresh, fresh_optimizer, fresh_scheduler = make()
    info = torchkeep.load_checkpoint(path, model=fresh, optimizer=fresh_optimizer, scheduler=fresh_scheduler)
    assert info.layout == "imagenet"
    assert info.restored == ("model", "optimizer", "scheduler")
    assert (info.epoch, info.metrics, info.hyper_parameters) == (3, {"best_acc1": 71.5}, {"arch": "resnet18"})
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    saved = optimizer.state_dict()["state"]
    assert all(torch.equal(saved[0][k], v) for k, v in fresh_optimizer.state_dict()["state"][0].items())


def test_an_entry_named_optimizer_that_is_not_one_is_said_so(tmp_path: Path) -> None:
    model, optimizer, _ = make()
    path = tmp_path / "c.pth"
    torch.save({"epoch": 1, "arch": "mlp", "state_dict": model.state_dict(), "optimizer": "adamw"}, path)
    with pytest.raises(torchkeep.CheckpointMismatchError) as err:
        torchkeep.load_checkpoint(path, model=model, optimizer=optimizer)
    message = str(err.value)
    assert "its entry 'optimizer' is 'adamw', not an optimizer state dict" in message
    assert "holds no optimizer state (it has" not in message


def test_a_bare_optimizer_state_file(tmp_path: Path) -> None:
    model, optimizer, scheduler = make()
    train(model, optimizer, scheduler, 1)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    _, fresh, _ = make()
    info = torchkeep.load_checkpoint(tmp_path / "optimizer.pt", optimizer=fresh)
    assert (info.layout, info.restored) == ("optimizer", ("optimizer",))
    assert torch.equal(
        fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"]
    )
    with pytest.raises(torchkeep.CheckpointMismatchError, match="holds no model state"):
        torchkeep.load_checkpoint(tmp_path / "optimizer.pt", model=model)


class _Config:
    def __init__(self) -> None:
        self.depth = 2


def test_placeholders_only_in_hyper_parameter_entries(tmp_path: Path) -> None:
    import argparse

    model, _, _ = make()
    allowed = tmp_path / "allowed.pt"
    torch.save(
        {"model_state_dict": model.state_dict(), "args": argparse.Namespace(lr=0.1), "epoch": 1}, allowed
    )
    info = torchkeep.load_checkpoint(allowed, model=make()[0], rebuild=("argparse.Namespace",))
    assert info.hyper_parameters == {"args": argparse.Namespace(lr=0.1)}
    in_metrics = tmp_path / "in_metrics.pt"
    torch.save({"model_state_dict": model.state_dict(), "metrics": {"cfg": _Config()}}, in_metrics)
    fresh = make()[0]
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(torchkeep.UnsafeFileError, match="outside the hyper-parameter entries"):
        torchkeep.load_checkpoint(in_metrics, model=fresh)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    bare = tmp_path / "bare.pt"
    torch.save(
        {"weight": torch.ones(1), "args": argparse.Namespace(lr=0.1)}, bare
    )  # a state dict: no entries
    with pytest.raises(torchkeep.UnsafeFileError, match=r"argparse\.Namespace"):
        torchkeep.load_checkpoint(bare)


def test_omegaconf_hyper_parameters_are_placeholders(tmp_path: Path) -> None:
    omegaconf = pytest.importorskip("omegaconf")
    model, _, _ = make()
    config = omegaconf.OmegaConf.create({"lr": 0.1, "layers": [1, 2]})
    path = tmp_path / "omega.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "pytorch-lightning_version": "2.6.6",
            "hyper_parameters": config,
            "hparams_type": type(config),
        },
        path,
    )
    fresh = make()[0]
    info = torchkeep.load_checkpoint(path, model=fresh)
    assert info.restored == ("model",)
    assert isinstance(info.extra["hparams_type"], torchkeep.Opaque)
    assert info.extra["hparams_type"].name == "omegaconf.dictconfig.DictConfig"
    assert any(p.endswith("omegaconf.dictconfig.DictConfig") for p in info.placeholders)
    whole = info.hyper_parameters["hyper_parameters"]
    assert whole.name == "omegaconf.dictconfig.DictConfig"
    assert "lr" in whole.state["_content"]
