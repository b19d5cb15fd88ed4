"""Step folders (format 2) anyone can read, poisoned checkpoints, retention policies, error groups."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import torchkeep
from conftest import TiedNet
from torchkeep import errors
from torchkeep.cli import exit_code, main
from torchkeep.run import CheckpointEntry, KeepBest, KeepEvery, KeepEveryInterval, KeepLast, RunReader


def _cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as done:
        main(args)
    return int(done.value.code or 0)


def _tied() -> TiedNet:
    torch.manual_seed(0)
    return TiedNet()


def test_model_safetensors_has_the_models_own_names_and_ties_once(tmp_path: Path) -> None:
    model = _tied()
    folder = torchkeep.Checkpointer(tmp_path, incremental=False).save(1, model=model)
    plain = load_file(str(folder / "model.safetensors"))
    assert sorted(plain) == ["embed.weight"]  # the tied name is simply absent, as HF files do
    fresh = _tied()
    nn.init.zeros_(fresh.embed.weight)
    fresh.load_state_dict(plain, strict=False)  # plain safetensors + load_state_dict
    assert torch.equal(fresh.out.weight, model.out.weight)
    loaded = torchkeep.load_weights(folder)
    assert sorted(loaded) == ["embed.weight", "out.weight"]
    assert loaded["out.weight"] is loaded["embed.weight"]  # restored from the metadata


@pytest.mark.parametrize("incremental", [True, False])
@pytest.mark.parametrize("which", ["step", "run"])
def test_loaders_take_a_step_folder_or_a_run_folder(tmp_path: Path, which: str, incremental: bool) -> None:
    model = _tied()
    with torchkeep.Checkpointer(tmp_path / "run", incremental=incremental) as ckpts:
        ckpts.save(1, model=_tied())
        with torch.no_grad():
            model.embed.weight.add_(1.0)
        folder = ckpts.save(2, model=model)
    path = folder if which == "step" else tmp_path / "run"
    fresh = _tied()
    report = torchkeep.load_into(fresh, path)
    assert report.loaded
    assert torch.equal(fresh.embed.weight, model.embed.weight)
    assert fresh.out.weight is fresh.embed.weight
    assert {r.name for r in torchkeep.summarize(path).rows} == {"embed.weight"}  # the header, as for files
    assert not torchkeep.diff(path, model).changed
    out = torchkeep.consolidate(path, tmp_path / "w.safetensors")
    assert torch.equal(torchkeep.load_weights(out)["out.weight"], model.embed.weight)
    assert _cli(["inspect", str(path)]) == 0


def test_a_poisoned_checkpoint_is_saved_flagged_and_never_best(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = nn.Linear(3, 2)
    ckpts = torchkeep.Checkpointer(tmp_path, monitor="loss", keep_best=1)
    ckpts.save(1, model=model, metrics={"loss": 0.5})
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.warns(torchkeep.NonFiniteCheckpointWarning, match=r"tensors \['weight'\]"):
        poisoned = ckpts.save(2, model=model, metrics={"loss": 0.1})  # better loss, NaN weights
    manifest = json.loads((Path(poisoned) / "manifest.json").read_text())
    assert manifest["nonfinite"] == {"tensors": ["weight"]}
    [first, second] = ckpts.list(verify=True)
    assert (first.poisoned, second.poisoned, second.valid) == (False, True, True)
    assert ckpts.best == tmp_path / "step-00000001"
    assert _cli(["ls", str(tmp_path)]) == 0
    assert "poisoned" in capsys.readouterr().out
    assert _cli(["verify", str(tmp_path)]) == 0  # whole, so valid, and said to be poisoned
    assert "poisoned: NaN/Inf in tensors weight" in capsys.readouterr().out


@pytest.mark.parametrize("incremental", [True, False])
def test_a_manifest_is_indented_for_people_and_the_bulk_json_is_one_line(
    tmp_path: Path, incremental: bool
) -> None:
    model = _tied()
    torchkeep.Checkpointer(tmp_path / "run", incremental=incremental).save(1, model=model)
    step = tmp_path / "run" / "step-00000001"
    assert _cli(["export-step", str(step), str(tmp_path / "out")]) == 0
    for manifest in (step / "manifest.json", tmp_path / "out" / "manifest.json"):
        text = manifest.read_text()
        assert text.count("\n") > 5
        assert json.loads(text)["files"]
    bulk = ["state.json", "tensors.json"] if incremental else ["state.json"]
    for name in bulk:
        assert (step / name).read_text().count("\n") == 1  # the C encoder's one line


def _entry(step: int, created: str, loss: float) -> CheckpointEntry:
    return CheckpointEntry(path=f"step-{step}", step=step, created=created, metrics={"loss": loss})


def test_retention_policies_compose() -> None:
    entries = [
        _entry(0, "2026-01-01T00:00:00Z", 0.9),
        _entry(1, "2026-01-01T00:20:00Z", 0.1),
        _entry(2, "2026-01-01T00:40:00Z", 0.5),
        _entry(3, "2026-01-01T01:05:00Z", 0.7),
        _entry(4, "2026-01-01T01:30:00Z", 0.8),
    ]
    assert KeepLast(2).keep(entries) == {3, 4}
    assert KeepBest(1, "loss").keep(entries) == {1}
    assert KeepBest(2, "loss", "max").keep(entries) == {0, 4}
    assert KeepEvery(2).keep(entries) == {0, 2, 4}
    assert KeepEveryInterval(3600).keep(entries) == {0, 3}  # the first of each hour
    assert (KeepLast(1) | KeepBest(1, "loss") | KeepEveryInterval(3600)).keep(entries) == {0, 1, 3, 4}
    with pytest.raises(ValueError, match="keep_last"):
        KeepLast(0)


def test_retention_policy_objects_drive_a_checkpointer(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="either retention"):
        torchkeep.Checkpointer(tmp_path, keep_last=1, retention=KeepLast(1))
    ckpts = torchkeep.Checkpointer(tmp_path, retention=KeepLast(1) | KeepEvery(3))
    for step in range(5):
        ckpts.save(step, model=model)
    # removal is synchronous: no trash is left for a listing to see, nothing to wait for
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".writer.lock",
        "blobs",
        "step-00000000",
        "step-00000003",
        "step-00000004",
    ]
    assert [e.step for e in RunReader(tmp_path).entries()] == [0, 3, 4]


def test_pt_files_have_the_zip_root_torch_save_gives_them(tmp_path: Path) -> None:
    torchkeep.save_weights({"a": torch.ones(2)}, tmp_path / "weights.pt")
    torch.save({"a": torch.ones(2)}, tmp_path / "ref.pt")
    with zipfile.ZipFile(tmp_path / "weights.pt") as ours, zipfile.ZipFile(tmp_path / "ref.pt") as ref:
        assert {n.split("/")[0] for n in ours.namelist()} == {"weights"}
        assert {n.split("/")[0] for n in ref.namelist()} == {"ref"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.pt", "weights.pt"]  # no temporary left


GROUPS = {
    errors.UnreadableFileError: 4,
    errors.UnsafeError: 5,
    errors.DoesNotFitError: 6,
    errors.CheckpointError: 7,
    errors.DistributedError: 8,
    errors.UsageError: 9,
}


def test_every_error_is_in_one_group_and_the_cli_tells_the_groups_apart() -> None:
    leaves = [
        cls
        for name in errors.__all__
        if isinstance(cls := getattr(errors, name), type)
        and issubclass(cls, errors.TorchkeepError)
        and cls not in (errors.TorchkeepError, *GROUPS)
    ]
    assert len(leaves) >= 26
    for cls in leaves:
        [group] = [g for g in GROUPS if issubclass(cls, g)]
        code = exit_code(cls.__new__(cls))
        expected = (
            3
            if issubclass(cls, FileNotFoundError | IsADirectoryError) and group is not errors.CheckpointError
            else GROUPS[group]
        )
        assert code == expected, cls
    assert issubclass(errors.RunLockedError, BlockingIOError)
    assert issubclass(errors.NoValidCheckpointError, FileNotFoundError)
