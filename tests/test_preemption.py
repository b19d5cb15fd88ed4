"""Save on preemption (torchkeep.run.preemption): handlers, the agreed answer, save timing, and
trainings that a signal stops at a seeded moment, then resume exactly; in one process and on 2
gloo ranks (tests/_preempt_worker.py is the training script)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import torchkeep
from torchkeep.run.preemption import REQUEUE_EXIT_CODE, Preemption, parse_signals

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_preempt_worker.py"
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import _preempt_worker as worker  # noqa: E402

# gloo picks its interface from the host name, which may not resolve in a container: use loopback
LOOPBACK = (
    {"GLOO_SOCKET_IFNAME": "lo"} if sys.platform == "linux" and "GLOO_SOCKET_IFNAME" not in os.environ else {}
)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


# -- handlers --------------------------------------------------------------------------------------


def test_the_handler_records_and_close_puts_the_earlier_ones_back(tmp_path: Path) -> None:
    calls: list[int] = []

    def theirs(signum: int, frame: FrameType | None) -> None:
        calls.append(signum)

    before_term = signal.signal(signal.SIGTERM, theirs)
    before_usr1 = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        with torchkeep.Checkpointer(tmp_path / "run", preemption=True) as ckpts:
            assert signal.getsignal(signal.SIGTERM) not in (theirs, signal.SIG_DFL)
            assert ckpts.preempted is False
            signal.raise_signal(signal.SIGTERM)
            assert calls == [signal.SIGTERM]  # chained: the earlier Python handler still runs
            assert ckpts.preempted is True
            assert ckpts.preempted is True  # it stays so
            assert ckpts.preemption.received == "SIGTERM"
            signal.raise_signal(signal.SIGUSR1)  # SIG_IGN before: not "called", just recorded
            ckpts.save(0, model=nn.Linear(2, 2))
        assert signal.getsignal(signal.SIGTERM) is theirs
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
        assert ckpts.preempted is True  # after close: the last answer, no handlers involved
    finally:
        signal.signal(signal.SIGTERM, before_term)
        signal.signal(signal.SIGUSR1, before_usr1)


def test_only_the_signals_named_are_handled(tmp_path: Path) -> None:
    default_usr1 = signal.getsignal(signal.SIGUSR1)
    with torchkeep.Checkpointer(tmp_path / "run", preemption=("term",)) as ckpts:
        assert ckpts.preemption.signals == (signal.SIGTERM,)
        assert signal.getsignal(signal.SIGUSR1) == default_usr1
    assert parse_signals(True) == (signal.SIGTERM, signal.SIGUSR1)
    assert parse_signals(False) == ()
    assert parse_signals(("SIGUSR1", "usr1", int(signal.SIGTERM))) == (signal.SIGUSR1, signal.SIGTERM)
    assert parse_signals("SIGUSR2") == (signal.SIGUSR2,)


@pytest.mark.parametrize(
    ("option", "reason"),
    [(("SIGNOPE",), "no signal of that name"), (("SIGKILL",), "no process can catch it"), ((999,), "number")],
)
def test_signals_that_cannot_be_handled_are_refused(tmp_path: Path, option: Any, reason: str) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(torchkeep.SignalHandlerError, match=reason) as caught:
        torchkeep.Checkpointer(tmp_path / "run", preemption=("SIGTERM", *option))
    assert isinstance(caught.value, ValueError)
    assert signal.getsignal(signal.SIGTERM) == before  # nothing left installed


def test_outside_the_main_thread_the_error_says_where_to_build_it(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def build() -> None:
        try:
            torchkeep.Checkpointer(tmp_path / "run", preemption=True)
        except BaseException as err:
            errors.append(err)

    thread = threading.Thread(target=build, name="loader")
    thread.start()
    thread.join()
    assert len(errors) == 1
    assert isinstance(errors[0], torchkeep.SignalHandlerError)
    assert "'loader'" in str(errors[0])
    assert "main thread" in str(errors[0])
    # without preemption, any thread is fine
    thread = threading.Thread(target=lambda: torchkeep.Checkpointer(tmp_path / "other").close())
    thread.start()
    thread.join()


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="read_only"):
        torchkeep.Checkpointer(tmp_path / "run", read_only=True, preemption=True)
    for bad in (0, -1, "30", True):
        with pytest.raises(ValueError, match="grace_period"):
            torchkeep.Checkpointer(tmp_path / "run", grace_period=bad)  # type: ignore[arg-type]


def test_nested_checkpointers_closed_in_any_order_restore_the_original(tmp_path: Path) -> None:
    original = signal.getsignal(signal.SIGTERM)
    outer = torchkeep.Checkpointer(tmp_path / "a", preemption=("SIGTERM",))
    inner = torchkeep.Checkpointer(tmp_path / "b", preemption=("SIGTERM",))
    signal.raise_signal(signal.SIGTERM)
    assert outer.preempted
    assert inner.preempted
    outer.close()  # not last in: the inner handler stays, the outer one only passes signals on
    assert signal.getsignal(signal.SIGTERM) == inner.preemption._handle
    inner.close()
    assert signal.getsignal(signal.SIGTERM) == original


def test_a_forked_child_dies_of_the_signal_as_before(tmp_path: Path) -> None:
    # DataLoader workers are forked with the parent's handlers: they must still end on SIGTERM
    script = (
        "import os, signal, sys, time, torchkeep\n"
        f"ckpts = torchkeep.Checkpointer({str(tmp_path / 'run')!r}, preemption=True)\n"
        "ready, told = os.pipe()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os.write(told, b'x')  # a signal before the child's interpreter is set up would be lost\n"
        "    while True:\n"
        "        time.sleep(1)\n"
        "os.read(ready, 1)\n"
        "os.kill(pid, signal.SIGTERM)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "print(os.WIFSIGNALED(status) and os.WTERMSIG(status))\n"
        "print(ckpts.preempted)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=ENV
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        str(int(signal.SIGTERM)),
        "False",
    ]  # the child died; the parent got nothing


def test_a_signal_seen_but_never_saved_after_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with torchkeep.Checkpointer(tmp_path / "run", preemption=True) as ckpts:
        ckpts.save(0, model=nn.Linear(2, 2))
        signal.raise_signal(signal.SIGUSR1)
        assert ckpts.preempted
        caplog.set_level(logging.WARNING, logger="torchkeep.run.preemption")
    assert "SIGUSR1 was received and no checkpoint was saved after it" in caplog.text


# -- save durations --------------------------------------------------------------------------------


@pytest.mark.parametrize("async_save", [False, True])
def test_each_save_is_timed_and_a_save_longer_than_the_grace_period_warns_once(
    tmp_path: Path, async_save: bool
) -> None:
    model = nn.Linear(64, 64)
    # 1 µs: every real save takes longer, so this never depends on the machine's speed
    ckpts = torchkeep.Checkpointer(
        tmp_path / "run", async_save=async_save, preemption=True, grace_period=1e-6
    )
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ckpts.save(0, model=model)
        ckpts.wait()
        assert not ckpts.preempted  # a background save's warning comes at the next call here
    assert [type(w.message) for w in seen] == [torchkeep.GracePeriodWarning]
    assert "longer than the grace period of 1e-06 s" in str(seen[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        ckpts.save(1, model=model)
        ckpts.close()
    assert len(ckpts.preemption.save_seconds) == 2
    assert all(0 < s < 600 for s in ckpts.preemption.save_seconds)
    assert ckpts.preemption.last_save_seconds == ckpts.preemption.save_seconds[-1]


def test_a_save_within_the_grace_period_does_not_warn(tmp_path: Path) -> None:
    with torchkeep.Checkpointer(tmp_path / "run", grace_period=3600) as ckpts:  # timing without signals
        for step in range(3):
            ckpts.save(step, model=nn.Linear(4, 4))
    assert len(ckpts.preemption.save_seconds) == 3
    assert ckpts.preemption.signals == ()


# -- trainings stopped at a seeded moment ----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _job(world: int, args: list[str], timeout: float = 600) -> None:
    """Run the worker in one plain process (world 1) or as ``world`` gloo ranks; every one must exit 0."""
    if world == 1:
        done = subprocess.run(
            [sys.executable, str(WORKER), *args], capture_output=True, text=True, timeout=timeout, env=ENV
        )
        assert done.returncode == 0, done.stderr[-4000:]
        return
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), *args],
            env={
                **ENV,
                **LOOPBACK,
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "RANK": str(rank),
                "WORLD_SIZE": str(world),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world)
    ]
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


def _expected(fired: list[dict[str, Any]], start: int) -> tuple[str, int | None]:
    """What a segment must end in, given the signals sent in it (on any rank)."""
    if not fired:
        return "completed", None
    if any(f["phase"] in ("setup", "restore") for f in fired):
        return "before_first_step", None
    # a signal inside a step or an evaluation is seen at that step's read; one inside a save or
    # while it is in flight comes after that read, so at the next step's
    stop = min(f["step"] + (f["phase"] in ("save", "in_flight")) for f in fired)
    return ("completed", None) if stop >= worker.TOTAL else ("preempted", stop)


def _check_runs(base: Path, first: int, count: int, world: int) -> dict[str, int]:
    logs = [
        [json.loads(line) for line in (base / f"interrupt-{rank}.jsonl").read_text().splitlines()]
        for rank in range(world)
    ]
    phases: dict[str, int] = {}
    for index in range(count):
        run = first + index
        records = [log[index] for log in logs]
        assert all(r["run"] == run for r in records)
        where = f"run {run} (plan {records[0]['plan']})"
        ends = [[(s["exit"], s["start"], s["stopped"], s["latest"]) for s in r["segments"]] for r in records]
        assert all(e == ends[0] for e in ends), f"{where}: the ranks disagree: {ends}"  # collective
        latest: str | None = None
        for number, (end, start, stopped, now) in enumerate(ends[0]):
            fired = [f for r in records for f in r["fired"] if f["segment"] == number]
            for f in fired:
                phases[f["phase"]] = phases.get(f["phase"], 0) + 1
            assert (end, stopped) == _expected(fired, start), f"{where}, segment {number}: {ends[0]}"
            if end == "preempted":  # the checkpoint is the step it stopped at: no step lost
                latest = f"step-{stopped:08d}"
            elif end == "completed":
                latest = f"step-{worker.TOTAL - 1:08d}"
            assert now == latest, f"{where}, segment {number}: newest checkpoint {now}, expected {latest}"
        entries = torchkeep.Checkpointer(base / f"run-{run}", read_only=True).list(verify=True)
        assert all(e.valid for e in entries), [(e.name, e.reason) for e in entries]
        assert bool(entries) == (latest is not None)
    # every run, resumed in a fresh process, ends bitwise where the uninterrupted run ends
    for rank in range(world):
        reference = load_file(str(base / f"final-ref-{rank}.safetensors"))
        for run in range(first, first + count):
            final = load_file(str(base / f"final-{run}-{rank}.safetensors"))
            assert sorted(final) == sorted(reference)
            differ = [key for key in reference if not torch.equal(final[key], reference[key])]
            assert not differ, f"run {run}, rank {rank}: differs from the uninterrupted run in {differ}"
    ref_losses = json.loads((base / "losses-ref.json").read_text())
    assert len(ref_losses) == worker.TOTAL
    for run in range(first, first + count):
        assert json.loads((base / f"losses-{run}.json").read_text()) == ref_losses, f"run {run}"
    return phases


def _stop_and_resume(tmp_path: Path, world: int, first: int, count: int) -> None:
    _job(world, ["interrupt", str(tmp_path), str(first), str(count)])
    _job(world, ["resume", str(tmp_path), str(first), str(count)])
    phases = _check_runs(tmp_path, first, count, world)
    assert set(phases) == set(worker.PHASES), phases  # the seeds cover every moment


@pytest.mark.parametrize("world", [1, 2], ids=["one-process", "two-gloo-ranks"])
def test_50_trainings_stopped_at_a_seeded_moment_resume_exactly(tmp_path: Path, world: int) -> None:
    _stop_and_resume(tmp_path, world, first=0, count=50)


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2], ids=["one-process", "two-gloo-ranks"])
def test_50_more_trainings_stopped_at_a_seeded_moment_resume_exactly(tmp_path: Path, world: int) -> None:
    _stop_and_resume(tmp_path, world, first=50, count=50)  # with the test above: 100 per world


# -- a signal from outside -------------------------------------------------------------------------


def _train_until_signalled(run: Path, out: Path, *, after: int) -> tuple[int, int]:
    """Start the training script, send SIGTERM once it reports step ``after``; its exit code and last step."""
    args = [sys.executable, str(WORKER), "forever", str(run), str(10**9), str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == f"ready {after}":
            break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=300)  # keep reading: a full pipe would block the script
    lines = rest.splitlines()
    assert lines[-1].startswith("preempted by SIGTERM: saved step"), lines[-3:]
    return proc.returncode, int(lines[-1].rsplit(" ", 1)[1])


def test_sigterm_from_outside_saves_exits_normally_and_resumes_exactly(tmp_path: Path) -> None:
    # (exiting with REQUEUE_EXIT_CODE instead: the SLURM test below)
    run = tmp_path / "run"
    code, stopped = _train_until_signalled(run, tmp_path / "unused.safetensors", after=30)
    assert code == 0
    assert stopped >= 30
    assert Path(str(torchkeep.Checkpointer(run, read_only=True).latest)).name == f"step-{stopped:08d}"
    until = str(stopped + 8)
    _job(1, ["forever", str(run), until, str(tmp_path / "resumed.safetensors")])
    _job(1, ["forever", str(tmp_path / "straight"), until, str(tmp_path / "straight.safetensors")])
    resumed = load_file(str(tmp_path / "resumed.safetensors"))
    straight = load_file(str(tmp_path / "straight.safetensors"))
    assert sorted(resumed) == sorted(straight)
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_the_slurm_batch_script_forwards_usr1_and_requeues(tmp_path: Path) -> None:
    # sbatch --signal=B:USR1@90 signals the batch shell only: the README's script hands it on to the
    # training and requeues when it ends with REQUEUE_EXIT_CODE. srun and scontrol are stand-ins here.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    (tmp_path / "train.py").write_text(
        "import runpy, sys\n"
        f"sys.argv = [{str(WORKER)!r}, 'forever', 'runs/exp1', str(10**9), 'final.safetensors', 'requeue']\n"
        f"runpy.run_path({str(WORKER)!r}, run_name='__main__')\n"
    )
    script = ROOT / "examples" / "slurm_preemption.sbatch"
    env = {**ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    proc = subprocess.Popen(["bash", str(script)], cwd=tmp_path, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == "ready 30":
            break
    proc.send_signal(signal.SIGUSR1)  # what Slurm does 90 s before the time limit
    rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == REQUEUE_EXIT_CODE, rest[-2000:]
    assert "preempted by SIGUSR1" in rest
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert torchkeep.Checkpointer(tmp_path / "runs" / "exp1", read_only=True).latest is not None


def test_one_process_preemption_object_alone() -> None:
    # the object the Checkpointer builds, on its own: no handlers, no group, only timing
    alone = Preemption()
    assert alone.poll() is False
    assert alone.received is None
    alone.save_started()
    alone.save_finished()
    assert len(alone.save_seconds) == 1
    alone.close()
