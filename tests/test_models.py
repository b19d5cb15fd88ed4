"""save_model / load_model: portable programs, and pickled models only on trust."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep
from torchkeep.tutorial import TheModelClass


def test_round_trip_in_process(tmp_path: Path, model: TheModelClass, images: torch.Tensor) -> None:
    model.train()
    torchkeep.save_model(model, tmp_path / "m.pt2", example_inputs=(images,))
    assert model.training
    assert model.dropout.training
    loaded = torchkeep.load_model(tmp_path / "m.pt2")
    assert not loaded.training
    assert all(not m.training for m in loaded.modules())
    with torchkeep.evaluating(model):
        expected = model(images)
    assert torch.equal(loaded(images), expected)


def test_single_tensor_example_and_dynamic_batch(tmp_path: Path, model: TheModelClass) -> None:
    batch = torch.export.Dim("batch", min=1, max=64)
    torchkeep.save_model(
        model, tmp_path / "m.pt2", example_inputs=torch.randn(2, 3, 26, 26), dynamic_shapes=({0: batch},)
    )
    loaded = torchkeep.load_model(tmp_path / "m.pt2")
    assert loaded(torch.randn(5, 3, 26, 26)).shape == (5, 1)


def test_loads_in_a_fresh_process_where_the_class_does_not_exist(tmp_path: Path) -> None:
    """The class is defined in a script that is gone by the time another process loads the file."""
    maker = tmp_path / "make_model.py"
    maker.write_text(
        textwrap.dedent(
            f"""
            import torch, torchkeep
            from torch import nn

            class PrivateNet(nn.Module):  # exists only in this script
                def __init__(self):
                    super().__init__()
                    self.body = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5))
                    self.head = nn.Linear(8, 2)
                def forward(self, x):
                    return self.head(self.body(x))

            torch.manual_seed(0)
            net = PrivateNet()
            net.train()
            net(torch.randn(16, 6))  # move the running statistics
            x = torch.randn(4, 6)
            torchkeep.save_model(net, {str(tmp_path / "net.pt2")!r}, example_inputs=(x,))
            net.eval()
            torch.save({{"x": x, "y": net(x).detach()}}, {str(tmp_path / "io.pt")!r})
            """
        )
    )
    subprocess.run([sys.executable, str(maker)], check=True, cwd=tmp_path)
    maker.unlink()
    loader = textwrap.dedent(
        f"""
        import sys, torch, torchkeep
        io = torch.load({str(tmp_path / "io.pt")!r}, weights_only=True)
        model = torchkeep.load_model({str(tmp_path / "net.pt2")!r})
        assert "make_model" not in sys.modules
        assert not model.training
        assert torch.equal(model(io["x"]), io["y"]), "outputs differ"
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", loader], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_pickled_model_needs_trust_and_names_what_it_imports(
    tmp_path: Path, model: TheModelClass, images: torch.Tensor
) -> None:
    torch.save(model, tmp_path / "legacy.pt")
    with pytest.raises(torchkeep.UntrustedFileError) as info:
        torchkeep.load_model(tmp_path / "legacy.pt")
    err = info.value
    assert "torchkeep.tutorial.TheModelClass" in err.globals
    assert "torch.nn.modules.batchnorm.BatchNorm2d" in err.globals
    assert "torch._utils._rebuild_tensor_v2" not in err.globals  # plain tensor plumbing is not listed
    assert "trust=True" in str(err)
    assert "save_model" in str(err)
    loaded = torchkeep.load_model(tmp_path / "legacy.pt", trust=True)
    assert isinstance(loaded, TheModelClass)
    assert not loaded.training
    with torchkeep.evaluating(model):
        assert torch.equal(loaded(images), model(images))


def test_pickled_model_whose_class_is_gone(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import torch
        from torch import nn
        class Gone(nn.Linear):
            pass
        torch.save(Gone(2, 2), {str(tmp_path / "gone.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    with pytest.raises(torchkeep.UntrustedFileError, match=r"__main__\.Gone"):
        torchkeep.load_model(tmp_path / "gone.pt")
    with pytest.raises(torchkeep.MissingClassError, match="cannot be imported") as info:
        torchkeep.load_model(tmp_path / "gone.pt", trust=True)
    assert isinstance(info.value, ImportError)


@pytest.mark.parametrize("trust", [False, True])
def test_weights_files_are_not_models(tmp_path: Path, model: TheModelClass, trust: bool) -> None:
    torchkeep.save_weights(model, tmp_path / "w.pt")
    torchkeep.save_weights(model, tmp_path / "w.safetensors")
    for name in ("w.pt", "w.safetensors"):
        with pytest.raises(torchkeep.NotAModelError, match="load_into"):
            torchkeep.load_model(tmp_path / name, trust=trust)


def test_wrong_suffix_for_a_whole_model(tmp_path: Path, model: TheModelClass, images: torch.Tensor) -> None:
    with pytest.raises(torchkeep.UnsupportedSuffixError, match=r"\.pt2"):
        torchkeep.save_model(model, tmp_path / "m.pt", example_inputs=(images,))


def test_export_failure_is_explained(tmp_path: Path) -> None:
    class Branchy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: export cannot capture it
                return x
            return -x

    with pytest.raises(torchkeep.ExportError, match="Branchy") as info:
        torchkeep.save_model(Branchy(), tmp_path / "b.pt2", example_inputs=(torch.randn(3),))
    assert "save_weights" in str(info.value)
    assert not (tmp_path / "b.pt2").exists()


def test_damaged_program(tmp_path: Path, model: TheModelClass, images: torch.Tensor) -> None:
    path = torchkeep.save_model(model, tmp_path / "m.pt2", example_inputs=(images,))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(torchkeep.CorruptFileError):
        torchkeep.load_model(path)
