"""One writer per run, and readers that never disturb it: with real processes.

Loops are bounded by counts; no assertion depends on which process runs first.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep
import torchkeep.run
from conftest import S3Server

WORKER = str(Path(__file__).parent / "_run_worker.py")
STEPS = 12
WIDTH = 768  # about 2.4 MB of weights and as much momentum per checkpoint


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    env.update(extra or {})
    return env


def _spawn(
    *args: str, env: dict[str, str], stdin: int | None = None, merge: bool = False
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, WORKER, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge else subprocess.PIPE,
        stdin=stdin,
        text=True,
        env=env,
    )


def _readers_never_disturb_the_writer(
    run: str,
    done: Path,
    env: dict[str, str],
    *,
    count: int,
    steps: int = STEPS,
    width: int = WIDTH,
    options: dict[str, str] | None = None,
    keep: int | None = None,
) -> dict[str, int]:
    kinds = ("ls", "verify", "best", "reader")
    more = [] if keep is None else [str(keep)]
    writer = _spawn("write", run, str(steps), str(width), *more, env=env, stdin=subprocess.PIPE)
    readers: list[subprocess.Popen[str]] = []
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "ready"
        readers = [_spawn("read", run, kind, str(count), str(done), env=env, merge=True) for kind in kinds]
        for reader in readers:  # each has read once: the saves to come overlap their next reads
            assert reader.stdout is not None
            assert reader.stdout.readline().strip() == "started"
        out, err = writer.communicate("go\n", timeout=600)
        done.touch()
        assert writer.returncode == 0, err  # every save succeeded
        assert out.strip() == "done"
        overlapping = {}
        for kind, reader in zip(kinds, readers, strict=True):
            assert reader.stdout is not None
            out = reader.stdout.read()  # the rest of it, after the line read above
            assert reader.wait(timeout=600) == 0, out
            result = json.loads(out.strip().splitlines()[-1])
            assert result["failures"] == [], result
            assert result["runs"] >= 2
            overlapping[kind] = result["overlapping"]
    finally:
        for process in (writer, *readers):
            if process.returncode is None:
                process.kill()
            process.communicate()
    entries = torchkeep.Checkpointer(run, read_only=True, storage_options=options).list(verify=True)
    kept = list(range(steps)) if keep is None else list(range(steps - keep, steps))
    assert [e.step for e in entries] == kept  # every step is there (or kept)
    assert all(e.valid for e in entries)
    print("reader iterations while the writer saved:", overlapping)  # shown with -s
    return overlapping


def test_readers_never_disturb_a_local_writer(tmp_path: Path) -> None:
    # retention removes checkpoints and the packs only they used while the readers read
    run = tmp_path / "run"
    _readers_never_disturb_the_writer(str(run), tmp_path / "done", _env(), count=40, keep=4)
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith("step-")) == [
        ".writer.lock",
        "blobs",
    ]
    used = set()
    for folder in run.glob("step-*"):
        used |= set(json.loads((folder / "tensors.json").read_text())["packs"].values())
    assert {f"blobs/{p.name}" for p in (run / "blobs").iterdir()} == used  # no pack left unused
    assert "blobs/step-00000000-" in " ".join(used)  # the frozen layer, written by the first save only


def test_readers_never_disturb_a_remote_writer(tmp_path: Path, s3_server: S3Server) -> None:
    run = f"s3://{s3_server.new_bucket()}/run"
    _readers_never_disturb_the_writer(
        run,
        tmp_path / "done",
        _env(s3_server.env),
        count=15,
        steps=30,
        width=512,
        options=dict(s3_server.options),
    )


def _second_writer_is_refused(run: str, env: dict[str, str], options: dict[str, str] | None) -> None:
    holder = _spawn("hold", run, env=env, stdin=subprocess.PIPE)
    assert holder.stdout is not None
    line = holder.stdout.readline()
    if not line:
        holder.kill()
        pytest.fail(holder.communicate()[1])
    pid = json.loads(line)["pid"]
    model = nn.Linear(4, 4)
    second = torchkeep.Checkpointer(run, storage_options=options)
    assert second.list()[0].step == 0  # reading is fine
    with pytest.raises(torchkeep.RunLockedError, match=f"pid {pid}") as info:
        second.save(1, model=model)
    assert isinstance(info.value, BlockingIOError)
    assert info.value.holder["pid"] == pid
    os.kill(pid, signal.SIGKILL)  # a writer that dies gives the run up
    holder.communicate(timeout=60)
    second.save(1, model=model)
    second.close()
    assert [e.step for e in torchkeep.Checkpointer(run, storage_options=options).list(verify=True)] == [0, 1]


def test_a_second_local_writer_is_refused_until_the_first_dies(tmp_path: Path) -> None:
    _second_writer_is_refused(str(tmp_path / "run"), _env(), None)


def test_a_second_remote_writer_is_refused_until_the_first_dies(s3_server: S3Server) -> None:
    run = f"s3://{s3_server.new_bucket()}/run"
    _second_writer_is_refused(run, _env(s3_server.env), dict(s3_server.options))


def test_two_writers_in_one_process(tmp_path: Path) -> None:
    model = nn.Linear(4, 4)
    first = torchkeep.Checkpointer(tmp_path)
    first.save(0, model=model)
    with pytest.raises(torchkeep.RunLockedError, match=f"pid {os.getpid()}"):
        torchkeep.Checkpointer(tmp_path).save(1, model=model)
    with pytest.raises(ValueError, match="read_only"):
        torchkeep.Checkpointer(tmp_path, read_only=True).save(1, model=model)
    first.close()
    with torchkeep.Checkpointer(tmp_path) as second:
        second.save(1, model=model)
    assert [e.step for e in torchkeep.Checkpointer(tmp_path).list()] == [0, 1]


def test_a_reader_leaves_a_save_in_flight_alone(tmp_path: Path) -> None:
    model = nn.Linear(4, 4)
    with torchkeep.Checkpointer(tmp_path) as ckpts:
        ckpts.save(0, model=model)
        in_flight = tmp_path / ".step-00000001.tmp-alive"  # what a save in progress looks like
        in_flight.mkdir()
        (in_flight / "model.safetensors").write_bytes(b"half")
        torchkeep.Checkpointer(tmp_path, monitor="loss").best  # noqa: B018 - the README's one-liner
        assert [e.step for e in torchkeep.run.RunReader(tmp_path).entries(verify=True)] == [0]
        assert in_flight.is_dir()
        assert torch.equal(torchkeep.load_weights(tmp_path)["weight"], model.weight)  # the run's latest


def test_a_local_store_lists_each_file_of_a_folder_with_its_size(tmp_path: Path) -> None:
    from torchkeep.storage.local import LocalStore

    step = tmp_path / "step-00000001"
    (step / "shards" / "deep").mkdir(parents=True)
    (step / "manifest.json").write_bytes(b"x" * 10)
    (step / "shards" / "a.distcp").write_bytes(b"y" * 3)
    (step / "shards" / "deep" / "b").write_bytes(b"")
    (tmp_path / "outside").write_bytes(b"z" * 7)
    (step / "link").symlink_to(tmp_path / "outside")  # a linked file counts, as a file
    (step / "dirlink").symlink_to(step / "shards", target_is_directory=True)  # never followed
    (step / "dangling").symlink_to(tmp_path / "nowhere")  # not a file
    store = LocalStore(tmp_path)
    assert store.sizes("step-00000001") == {
        "manifest.json": 10,
        "shards/a.distcp": 3,
        "shards/deep/b": 0,
        "link": 7,
    }
    assert store.sizes("step-00000002") is None  # gone (or never there)
    assert store.sizes("outside") is None  # a file, not a folder
    (tmp_path / "empty").mkdir()
    assert store.sizes("empty") == {}
