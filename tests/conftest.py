"""Shared fixtures: real models, real files."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch import nn

from torchkeep.tutorial import TheModelClass

settings.register_profile(
    "default", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.register_profile(
    "ci", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.load_profile("ci" if os.environ.get("CI") else "default")


@pytest.fixture
def model() -> TheModelClass:
    torch.manual_seed(0)
    m = TheModelClass()
    # non-trivial running stats, so buffers differ from a fresh model's
    m.train()
    with torch.no_grad():
        m(torch.randn(8, 3, 26, 26))
    return m


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 3, 26, 26, generator=torch.Generator().manual_seed(1))


# every dtype both torch.save and safetensors store (complex128 aside: safetensors has no code for it)
STORABLE_DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.bool,
    torch.complex64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]


def assert_state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(sorted(a)) == list(sorted(b))
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


class TiedNet(nn.Module):
    """An embedding and an output layer sharing one weight, as language models do."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.embed.weight


def rewrite_as_saved_on_gpu(src: Path, dst: Path) -> None:
    """Copy a torch.save file, changing every storage location from cpu to cuda:0.

    That is exactly what a file saved from CUDA tensors holds, so a CPU-only
    machine can test loading one.
    """
    with zipfile.ZipFile(src) as archive:
        names = archive.namelist()
        records = {name: archive.read(name) for name in names}
    pkl = next(n for n in names if n.endswith("data.pkl"))
    records[pkl] = records[pkl].replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
    with zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED) as out:
        for name in names:
            out.writestr(name, records[name])


class S3Server:
    """A real S3-protocol server (moto in server mode) on 127.0.0.1, with one bucket per test."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
        # the same settings for child processes, through fsspec's environment configuration
        self.env = {
            "FSSPEC_S3_ENDPOINT_URL": endpoint,
            "FSSPEC_S3_KEY": "testing",
            "FSSPEC_S3_SECRET": "testing",
        }
        self._count = 0

    def new_bucket(self) -> str:
        import s3fs

        self._count += 1
        name = f"torchkeep-test-{self._count}"
        fs = s3fs.S3FileSystem(**self.options)
        fs.mkdir(name)
        fs.invalidate_cache()
        return name


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's server in a process of its own: in this process, a garbage-collected fsspec
    filesystem's finalizer could run on the server's thread and wait for fsspec's event loop,
    which was waiting for that server (a test hung so)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while True:  # ready when it accepts a connection (no fixed wait)
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto's server did not start (exit code {server.poll()})") from None
                time.sleep(0.05)
        yield S3Server(f"http://127.0.0.1:{port}")
    finally:
        server.terminate()
        server.wait()


def tensor_data(folder: Path) -> Path:
    """The file holding the model tensors a checkpoint's save wrote: its ``model.safetensors``
    (standalone), or the pack of the run that its save added (incremental)."""
    if (folder / "model.safetensors").is_file():
        return folder / "model.safetensors"
    packs = sorted((folder.parent / "blobs").glob(f"{folder.name}-*.safetensors"))
    assert len(packs) == 1, f"{folder.name} wrote {len(packs)} packs"
    return packs[0]


def step_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """The tensors of tensor file ``name`` (``model.safetensors``, ``state.safetensors``) of a
    checkpoint folder, standalone or incremental."""
    from safetensors.torch import load_file

    from torchkeep.run.blobs import read_indexed

    found = read_indexed(folder, name, device=torch.device("cpu"))
    return found[0] if found is not None else load_file(str(folder / name))
