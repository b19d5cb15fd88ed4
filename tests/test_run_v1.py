"""Run folders written by format version 1 (torchkeep at f1dc140) still list, verify and restore."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import torchkeep
from conftest import TiedNet

V1 = Path(__file__).parent / "data" / "v1_run"


@pytest.fixture
def run(tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(V1, copy)
    return copy


def _expected() -> torch.Tensor:
    saved = torch.load(V1.parent / "v1_run_expected.pt", weights_only=True)
    return saved["embed.weight"]


def test_a_v1_run_lists_and_ranks(run: Path) -> None:
    ckpts = torchkeep.Checkpointer(run, monitor="val_loss", read_only=True)
    entries = ckpts.list(verify=True)
    assert [(e.step, e.valid, e.metrics) for e in entries] == [
        (1, True, {"val_loss": 0.5}),
        (2, True, {"val_loss": 0.7}),
    ]
    assert ckpts.best == run / "step-00000001"
    assert ckpts.latest == run / "step-00000002"


def test_a_v1_run_restores_model_optimizer_and_extra(run: Path) -> None:
    model = TiedNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    info = torchkeep.Checkpointer(run).restore(model=model, optimizer=opt, restore_rng=False)
    assert info is not None
    assert info.step == 2
    assert info.extra == {"note": "v1"}
    assert torch.equal(model.embed.weight, _expected())
    assert model.out.weight is model.embed.weight
    assert opt.param_groups[0]["lr"] == 0.1
    assert "momentum_buffer" in opt.state[model.embed.weight]


def test_a_v1_step_verifies_and_loads_as_weights(run: Path) -> None:
    from torchkeep.cli.verify import verify_path

    assert verify_path(run / "step-00000002") == [("step-00000002", True, "")]
    assert [ok for _, ok, _ in verify_path(run)] == [True, True]
    weights = torchkeep.consolidate(run / "step-00000002", run.parent / "w.safetensors")
    loaded = torchkeep.load_weights(weights)
    assert torch.equal(loaded["embed.weight"], _expected())
