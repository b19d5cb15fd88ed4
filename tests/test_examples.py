"""Every script in examples/ runs to the end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import torchkeep

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(script: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert any(tmp_path.iterdir())


def test_ddp_example_under_torchrun_then_one_process(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[1] / "examples" / "ddp_train.py"
    run = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if sys.platform == "linux":  # gloo picks its interface from the host name, which may not resolve
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    first = subprocess.run(
        [*torchrun, str(script), str(run), "--fsdp", "--steps", "20"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert first.returncode == 0, first.stdout + first.stderr
    assert "2 process(es); a fresh run" in first.stdout
    resumed = subprocess.run(
        [sys.executable, str(script), str(run), "--steps", "30"], capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "1 process(es); resumed at step 20" in resumed.stdout
    assert "step 29: loss" in resumed.stdout
    out = tmp_path / "model.safetensors"
    done = subprocess.run(
        [sys.executable, "-m", "torchkeep", "convert", str(run / "step-00000019"), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(torchkeep.load_weights(out)) == [
        "0.bias",
        "0.weight",
        "2.bias",
        "2.weight",
        "4.bias",
        "4.weight",
    ]
