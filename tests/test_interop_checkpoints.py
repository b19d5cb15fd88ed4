"""Checkpoints written by the real libraries (Lightning, timm, HF Trainer, accelerate), restored by torchkeep.

Each is compared with what the library itself (or ``torch.load`` with
``weights_only=False``, which is what they call) loads: ``torch.equal`` on
the weights and on every optimizer state tensor.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import random
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import torchkeep
from torchkeep.safety.opaque import VALUE_TYPES

WORKER = Path(__file__).with_name("_opaque_worker.py")


def same_optimizer_state(ours: dict[str, Any], theirs: dict[str, Any]) -> bool:
    if ours["param_groups"] != theirs["param_groups"] or ours["state"].keys() != theirs["state"].keys():
        return False
    for key, entry in ours["state"].items():
        other = theirs["state"][key]
        if entry.keys() != other.keys():
            return False
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and not torch.equal(value, other[name]):
                return False
    return True


def same_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    mine = model.state_dict()
    return mine.keys() == state.keys() and all(torch.equal(mine[k], state[k]) for k in mine)


# -- Lightning ---------------------------------------------------------------------------------

lightning = pytest.importorskip("lightning.pytorch")


@dataclasses.dataclass
class Cfg:
    width: int = 4
    name: str = "tiny"


class OneOptimizer(lightning.LightningModule):  # type: ignore[misc,name-defined]
    def __init__(self, args: Any = None, cfg: Any = None, root: Any = None, when: Any = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch: Any, index: int) -> torch.Tensor:
        loss: torch.Tensor = self.layer(batch[0]).pow(2).mean()
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class TwoOptimizers(lightning.LightningModule):  # type: ignore[misc,name-defined]
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 1)

    def training_step(self, batch: Any, index: int) -> None:
        first, second = self.optimizers()
        loss = self.b(self.a(batch[0])).pow(2).mean()
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(loss)
        first.step()
        second.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.adam(), self.sgd()]

    def adam(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.a.parameters(), lr=0.01)

    def sgd(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.b.parameters(), lr=0.1, momentum=0.9)


def fit(module: Any, folder: Path) -> Path:
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(12, 4)), batch_size=4)
    saver = ModelCheckpoint(dirpath=folder, save_last=True)
    trainer = lightning.Trainer(
        max_steps=3,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        accelerator="cpu",
        callbacks=[saver],
        default_root_dir=folder,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers and logging
        trainer.fit(module, data)
    return folder / "last.ckpt"


@pytest.fixture(scope="module")
def lightning_one(tmp_path_factory: pytest.TempPathFactory) -> Path:
    args = argparse.Namespace(lr=0.1, out=pathlib.PosixPath("/tmp/run"))
    module = OneOptimizer(args, Cfg(), pathlib.PosixPath("/data/set"), datetime.date(2024, 5, 17))
    return fit(module, tmp_path_factory.mktemp("lightning1"))


@pytest.fixture(scope="module")
def lightning_two(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fit(TwoOptimizers(), tmp_path_factory.mktemp("lightning2"))


def test_lightning_hparams_needing_code_come_back_as_placeholders(lightning_one: Path) -> None:
    theirs = torch.load(lightning_one, weights_only=False)
    with pytest.raises(Exception, match="weights_only"):
        torch.load(lightning_one, weights_only=True)  # what torch does: refuse everything
    model = OneOptimizer()
    optimizer = model.configure_optimizers()
    info = torchkeep.load_checkpoint(lightning_one, model=model, optimizer=optimizer)
    assert info.layout == "lightning"
    assert info.restored == ("model", "optimizer")
    assert same_weights(model, theirs["state_dict"])
    assert same_optimizer_state(optimizer.state_dict(), theirs["optimizer_states"][0])
    assert (info.epoch, info.step) == (theirs["epoch"], theirs["global_step"])
    hp = info.hyper_parameters
    assert isinstance(hp["args"], torchkeep.Opaque)
    assert hp["args"].name == "argparse.Namespace"
    assert hp["args"].state["lr"] == 0.1
    assert hp["cfg"].name.endswith("Cfg")
    assert hp["cfg"].state == {"width": 4, "name": "tiny"}
    assert hp["root"].name == "pathlib.PosixPath"
    assert hp["root"].args == ("/", "data", "set")
    assert "hyper_parameters['when']: datetime.date" in info.placeholders
    callback = next(iter(info.callbacks.values()))
    saved_callback = next(iter(theirs["callbacks"].values()))
    assert callback["best_model_path"] == saved_callback["best_model_path"] == info.best_checkpoint
    assert (
        info.loops["fit_loop"]["epoch_loop.state_dict"]
        == theirs["loops"]["fit_loop"]["epoch_loop.state_dict"]
    )


def test_lightning_hparams_rebuilt_on_request(lightning_one: Path) -> None:
    info = torchkeep.load_checkpoint(lightning_one, rebuild=VALUE_TYPES)
    hp = info.hyper_parameters
    assert hp["args"] == argparse.Namespace(lr=0.1, out=pathlib.PurePosixPath("/tmp/run"))
    assert hp["root"] == pathlib.PurePosixPath("/data/set")
    assert hp["when"] == datetime.date(2024, 5, 17)
    assert isinstance(hp["cfg"], torchkeep.Opaque)  # a dataclass of the user's: never rebuilt
    with pytest.raises(torchkeep.UnsafeFileError, match=r"argparse\.Namespace"):
        torchkeep.load_checkpoint(lightning_one, opaque="refuse")
    with pytest.raises(ValueError, match="Cfg"):
        torchkeep.load_checkpoint(lightning_one, rebuild=("tests.Cfg",))


def test_lightning_two_optimizers_by_list_and_by_index(lightning_two: Path) -> None:
    theirs = torch.load(lightning_two, weights_only=False)
    model = TwoOptimizers()
    adam, sgd = model.adam(), model.sgd()
    info = torchkeep.load_checkpoint(lightning_two, model=model, optimizer=[adam, sgd])
    assert info.restored == ("model", "optimizer[0]", "optimizer[1]")
    assert same_weights(model, theirs["state_dict"])
    assert same_optimizer_state(adam.state_dict(), theirs["optimizer_states"][0])
    assert same_optimizer_state(sgd.state_dict(), theirs["optimizer_states"][1])
    sgd_alone = TwoOptimizers().sgd()
    torchkeep.load_checkpoint(lightning_two, optimizer=sgd_alone, optimizer_index=1)
    assert same_optimizer_state(sgd_alone.state_dict(), theirs["optimizer_states"][1])


def test_lightning_two_optimizers_refused_when_ambiguous_or_wrong(lightning_two: Path) -> None:
    model = TwoOptimizers()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sgd = model.sgd()
    with pytest.raises(torchkeep.CheckpointMismatchError, match="2 optimizer states") as err:
        torchkeep.load_checkpoint(lightning_two, model=model, optimizer=sgd)
    assert "Adam/AdamW-like" in str(err.value)
    assert "SGD-like" in str(err.value)
    assert "(4, 4)" in str(err.value)
    with pytest.raises(torchkeep.CheckpointMismatchError, match="no dampening, momentum"):
        torchkeep.load_checkpoint(lightning_two, model=model, optimizer=sgd, optimizer_index=0)
    # the same class over parameters of the same count but other shapes: the shapes say no
    wrong = torch.optim.Adam(model.b.parameters(), lr=0.01)
    with pytest.raises(
        torchkeep.CheckpointMismatchError, match=r"'exp_avg' .* \(4, 4\), the parameter has shape \(1, 4\)"
    ):
        torchkeep.load_checkpoint(lightning_two, model=model, optimizer=wrong, optimizer_index=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert sgd.state_dict()["state"] == {}
    assert wrong.state_dict()["state"] == {}


# -- timm --------------------------------------------------------------------------------------


def test_timm_checkpoint_saver(tmp_path: Path) -> None:
    timm_utils = pytest.importorskip("timm.utils")
    import timm.optim

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = timm.optim.create_optimizer_v2(model, "momentum", lr=0.1)  # type: ignore[attr-defined]
    args = argparse.Namespace(model="tiny", lr=0.1, output=pathlib.PosixPath("/out"))
    saver = timm_utils.CheckpointSaver(
        model, optimizer, args=args, checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path)
    )
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    saver.save_checkpoint(epoch=1, metric=0.5)
    path = tmp_path / "last.pth.tar"
    theirs = torch.load(path, weights_only=False)
    fresh = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    fresh_optimizer = timm.optim.create_optimizer_v2(fresh, "momentum", lr=0.1)  # type: ignore[attr-defined]
    info = torchkeep.load_checkpoint(
        path, model=fresh, optimizer=fresh_optimizer, rebuild=("argparse.Namespace",)
    )
    assert info.layout == "timm"
    assert info.restored == ("model", "optimizer")
    assert same_weights(fresh, theirs["state_dict"])
    assert same_optimizer_state(fresh_optimizer.state_dict(), theirs["optimizer"])
    assert info.epoch == 1
    assert info.metrics["metric"] == 0.5
    assert info.hyper_parameters["arch"] == "tiny"
    assert info.hyper_parameters["args"].lr == 0.1
    assert isinstance(info.hyper_parameters["args"].output, torchkeep.Opaque)  # not asked to rebuild paths
    assert info.extra["saver"]["pending"] == (1, 0.5)


# -- HF Trainer --------------------------------------------------------------------------------


def _tiny_bert(seed: int) -> Any:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=2,
    )
    return transformers.BertForSequenceClassification(config)


def _trainer(model: Any, folder: Path) -> Any:
    import transformers

    generator = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": torch.randint(0, 40, (6,), generator=generator), "labels": torch.tensor(i % 2)}
        for i in range(8)
    ]
    args = transformers.TrainingArguments(
        output_dir=str(folder),
        max_steps=2,
        save_steps=2,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=data)


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(_tiny_bert(0), folder).train()
    return folder / "checkpoint-2"


def test_hf_trainer_checkpoint_folder(hf_checkpoint: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    ours = _trainer(_tiny_bert(1), tmp_path / "ours")
    ours.create_optimizer_and_scheduler(num_training_steps=2)
    theirs = _trainer(_tiny_bert(2), tmp_path / "theirs")
    theirs.create_optimizer_and_scheduler(num_training_steps=2)
    theirs._load_optimizer_and_scheduler(str(hf_checkpoint))
    info = torchkeep.load_checkpoint(
        hf_checkpoint,
        model=ours.model,
        optimizer=ours.optimizer,
        scheduler=ours.lr_scheduler,
        restore_rng=True,
    )
    assert info.layout == "hf-trainer"
    assert info.restored == ("model", "optimizer", "scheduler", "rng")
    assert same_weights(ours.model, load_file(str(hf_checkpoint / "model.safetensors")))
    assert same_optimizer_state(ours.optimizer.state_dict(), theirs.optimizer.state_dict())
    assert ours.lr_scheduler.state_dict() == theirs.lr_scheduler.state_dict()
    state = json.loads((hf_checkpoint / "trainer_state.json").read_text())
    assert (info.step, info.epoch, info.log_history) == (2, state["epoch"], state["log_history"])
    assert info.best_metric == state["best_metric"]
    args = info.hyper_parameters["training_args"]
    assert args.name == "transformers.training_args.TrainingArguments"
    assert args.state["max_steps"] == 2
    # the RNG streams continue as HF's own _load_rng_state would make them
    drawn = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    saved = torch.load(hf_checkpoint / "rng_state.pth", weights_only=False)
    random.setstate(saved["python"])
    np.random.set_state(saved["numpy"])
    torch.set_rng_state(saved["cpu"])
    assert drawn == (random.random(), float(np.random.rand()), float(torch.rand(1)))


def test_hf_optimizer_file_alone_and_a_non_contradicting_message(hf_checkpoint: Path) -> None:
    model = _tiny_bert(3)
    trainer = _trainer(model, hf_checkpoint.parent / "alone")
    trainer.create_optimizer_and_scheduler(num_training_steps=2)
    info = torchkeep.load_checkpoint(hf_checkpoint / "optimizer.pt", optimizer=trainer.optimizer)
    assert info.layout == "optimizer"
    assert info.restored == ("optimizer",)
    assert same_optimizer_state(trainer.optimizer.state_dict(), torch.load(hf_checkpoint / "optimizer.pt"))
    with pytest.raises(torchkeep.CheckpointMismatchError, match="holds no model state"):
        torchkeep.load_checkpoint(hf_checkpoint / "optimizer.pt", model=model)


# -- accelerate --------------------------------------------------------------------------------


def test_accelerate_save_state_folder(tmp_path: Path) -> None:
    accelerate = pytest.importorskip("accelerate")

    def build(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        return model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)

    accelerator = accelerate.Accelerator(cpu=True)
    model, optimizer, scheduler = accelerator.prepare(*build(0))
    model(torch.randn(4, 4)).pow(2).mean().backward()
    optimizer.step()
    scheduler.step()
    accelerator.save_state(str(tmp_path / "state"))
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    other = accelerate.Accelerator(cpu=True)
    prepared = other.prepare(*build(1))
    other.load_state(str(tmp_path / "state"))
    mine = build(2)
    info = torchkeep.load_checkpoint(
        tmp_path / "state", model=mine[0], optimizer=mine[1], scheduler=mine[2], restore_rng=True
    )
    assert info.layout == "accelerate"
    assert info.restored == ("model", "optimizer", "scheduler", "rng")
    assert same_weights(mine[0], prepared[0].state_dict())
    assert same_optimizer_state(mine[1].state_dict(), prepared[1].optimizer.state_dict())
    assert mine[2].state_dict()["last_epoch"] == 1
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


# -- nothing runs: the audit hook ----------------------------------------------------------------


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_loading_hparams_that_need_code_runs_nothing(lightning_one: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    weights = {"layer.weight": torch.ones(1, 4), "layer.bias": torch.zeros(1)}
    disguised = tmp_path / "disguised.ckpt"
    torch.save(
        {
            "state_dict": weights,
            "pytorch-lightning_version": "2.6.6",
            "hyper_parameters": {"lr": 0.1, "cmd": _Payload(marker)},
        },
        disguised,
    )
    in_weights = tmp_path / "in_weights.ckpt"
    torch.save(
        {"state_dict": {**weights, "x": _Payload(marker)}, "pytorch-lightning_version": "2.6.6"}, in_weights
    )
    cases = [
        {"path": str(lightning_one), "model": "tiny"},
        {"path": str(disguised), "model": "tiny"},
        {"path": str(in_weights), "model": "tiny"},
    ]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    done = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path / "cases.json")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["violations"] == []
    assert not marker.exists()
    real, payload, refused = report["results"]
    assert real["restored"] == ["model"]
    assert "Namespace(lr=0.1, out=PurePosixPath('/tmp/run'))" in real["hparams"]
    assert "hyper_parameters['cfg']: " in " ".join(real["placeholders"])
    assert payload["restored"] == ["model"]
    assert payload["checksum"] == 4.0
    assert "hyper_parameters['cmd']: posix.system" in payload["placeholders"]
    assert "Opaque(posix.system('touch " in payload["hparams"]
    assert refused["error"] == "UnsafeFileError"
    assert "posix.system" in refused["message"]
    for path in (lightning_one, disguised):  # scan's verdict is unchanged: torch.load would run these
        result = torchkeep.scan(path)
        assert result.verdict == "UNSAFE"
    assert "posix.system" in {f.detail for f in torchkeep.scan(disguised).findings if f.kind == "import"}
