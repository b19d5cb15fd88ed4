"""Checkpointer: atomic saves, verified restore, retention, exact resume, crashes, corruption."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import torchkeep
from conftest import tensor_data
from torchkeep.storage.manifest import file_record

HERE = Path(__file__).resolve().parent


def make() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.2), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    return model, optimizer, scheduler


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: object) -> float:
    loss = model(torch.randn(8, 4)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()  # type: ignore[attr-defined]
    return loss.item()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class Counter:
    """A user's own Stateful object."""

    def __init__(self) -> None:
        self.count = 0

    def state_dict(self) -> dict[str, int]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.count = state["count"]


def test_fresh_run_restores_nothing(tmp_path: Path) -> None:
    model, optimizer, _ = make()
    assert torchkeep.Checkpointer(tmp_path / "run").restore(model=model, optimizer=optimizer) is None
    assert torchkeep.Checkpointer(tmp_path / "run").latest is None


def test_round_trip_of_every_part(tmp_path: Path) -> None:
    model, optimizer, scheduler = make()
    for _ in range(3):
        train_step(model, optimizer, scheduler)
    counter = Counter()
    counter.count = 41
    stopper = torchkeep.EarlyStopping("val_loss", patience=3)
    stopper.step({"val_loss": 0.5})
    ckpts = torchkeep.Checkpointer(tmp_path / "run")
    extra = {
        "config": {"width": 8, "ratio": float("inf"), "pair": (1, 2), "ids": {3: "c"}},
        "tag": b"\x00\x01",
    }
    folder = ckpts.save(
        3,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        epoch=1,
        metrics={"val_loss": torch.tensor(0.5)},
        extra=extra,
        counter=counter,
        stopper=stopper,
    )
    assert folder.name == "step-00000003"
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "state.json", "tensors.json"]

    model2, optimizer2, scheduler2 = make()
    counter2, stopper2 = Counter(), torchkeep.EarlyStopping("val_loss", patience=3)
    info = torchkeep.Checkpointer(tmp_path / "run").restore(
        model=model2, optimizer=optimizer2, scheduler=scheduler2, counter=counter2, stopper=stopper2
    )
    assert info is not None
    assert (info.step, info.epoch, info.metrics) == (3, 1, {"val_loss": 0.5})
    assert info.extra == extra
    assert info.restored == ("model", "optimizer", "scheduler", "counter", "stopper", "rng")
    assert counter2.count == 41
    assert stopper2.best == 0.5
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert str(optimizer2.state_dict()) == str(optimizer.state_dict())
    assert scheduler2.state_dict() == scheduler.state_dict()


def test_tensors_are_safetensors_and_the_rest_json(tmp_path: Path) -> None:
    model, optimizer, scheduler = make()
    train_step(model, optimizer, scheduler)
    folder = torchkeep.Checkpointer(tmp_path, incremental=False).save(1, model=model, optimizer=optimizer)
    weights = load_file(str(folder / "model.safetensors"))  # the model's own names
    assert weights.keys() == model.state_dict().keys()
    assert torch.equal(weights["0.weight"], model[0].weight)
    tensors = load_file(str(folder / "state.safetensors"))
    assert "optimizer/state/0/exp_avg" in tensors
    state = json.loads((folder / "state.json").read_text())
    assert state["parts"]["optimizer"]["param_groups"][0]["lr"] == 1e-2
    assert state["versions"]["torch"] == str(torch.__version__)
    manifest = json.loads((folder / "manifest.json").read_text())
    for name, record in manifest["files"].items():
        assert record == {
            "size": file_record(folder / name).size,
            "xxh3_128": file_record(folder / name).digest,
        }


def test_retention_keep_last_best_and_every(tmp_path: Path) -> None:
    model, _, _ = make()
    ckpts = torchkeep.Checkpointer(tmp_path, keep_last=2, keep_best=1, monitor="val_loss", keep_every=5)
    losses = {0: 0.9, 1: 0.2, 2: 0.8, 3: 0.7, 4: 0.6, 5: 0.95, 6: 0.5, 7: 0.4}
    for step, loss in losses.items():
        ckpts.save(step, model=model, metrics={"val_loss": loss})
    assert [e.step for e in ckpts.list()] == [0, 1, 5, 6, 7]  # every 5th (0, 5), best (1), last two
    assert ckpts.best == tmp_path / "step-00000001"
    assert ckpts.latest == tmp_path / "step-00000007"


def test_max_mode_and_checkpoints_without_the_metric(tmp_path: Path) -> None:
    model, _, _ = make()
    ckpts = torchkeep.Checkpointer(tmp_path, keep_best=2, monitor="acc", mode="max")
    ckpts.save(0, model=model, metrics={"acc": 0.5})
    ckpts.save(1, model=model)  # no metric: never "best", but the one just written stays
    ckpts.save(2, model=model, metrics={"acc": 0.9})
    with pytest.warns(torchkeep.NonFiniteCheckpointWarning, match=r"metrics \['acc'\]"):
        ckpts.save(3, model=model, metrics={"acc": float("nan")})  # flagged, kept, never best
    assert [e.step for e in ckpts.list()] == [0, 2, 3]
    assert ckpts.best == tmp_path / "step-00000002"


def test_pruning_after_a_resume_sees_the_checkpoints_on_disk(tmp_path: Path) -> None:
    model, _, _ = make()
    first = torchkeep.Checkpointer(tmp_path, keep_best=1, keep_last=1, monitor="loss")
    first.save(0, model=model, metrics={"loss": 0.1})
    first.save(1, model=model, metrics={"loss": 0.5})
    first.close()  # gives the run's writer lock up, as the end of the process would
    second = torchkeep.Checkpointer(tmp_path, keep_best=1, keep_last=1, monitor="loss")  # a new process
    second.save(2, model=model, metrics={"loss": 0.7})
    second.save(3, model=model, metrics={"loss": 0.6})
    assert [e.step for e in second.list()] == [0, 3]  # the best from the first process survives


def test_saving_a_step_again_replaces_it(tmp_path: Path) -> None:
    model, _, _ = make()
    ckpts = torchkeep.Checkpointer(tmp_path)
    ckpts.save(5, model=model, metrics={"v": 1.0})
    ckpts.save(5, model=model, metrics={"v": 2.0})
    assert [(e.step, e.metrics) for e in ckpts.list()] == [(5, {"v": 2.0})]
    kept = sorted(p.name for p in tmp_path.iterdir() if p.name != ".writer.lock")
    assert kept == ["blobs", "step-00000005"]
    assert len(list((tmp_path / "blobs").iterdir())) == 1  # the same tensors: stored once, still used


def test_leftovers_of_interrupted_saves_are_cleaned_or_recovered(tmp_path: Path) -> None:
    model, _, _ = make()
    ckpts = torchkeep.Checkpointer(tmp_path)
    good = ckpts.save(1, model=model)
    (tmp_path / ".step-00000002.tmp-dead").mkdir()
    (tmp_path / ".step-00000002.tmp-dead" / "model.safetensors").write_bytes(b"partial")
    good.rename(tmp_path / ".step-00000001.old-beef")  # killed between the two renames of a replace
    ckpts.close()
    before = sorted(p.name for p in tmp_path.iterdir())
    reader = torchkeep.Checkpointer(tmp_path)
    assert reader.latest is None  # reading changes nothing, leftovers included
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    writer = torchkeep.Checkpointer(tmp_path)
    writer.save(3, model=model)  # the writer lock's holder cleans up what dead writers left
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".writer.lock",
        "blobs",
        "step-00000001",
        "step-00000003",
    ]
    assert reader.list()[0].path == good
    assert [e.valid for e in reader.list(verify=True)] == [True, True]  # the recovered one's packs kept


def corrupt_flip(folder: Path) -> None:
    path = tensor_data(folder)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


def corrupt_truncate(folder: Path) -> None:
    path = tensor_data(folder)
    path.write_bytes(path.read_bytes()[:-10])


def corrupt_no_manifest(folder: Path) -> None:
    (folder / "manifest.json").unlink()


def corrupt_garbage_manifest(folder: Path) -> None:
    (folder / "manifest.json").write_text("{garbage")


def corrupt_garbage_state(folder: Path) -> None:
    size = (folder / "state.json").stat().st_size
    (folder / "state.json").write_bytes(b"x" * size)  # same size: only the checksum can tell


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (corrupt_flip, "xxh3_128 checksum"),
        (corrupt_truncate, "bytes"),
        (corrupt_no_manifest, "no manifest"),
        (corrupt_garbage_manifest, "not valid"),
        (corrupt_garbage_state, "xxh3_128 checksum"),
    ],
)
def test_corruption_is_reported_and_restore_falls_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: object, reason: str
) -> None:
    model, _, _ = make()
    ckpts = torchkeep.Checkpointer(tmp_path)
    for step in (1, 2):
        with torch.no_grad():
            model[0].weight.fill_(step)
        ckpts.save(step, model=model)
    damage(tmp_path / "step-00000002")  # type: ignore[operator]
    entries = ckpts.list(verify=True)
    assert [e.valid for e in entries] == [True, False]
    assert reason in entries[1].reason
    before = snapshot(tmp_path)
    restored, _, _ = make()
    with caplog.at_level(logging.WARNING, logger="torchkeep"):
        info = ckpts.restore(model=restored)
    assert info is not None
    assert info.step == 1
    assert torch.all(restored[0].weight == 1)
    assert "step-00000002" in caplog.text
    assert reason in caplog.text
    assert snapshot(tmp_path) == before  # a restore never changes the disk


def test_every_checkpoint_invalid_raises_instead_of_starting_over(tmp_path: Path) -> None:
    model, _, _ = make()
    ckpts = torchkeep.Checkpointer(tmp_path)
    corrupt_flip(ckpts.save(1, model=model))
    with pytest.raises(torchkeep.NoValidCheckpointError, match="step-00000001") as info:
        ckpts.restore(model=model)
    assert isinstance(info.value, FileNotFoundError)
    assert "xxh3_128 checksum" in info.value.reasons["step-00000001"]


def rewrite_state(folder: Path, change: object) -> None:
    """Edit a checkpoint's JSON and re-sign its manifest, as a newer writer would."""
    for name in ("state.json", "manifest.json"):
        data = json.loads((folder / name).read_text())
        change(name, data)  # type: ignore[operator]
        if name == "manifest.json":
            record = file_record(folder / "state.json")
            data["files"]["state.json"] = record.entry()
        (folder / name).write_text(json.dumps(data))


def test_a_newer_format_version_is_refused(tmp_path: Path) -> None:
    model, _, _ = make()
    folder = torchkeep.Checkpointer(tmp_path).save(1, model=model)
    rewrite_state(
        folder, lambda name, data: data.update(format_version=99) if name == "manifest.json" else None
    )
    with pytest.raises(torchkeep.NewerFormatError, match="upgrade torchkeep"):
        torchkeep.Checkpointer(tmp_path).restore(model=model)


def test_unknown_entries_are_refused(tmp_path: Path) -> None:
    model, _, _ = make()
    folder = torchkeep.Checkpointer(tmp_path).save(1, model=model)
    rewrite_state(folder, lambda name, data: data.update(ema={}) if name == "state.json" else None)
    with pytest.raises(torchkeep.CheckpointMismatchError, match="ema"):
        torchkeep.Checkpointer(tmp_path).restore(model=model)


def test_mismatched_objects_are_refused_before_anything_changes(tmp_path: Path) -> None:
    model, optimizer, _ = make()
    ckpts = torchkeep.Checkpointer(tmp_path)
    ckpts.save(1, model=model, optimizer=optimizer)
    target, _, _ = make()
    with torch.no_grad():
        target[0].weight.fill_(7.0)
    two_groups = torch.optim.AdamW([{"params": target[0].parameters()}, {"params": target[3].parameters()}])
    with pytest.raises(torchkeep.CheckpointMismatchError, match="parameter group"):
        ckpts.restore(model=target, optimizer=two_groups)
    with pytest.raises(torchkeep.CheckpointMismatchError, match="no counter state"):
        ckpts.restore(model=target, counter=Counter())
    with pytest.raises(torchkeep.KeyMismatchError):
        ckpts.restore(model=nn.Linear(4, 2))
    assert torch.all(target[0].weight == 7.0)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="monitor"):
        torchkeep.Checkpointer("unused", keep_best=1)
    with pytest.raises(ValueError, match="mode"):
        torchkeep.Checkpointer("unused", mode="best")
    with pytest.raises(ValueError, match="keep_last"):
        torchkeep.Checkpointer("unused", keep_last=0)


def test_monitored_metric_missing_from_metrics(tmp_path: Path) -> None:
    model, _, _ = make()
    with pytest.raises(torchkeep.MissingMetricError, match="val_loss") as info:
        torchkeep.Checkpointer(tmp_path, monitor="val_loss").save(1, model=model, metrics={"loss": 1.0})
    assert isinstance(info.value, KeyError)
    assert not any(tmp_path.iterdir())


def test_values_that_need_pickle_are_refused(tmp_path: Path) -> None:
    model, _, _ = make()
    with pytest.raises(torchkeep.UnserializableValueError, match=r"extra\['obj'\]"):
        torchkeep.Checkpointer(tmp_path).save(1, model=model, extra={"obj": object()})
    assert not any(tmp_path.iterdir())


def test_early_stopping() -> None:
    stopper = torchkeep.EarlyStopping("val_loss", patience=2, min_delta=0.01)
    assert [stopper.step({"val_loss": v}) for v in (1.0, 0.9, 0.895, 0.95, 0.5)] == [
        False,
        False,
        False,
        True,
        False,
    ]
    maximizing = torchkeep.EarlyStopping("acc", patience=1, mode="max")
    assert [maximizing.step(v) for v in (0.5, 0.6, 0.6)] == [False, False, True]
    with pytest.raises(torchkeep.MissingMetricError, match="acc"):
        maximizing.step({"loss": 1.0})
    other = torchkeep.EarlyStopping("loss", patience=1)
    with pytest.raises(ValueError, match="same monitor"):
        other.load_state_dict(maximizing.state_dict())


@pytest.mark.parametrize(("mode", "total", "stop_at"), [("epoch", 24, 16), ("sampler", 26, 13)])
def test_resume_in_a_new_process_is_bitwise_exact(
    tmp_path: Path, mode: str, total: int, stop_at: int
) -> None:
    """2N steps in one go == N steps, exit, new process restores, N more: losses, weights, optimizer."""
    script = str(HERE / "_resume_script.py")

    def run(run_dir: Path, out: Path, stop: int) -> None:
        subprocess.run(
            [sys.executable, script, str(run_dir), str(out), str(stop), str(total), mode], check=True
        )

    run(tmp_path / "straight", tmp_path / "straight", total)
    run(tmp_path / "resumed", tmp_path / "part1", stop_at)
    run(tmp_path / "resumed", tmp_path / "part2", total)
    straight = json.loads((tmp_path / "straight.losses.json").read_text())
    part1 = json.loads((tmp_path / "part1.losses.json").read_text())
    resumed = json.loads((tmp_path / "part2.losses.json").read_text())
    assert len(part1) == stop_at
    assert resumed[:stop_at] == part1
    assert resumed == straight
    a = load_file(str(tmp_path / "straight.final.safetensors"))
    b = load_file(str(tmp_path / "part2.final.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _crash_rounds(tmp_path: Path, rounds: int, *, async_save: bool = False) -> None:
    sys.path.insert(0, str(HERE))
    import _crash_worker as worker

    assert worker.crash_rounds(str(tmp_path / "run"), rounds, async_save=async_save) > 0


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_sigkill_at_random_moments_never_loses_a_committed_checkpoint(
    tmp_path: Path, async_save: bool
) -> None:
    _crash_rounds(tmp_path, rounds=30, async_save=async_save)


@pytest.mark.skipif("TORCHKEEP_SLOW" not in __import__("os").environ, reason="set TORCHKEEP_SLOW=1 to run")
def test_sigkill_many_rounds(tmp_path: Path) -> None:
    _crash_rounds(tmp_path, rounds=300)


def test_manifests_with_sha256_digests_still_verify(tmp_path: Path, model: torch.nn.Module) -> None:
    folder = torchkeep.Checkpointer(tmp_path, incremental=False).save(1, model=model)
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in manifest["files"]:
        record = file_record(folder / name, "sha256")
        manifest["files"][name] = {"size": record.size, "sha256": record.digest}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert torchkeep.Checkpointer(tmp_path).list(verify=True)[0].valid
    with (folder / "model.safetensors").open("r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    entry = torchkeep.Checkpointer(tmp_path).list(verify=True)[0]
    assert not entry.valid
    assert "sha256 checksum" in entry.reason
