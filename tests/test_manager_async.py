"""Checkpointer(async_save=True): snapshots, background commits, failures surfaced, buffers reused."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep
from conftest import TiedNet, step_tensors
from torchkeep.run import checkpointer
from torchkeep.run.commit import Committed
from torchkeep.run.snapshot import Snapshot
from torchkeep.tutorial import TheModelClass


def _train_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.randn(4, 3, 26, 26)).sum().backward()
    opt.step()


def _setup() -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(0)
    model = TheModelClass()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    _train_step(model, opt)
    return model, opt, sched


def test_an_async_save_writes_what_a_sync_save_writes(tmp_path: Path) -> None:
    model, opt, sched = _setup()
    torch.manual_seed(5)
    sync = torchkeep.Checkpointer(tmp_path / "sync").save(3, model=model, optimizer=opt, scheduler=sched)
    torch.manual_seed(5)
    with torchkeep.Checkpointer(tmp_path / "async", async_save=True) as ckpts:
        pending = ckpts.save(3, model=model, optimizer=opt, scheduler=sched)
        assert ckpts.wait() == pending
    for name in ("model.safetensors", "state.safetensors"):
        a, b = step_tensors(sync, name), step_tensors(pending, name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert json.loads((sync / "state.json").read_text()) == json.loads((pending / "state.json").read_text())


def test_changing_the_model_right_after_save_does_not_change_the_checkpoint(tmp_path: Path) -> None:
    model, opt, _ = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt_before = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    ckpts = torchkeep.Checkpointer(tmp_path, async_save=True)
    ckpts.save(1, model=model, optimizer=opt)
    with torch.no_grad():  # straight away, while the background thread may still be writing
        for tensor in model.state_dict().values():
            tensor.fill_(7)
    _train_step(model, opt)
    ckpts.wait()
    fresh, fresh_opt, _ = _setup()
    ckpts.restore(model=fresh, optimizer=fresh_opt, restore_rng=False)
    for key, value in before.items():
        assert torch.equal(fresh.state_dict()[key], value), key
    for key, value in opt_before.items():
        assert torch.equal(fresh_opt.state_dict()["state"][0][key], value), key


def test_staging_buffers_are_reused_and_never_shared(tmp_path: Path) -> None:
    model = TiedNet()
    ckpts = torchkeep.Checkpointer(tmp_path, async_save=True)
    pointers = []
    for step in range(3):
        with torch.no_grad():
            model.embed.weight.fill_(step)
        ckpts.save(step, model=model)
        pointers.append({k: v.data_ptr() for k, v in ckpts._staging._buffers.items()})
    ckpts.wait()
    assert pointers[0] == pointers[1] == pointers[2]  # the same memory, save after save
    assert len(set(pointers[0].values())) == len(pointers[0])  # one buffer per tensor
    for step in range(3):
        restored = TiedNet()
        ckpts.restore(model=restored, path=tmp_path / f"step-{step:08d}", restore_rng=False)
        assert torch.all(restored.embed.weight == step)
        assert restored.out.weight is restored.embed.weight


def test_a_failure_in_the_background_is_raised_by_the_next_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model, _, _ = _setup()
    ckpts = torchkeep.Checkpointer(tmp_path, async_save=True, keep_last=2)
    ckpts.save(1, model=model)
    ckpts.wait()
    real_commit = checkpointer.commit

    def failing_commit(snapshot: Snapshot, **kwargs: Any) -> Committed:
        if snapshot.step == 2:
            raise OSError(28, "No space left on device")
        return real_commit(snapshot, **kwargs)

    monkeypatch.setattr(checkpointer, "commit", failing_commit)
    ckpts.save(2, model=model)  # returns: the failure happens in the background
    with pytest.raises(torchkeep.AsyncSaveError, match=r"step 2 failed: .*No space left") as info:
        ckpts.save(3, model=model)
    assert info.value.step == 2
    assert isinstance(info.value.cause, OSError)
    assert "background checkpoint save failed" in caplog.text
    assert [e.step for e in ckpts.list()] == [1]  # nothing of step 2, step 1 intact
    ckpts.save(3, model=model)  # the error was reported once; saving goes on
    assert ckpts.wait() == tmp_path / "step-00000003"
    ckpts.save(2, model=model)
    with pytest.raises(torchkeep.AsyncSaveError):
        ckpts.wait()
    ckpts.save(2, model=model)
    with pytest.raises(torchkeep.AsyncSaveError), ckpts:
        pass  # leaving the block flushes and raises


def test_one_save_in_flight_at_most(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _, _ = _setup()
    release = threading.Event()
    started: list[int] = []
    real_commit = checkpointer.commit

    def slow_commit(snapshot: Snapshot, **kwargs: Any) -> Committed:
        started.append(snapshot.step)
        release.wait(timeout=30)
        return real_commit(snapshot, **kwargs)

    monkeypatch.setattr(checkpointer, "commit", slow_commit)
    ckpts = torchkeep.Checkpointer(tmp_path, async_save=True)
    ckpts.save(1, model=model)
    second = threading.Thread(target=ckpts.save, args=(2,), kwargs={"model": model})
    second.start()
    second.join(timeout=0.5)
    assert second.is_alive()  # blocked behind step 1
    assert started == [1]
    release.set()
    second.join(timeout=30)
    ckpts.wait()
    assert started == [1, 2]
    assert [e.step for e in ckpts.list()] == [1, 2]


def test_restore_and_list_wait_for_the_save_in_flight(tmp_path: Path) -> None:
    model, opt, _ = _setup()
    ckpts = torchkeep.Checkpointer(tmp_path, async_save=True)
    ckpts.save(4, model=model, optimizer=opt, metrics={"loss": 0.5})
    assert [e.step for e in ckpts.list()] == [4]
    info = torchkeep.Checkpointer(tmp_path).restore(model=TheModelClass(), restore_rng=False)
    assert info is not None
    assert info.step == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_state_is_staged_in_pinned_buffers(tmp_path: Path) -> None:
    model, opt, _ = _setup()
    model.cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train_step_on(model, opt, "cuda")
    before = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    ckpts = torchkeep.Checkpointer(tmp_path, async_save=True)
    ckpts.save(1, model=model, optimizer=opt)
    buffers = ckpts._staging._buffers
    assert all(b.is_pinned() for k, b in buffers.items() if k.startswith("model.safetensors:"))  # GPU
    assert not any(b.is_pinned() for k, b in buffers.items() if k.startswith("state.safetensors:rng/"))  # CPU
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.fill_(3)
    ckpts.wait()
    fresh = TheModelClass()
    ckpts.restore(model=fresh, restore_rng=False)
    for key, value in before.items():
        assert torch.equal(fresh.state_dict()[key], value), key


def _train_step_on(model: nn.Module, opt: torch.optim.Optimizer, device: str) -> None:
    opt.zero_grad()
    model(torch.randn(4, 3, 26, 26, device=device)).sum().backward()
    opt.step()


def _wide() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(8)])  # 2 MiB of weights
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 256)).sum().backward()
    optimizer.step()
    return model, optimizer


@pytest.mark.parametrize("incremental", [True, False])
def test_a_staging_budget_bounds_host_memory_and_every_checkpoint_is_exact(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, incremental: bool
) -> None:
    model, optimizer = _wide()
    budget = 1 << 20  # the state is 4 MiB: weights and momentum
    expected = []
    with (
        caplog.at_level("INFO", logger="torchkeep.run.checkpointer"),
        torchkeep.Checkpointer(
            tmp_path, async_save=True, staging_budget="1MiB", incremental=incremental
        ) as ckpts,
    ):
        for step in range(3):
            ckpts.save(step, model=model, optimizer=optimizer)
            assert ckpts._staging.nbytes <= budget  # never more host memory than the budget
            expected.append({k: v.clone() for k, v in model.state_dict().items()})
            with torch.no_grad():  # right away, while the background thread may still write
                for p in model.parameters():
                    p.add_(1.0)
    said = [r.getMessage() for r in caplog.records if "does not fit staging_budget" in r.getMessage()]
    assert len(said) == 1  # said once, not at every save
    assert ("before it returns, the rest in the background" in said[0]) is incremental
    for step, state in enumerate(expected):
        fresh, _ = _wide()
        torchkeep.Checkpointer(tmp_path).restore(model=fresh, path=tmp_path / f"step-{step:08d}")
        for key, value in fresh.state_dict().items():
            assert torch.equal(value, state[key]), (step, key)


def test_a_staging_budget_is_checked(tmp_path: Path) -> None:
    with pytest.raises(torchkeep.InvalidArgumentError, match="async_save=True"):
        torchkeep.Checkpointer(tmp_path, staging_budget="1GiB")
    with pytest.raises(torchkeep.InvalidArgumentError, match="1GiB"):
        torchkeep.Checkpointer(tmp_path, async_save=True, staging_budget="lots")
