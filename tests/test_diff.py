"""diff: which tensors changed between two sets of weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import torchkeep
from torchkeep.cli import main
from torchkeep.tutorial import TheModelClass


def test_fine_tuning_a_frozen_backbone_changes_only_the_head(tmp_path: Path, images: torch.Tensor) -> None:
    model = TheModelClass()
    torchkeep.save_weights(model, tmp_path / "before.safetensors")
    torchkeep.freeze(model)
    torchkeep.unfreeze(model, "fc2")
    optimizer = torch.optim.SGD(torchkeep.trainable(model), lr=0.5)
    model.train()
    model(images).sum().backward()
    optimizer.step()
    torchkeep.save_weights(model, tmp_path / "after.pt")
    result = torchkeep.diff(tmp_path / "before.safetensors", tmp_path / "after.pt")
    assert {c.key for c in result.changed} == {"fc2.weight", "fc2.bias"}
    assert len(result.same) == 9
    assert not result.identical
    assert all(c.max_abs_diff > 0 for c in result.changed)
    assert "fc2.weight" in str(result)


def test_only_in_one_side_shapes_dtypes_and_atol() -> None:
    a = {"w": torch.zeros(3), "x": torch.ones(2), "n": torch.tensor(3)}
    b = {"w": torch.full((3,), 1e-4), "x": torch.ones(3), "extra": torch.ones(1), "n": torch.tensor(3.0)}
    result = torchkeep.diff(a, b)
    assert result.only_b == ("extra",)
    changes = {c.key: c for c in result.changed}
    assert "shape" in changes["x"].detail
    assert "dtype" in changes["n"].detail
    assert changes["w"].max_abs_diff == pytest.approx(1e-4)
    assert "w" in torchkeep.diff(a, b, atol=1e-3).same
    assert torchkeep.diff(a, dict(a)).identical


def test_cli_diff_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torchkeep.save_weights({"a": torch.ones(2), "b": torch.zeros(2)}, tmp_path / "x.safetensors")
    torchkeep.save_weights({"a": torch.ones(2), "b": torch.ones(2)}, tmp_path / "y.safetensors")
    with pytest.raises(SystemExit) as done:
        main(["diff", str(tmp_path / "x.safetensors"), str(tmp_path / "y.safetensors"), "--json"])
    assert done.value.code == 1
    data = json.loads(capsys.readouterr().out)
    assert [c["key"] for c in data["changed"]] == ["b"]
    with pytest.raises(SystemExit) as done:
        main(["diff", str(tmp_path / "x.safetensors"), str(tmp_path / "x.safetensors")])
    assert done.value.code in (0, None)
    assert "2 equal, 0 changed" in capsys.readouterr().out


def test_a_tied_name_stored_once_on_one_side_is_tied_not_only_in_one(tmp_path: Path) -> None:
    from conftest import TiedNet

    model = TiedNet()
    torchkeep.save_weights({"embed.weight": model.embed.weight.detach().clone()}, tmp_path / "once.pt")
    torchkeep.save_weights(model, tmp_path / "both.safetensors")  # torchkeep keeps both names
    result = torchkeep.diff(tmp_path / "once.pt", tmp_path / "both.safetensors")
    assert result.only_a == ()
    assert result.only_b == ()
    assert result.tied == {"out.weight": "embed.weight"}
    assert result.same == ("embed.weight",)
    assert result.identical
    assert "1 tied" in str(result)
    assert torchkeep.diff(model, {"embed.weight": model.embed.weight}).tied == {"out.weight": "embed.weight"}


def test_a_name_in_one_side_only_with_its_own_tensor_is_only_in_that_side() -> None:
    weight = torch.randn(10, 4)
    result = torchkeep.diff({"embed.weight": weight}, {"embed.weight": weight, "out.weight": weight.clone()})
    assert result.only_b == ("out.weight",)
    assert result.tied == {}
    assert not result.identical
