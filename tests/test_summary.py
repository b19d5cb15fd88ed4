"""summarize: parameters vs buffers, as PyTorch itself counts them."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

import torchkeep
from conftest import TiedNet
from torchkeep.tutorial import TheModelClass

TUTORIAL_SHAPES = {
    "conv.weight": (16, 3, 3, 3),
    "conv.bias": (16,),
    "bn.weight": (16,),
    "bn.bias": (16,),
    "bn.running_mean": (16,),
    "bn.running_var": (16,),
    "bn.num_batches_tracked": (),
    "fc1.weight": (1000, 576),
    "fc1.bias": (1000,),
    "fc2.weight": (1, 1000),
    "fc2.bias": (1,),
}


def test_tutorial_model_has_8_parameters_3_buffers_11_entries() -> None:
    model = TheModelClass()
    summary = torchkeep.summarize(model)
    assert len(summary.parameters) == 8
    assert len(summary.buffers) == 3
    assert len(summary.state_dict_entries) == 11
    assert {r.name: r.shape for r in summary.rows} == TUTORIAL_SHAPES
    assert [r.name for r in summary.rows] == list(model.state_dict())
    assert {
        r.name: tuple(t.shape) for r, t in zip(summary.rows, model.state_dict().values(), strict=True)
    } == {r.name: r.shape for r in summary.rows}
    assert {r.name for r in summary.buffers} == {
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
    }
    assert summary.parameter_numel == sum(p.numel() for p in model.parameters())
    assert summary.trainable_numel == summary.parameter_numel
    assert summary.total_bytes == sum(t.nbytes for t in model.state_dict().values())
    text = str(summary)
    assert "bn.running_var" in text
    assert "8 parameters" in text
    assert "3 buffers" in text
    assert "11 state-dict entries" in text


def test_frozen_non_persistent_and_tied_are_marked() -> None:
    model = TiedNet()
    model.register_buffer("scratch", torch.zeros(3), persistent=False)
    model.embed.weight.requires_grad_(False)
    summary = torchkeep.summarize(model)
    rows = {r.name: r for r in summary.rows}
    assert rows["out.weight"].tied_to == "embed.weight"
    assert rows["embed.weight"].requires_grad is False
    assert rows["scratch"].in_state_dict is False
    assert summary.parameter_numel == 40  # the tied weight counts once
    assert summary.trainable_numel == 0
    text = str(summary)
    assert "frozen" in text
    assert "tied to embed.weight" in text
    assert "not saved" in text


def test_file_summaries_match_the_model(tmp_path: Path) -> None:
    model = TheModelClass()
    for name in ("w.safetensors", "w.pt"):
        path = torchkeep.save_weights(model, tmp_path / name)
        summary = torchkeep.summarize(path)
        assert {r.name: r.shape for r in summary.rows} == TUTORIAL_SHAPES
        assert summary.file_size == path.stat().st_size
        assert summary.total_bytes == torchkeep.summarize(model).total_bytes
        assert all(r.kind == "tensor" for r in summary.rows)
        data = json.loads(json.dumps(summary.to_dict()))
        assert data["totals"]["entries"] == 11


def test_safetensors_summary_reads_only_the_header(tmp_path: Path) -> None:
    path = torchkeep.save_weights({"big": torch.zeros(1000, 1000)}, tmp_path / "w.safetensors")
    with path.open("r+b") as f:  # damage the data, not the header: a header-only read still works
        f.seek(-100, 2)
        f.write(b"\xff" * 100)
    summary = torchkeep.summarize(path)
    assert summary.rows[0].shape == (1000, 1000)
    assert summary.rows[0].dtype == "float32"


def test_summary_of_a_state_dict_marks_tied() -> None:
    w = torch.ones(3)
    summary = torchkeep.summarize({"a": w, "b": w, "c": torch.zeros(2)})
    assert [r.tied_to for r in summary.rows] == [None, "a", None]
    assert summary.total_numel == 5


def test_summary_of_a_checkpoint_shows_its_model(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    torchkeep.save_checkpoint(tmp_path / "c.tar", model=model, epoch=1)
    assert {r.name for r in torchkeep.summarize(tmp_path / "c.tar").rows} == {"weight", "bias"}


def test_summary_of_a_checkpoint_or_run_folder_shows_the_model(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    folder = torchkeep.Checkpointer(tmp_path).save(1, model=model, optimizer=optimizer)
    assert {r.name for r in torchkeep.summarize(folder).rows} == {"weight", "bias"}  # the model's weights
    assert {r.name for r in torchkeep.summarize(tmp_path).rows} == {"weight", "bias"}  # the run's latest
