"""Checkpointer in real torch.distributed jobs: gloo on the CPU, ranks as real processes.

Ranks are started the way torchrun starts them (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT); the worker is tests/_dist_worker.py.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import torchkeep
from conftest import step_tensors
from torchkeep.storage.manifest import MANIFEST, file_record

HERE = Path(__file__).parent
WORKER = HERE / "_dist_worker.py"
sys.path.insert(0, str(HERE))
import _dist_worker as worker  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="this torch build has no torch.distributed"
)


# gloo picks its interface from the host name, which may not resolve in a container: use loopback
LOOPBACK = (
    {"GLOO_SOCKET_IFNAME": "lo"} if sys.platform == "linux" and "GLOO_SOCKET_IFNAME" not in os.environ else {}
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(world: int, args: list[str], env: dict[str, str] | None = None) -> list[subprocess.Popen[str]]:
    port = _free_port()
    procs = []
    for rank in range(world):
        rank_env = {
            **os.environ,
            **(env or {}),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "OMP_NUM_THREADS": "1",
            **{k: v for k, v in LOOPBACK.items() if k not in os.environ},
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), *args],
                env=rank_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def _finish(procs: list[subprocess.Popen[str]], timeout: float = 180) -> None:
    errors = []
    for rank, proc in enumerate(procs):
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        if proc.returncode != 0:
            errors.append(f"rank {rank} exited with {proc.returncode}:\n{err[-4000:]}")
    assert not errors, "\n".join(errors)


def run_job(world: int, scenario: str, run_dir: Path | str, out: Path, **opts: Any) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = opts.pop("env", None)
    args = [scenario, str(run_dir), str(out), *(f"{k}={v}" for k, v in opts.items())]
    if world == 0:  # one plain process, no torch.distributed
        proc = subprocess.run(
            [sys.executable, str(WORKER), *args],
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        return
    _finish(_start(world, args, env))


def _losses(out: Path, world: int, rank: int) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / f"losses-{world}-{rank}.json").read_text())
    return data


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], *, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if atol:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0)
        else:
            assert torch.equal(a[key], b[key]), key


def _final(out: Path, world: int) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = torch.load(out / f"final-{world}.pt", weights_only=True)
    return state


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("ddp")
    run_job(2, "ddp", base / "run", base / "out", steps=6)
    return base / "run", base / "out"


@pytest.fixture(scope="module")
def fsdp_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("fsdp")
    run_job(2, "fsdp", base / "run", base / "out", steps=5)
    return base / "run", base / "out"


def test_ddp_kill_and_resume_on_two_ranks_is_exact(ddp_reference: tuple[Path, Path], tmp_path: Path) -> None:
    _, reference = ddp_reference
    run, out = tmp_path / "run", tmp_path / "killed"
    out.mkdir()
    procs = _start(2, ["ddp", str(run), str(out), "steps=6", "sleep=0.4"])
    deadline = time.monotonic() + 120
    while not ((out / "progress").exists() and int((out / "progress").read_text() or -1) >= 2):
        assert time.monotonic() < deadline, "the job made no progress"
        assert all(p.poll() is None for p in procs), "a rank ended early"
        time.sleep(0.02)
    for proc in procs:
        proc.send_signal(signal.SIGKILL)  # the whole job dies, as when a node is lost
        proc.communicate()
    assert not (out / "final-2.pt").exists()

    resumed = tmp_path / "resumed"
    run_job(2, "ddp", run, resumed, steps=6)
    for rank in (0, 1):
        straight, again = _losses(reference, 2, rank), _losses(resumed, 2, rank)
        assert 3 <= again["start"] < 6
        # every rank's noise comes from its own global RNG: equal only if each rank got its own state back
        assert again["losses"] == straight["losses"][again["start"] :]
    _assert_equal(_final(resumed, 2), _final(reference, 2))


def test_ddp_checkpoint_layout_and_restore_in_one_process(ddp_reference: tuple[Path, Path]) -> None:
    run, reference = ddp_reference
    ckpts = torchkeep.Checkpointer(run)
    assert [e.step for e in ckpts.list(verify=True)] == [3, 4, 5]  # keep_last=3 pruned by rank 0
    newest = run / "step-00000005"
    manifest = json.loads((newest / MANIFEST).read_text())
    assert manifest["world_size"] == 2
    assert sorted(manifest["files"]) == ["state.json", "tensors.json"]  # replicated: written once
    assert manifest["blobs"]  # the tensors, in the run's packs
    state = json.loads((newest / "state.json").read_text())
    assert sorted(state["world"]["rng"]) == ["1"]
    tensors = step_tensors(newest, "state.safetensors")
    assert not torch.equal(tensors["rng/torch"], tensors["rng@1/torch"])  # each rank's own state
    weights = step_tensors(newest, "model.safetensors")
    assert not any(key.startswith("module.") for key in weights)  # the DDP wrapper is not saved

    model = worker.make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    with pytest.warns(torchkeep.RngRestoreWarning, match=r"random states of ranks \[1\] were not restored"):
        info = ckpts.restore(model=model, optimizer=optimizer)
    assert info is not None
    assert info.step == 5
    _assert_equal(dict(model.state_dict()), _final(reference, 2))
    assert torch.equal(torch.get_rng_state(), tensors["rng/torch"])  # rank 0's state in rank 0's place
    x, y = worker.batch(6, 0, 1)  # training goes on in one process
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()


def test_fsdp_restores_on_two_four_and_one_rank(fsdp_reference: tuple[Path, Path], tmp_path: Path) -> None:
    run, reference = fsdp_reference
    step2 = run / "step-00000002"
    manifest = json.loads((step2 / MANIFEST).read_text())
    shards = sorted(name for name in manifest["files"] if name.startswith("shards/"))
    assert shards == ["shards/.metadata", "shards/__0_0.distcp", "shards/__1_0.distcp"]  # one per rank
    restored = {}
    for world in (2, 4, 0):
        copy = tmp_path / f"run-{world}"
        torchkeep.export_step(step2, copy / step2.name)  # a step folder alone is not the checkpoint
        out = tmp_path / f"out-{world}"
        run_job(world, "fsdp", copy, out, steps=5)
        label = max(world, 1)
        assert _losses(out, label, 0)["start"] == 3
        restored[label] = torch.load(out / f"restored-{label}.pt", weights_only=True)
        # 2 ranks: the same reductions as the original run; 4 and 1: the same math in another order
        _assert_equal(_final(out, label), _final(reference, 2), atol=0.0 if world == 2 else 1e-6)
    _assert_equal(restored[4], restored[2])
    _assert_equal(restored[1], restored[2])


def test_async_sharded_saves_equal_sync_ones(fsdp_reference: tuple[Path, Path], tmp_path: Path) -> None:
    run, reference = fsdp_reference
    run_job(2, "fsdp", tmp_path / "run", tmp_path / "out", steps=5, **{"async": 1})
    _assert_equal(_final(tmp_path / "out", 2), _final(reference, 2))
    for step in (2, 3, 4):  # written in the background, each rank's DCP on the checkpoint group
        name = f"step-{step:08d}"
        a = torchkeep.consolidate(tmp_path / "run" / name, tmp_path / f"async-{step}.safetensors")
        b = torchkeep.consolidate(run / name, tmp_path / f"sync-{step}.safetensors")
        _assert_equal(load_file(str(a)), load_file(str(b)))


def test_consolidate_a_sharded_checkpoint(fsdp_reference: tuple[Path, Path], tmp_path: Path) -> None:
    run, reference = fsdp_reference
    out = torchkeep.consolidate(run / "step-00000004", tmp_path / "model.safetensors")
    _assert_equal(load_file(str(out)), _final(reference, 2))
    pt = torchkeep.consolidate(run / "step-00000004", tmp_path / "model.pt")
    _assert_equal(torch.load(pt, weights_only=True), _final(reference, 2))
    model = worker.make_model()
    report = torchkeep.load_into(model, out)
    assert report.ok


@pytest.mark.parametrize(("mode", "how"), [("ddp", "snapshot"), ("fsdp", "write")])
def test_a_failure_on_one_rank_commits_nothing(mode: str, how: str, tmp_path: Path) -> None:
    run, out = tmp_path / "run", tmp_path / "out"
    run_job(2, "fail", run, out, steps=5, fail_step=2, fail_rank=1, fail_how=how, mode=mode)
    for rank in (0, 1):  # every rank raised DistributedSaveError naming rank 1's error
        error = json.loads((out / f"error-{rank}.json").read_text())
        assert list(error["failed"]) == ["1"]
        assert "injected" in error["failed"]["1"]
        assert error["stage"] == how
    assert sorted(p.name for p in run.iterdir()) == [
        ".writer.lock",
        "blobs",
        "step-00000000",
        "step-00000001",
    ]
    model = worker.make_model()
    with pytest.warns(torchkeep.RngRestoreWarning):
        info = torchkeep.Checkpointer(run).restore(model=model)
    assert info is not None
    assert info.step == 1


def test_saving_from_rank_0_only_with_distributed_false(tmp_path: Path) -> None:
    run_job(2, "ddp", tmp_path / "run", tmp_path / "out", steps=3, rank0_only=1)
    entries = torchkeep.Checkpointer(tmp_path / "run").list(verify=True)
    assert [e.step for e in entries] == [0, 1, 2]
    manifest = json.loads((tmp_path / "run" / "step-00000002" / MANIFEST).read_text())
    assert manifest["world_size"] == 1  # rank 0 alone: its own random state only
    model = worker.make_model()
    info = torchkeep.Checkpointer(tmp_path / "run").restore(model=model)
    assert info is not None
    assert info.step == 2


def test_sharded_metadata_that_would_run_code_is_refused(
    fsdp_reference: tuple[Path, Path], tmp_path: Path
) -> None:
    run, _ = fsdp_reference
    folder = tmp_path / "run" / "step-00000004"
    torchkeep.export_step(run / "step-00000004", folder)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    metadata = folder / "shards" / ".metadata"
    metadata.write_bytes(pickle.dumps(Payload()))
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"]["shards/.metadata"] = file_record(metadata).entry()  # the manifest agrees
    (folder / MANIFEST).write_text(json.dumps(manifest))
    model = worker.make_model()
    with pytest.raises(torchkeep.UnsafeFileError, match=r"os\.system|posix\.system"):
        torchkeep.Checkpointer(tmp_path / "run").restore(model=model, restore_rng=False)
    with pytest.raises(torchkeep.UnsafeFileError):
        torchkeep.consolidate(folder, tmp_path / "out.safetensors")
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()


def test_fsdp_checkpoints_on_s3(s3_server: Any, tmp_path: Path) -> None:
    bucket = s3_server.new_bucket()
    url = f"s3://{bucket}/run"
    out = tmp_path / "out"
    run_job(2, "fsdp", url, out, steps=3, env=s3_server.env)
    ckpts = torchkeep.Checkpointer(url, storage_options=s3_server.options)
    entries = ckpts.list(verify=True)
    assert [e.step for e in entries] == [0, 1, 2]
    assert all(e.valid for e in entries)
    model = worker.make_model()
    with pytest.warns(torchkeep.RngRestoreWarning):
        info = ckpts.restore(model=model)
    assert info is not None
    assert info.path == f"{url}/step-00000002"
    _assert_equal(dict(model.state_dict()), _final(out, 2))
