"""Remote storage through fsspec: the Checkpointer and weights files on file://, memory:// and s3://.

The s3:// cases talk to a real S3-protocol server (moto in server mode) that
the ``s3_server`` fixture starts on 127.0.0.1.
"""

from __future__ import annotations

import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep
import torchkeep.storage.fsspec_store
import torchkeep.storage.local
from conftest import S3Server, assert_state_equal
from torchkeep.storage.remote import Remote, resolve

HERE = Path(__file__).parent


@dataclass
class Store:
    """A run location under test and a way to look at what is stored there."""

    kind: str
    url: str
    options: dict[str, str] | None

    def files(self) -> list[str]:
        """Every stored file under the run, relative, sorted (the writer's lock or lease aside)."""
        location = resolve(self.url, self.options)
        if isinstance(location, Path):
            found = [p.relative_to(location).as_posix() for p in location.rglob("*") if p.is_file()]
        else:
            found = list(location.files())
        return sorted(name for name in found if name not in (".writer.lock", ".writer-lease.json"))

    def location(self, relative: str) -> Remote | Path:
        location = resolve(self.url, self.options)
        return location / relative if isinstance(location, Path) else location.join(relative)


@pytest.fixture(params=["file", "memory", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "file":
        return Store("file", f"file://{tmp_path}/run", None)
    if request.param == "memory":
        return Store("memory", f"memory://torchkeep-{uuid.uuid4().hex[:8]}/run", None)
    server: S3Server = request.getfixturevalue("s3_server")
    return Store("s3", f"s3://{server.new_bucket()}/run", dict(server.options))


def _setup() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    return model, optimizer, scheduler


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, steps: int) -> None:
    for _ in range(steps):
        loss = model(torch.randn(4, 6)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def _checkpointer(store: Store, **kwargs: Any) -> torchkeep.Checkpointer:
    return torchkeep.Checkpointer(store.url, storage_options=store.options, **kwargs)


def _expected_path(store: Store, name: str) -> Path | str:
    if store.kind == "file":
        return Path(store.url.removeprefix("file://")) / name
    return f"{store.url}/{name}"


def test_save_list_restore_round_trip(store: Store) -> None:
    model, optimizer, scheduler = _setup()
    _train(model, optimizer, scheduler, 3)
    ckpts = _checkpointer(store)
    saved = ckpts.save(3, model=model, optimizer=optimizer, scheduler=scheduler, epoch=1, extra={"note": "x"})
    assert saved == _expected_path(store, "step-00000003")
    files = store.files()
    assert [f for f in files if not f.startswith("blobs/")] == [
        "step-00000003/manifest.json",
        "step-00000003/state.json",
        "step-00000003/tensors.json",
    ]
    assert [f.split("-")[:2] for f in files if f.startswith("blobs/")] == [["blobs/step", "00000003"]]
    [entry] = ckpts.list(verify=True)
    assert entry.valid
    assert entry.path == saved
    assert entry.name == "step-00000003"
    assert entry.size > 0
    expected_model = {k: v.clone() for k, v in model.state_dict().items()}
    expected_rng = torch.get_rng_state()

    fresh_model, fresh_optimizer, fresh_scheduler = _setup()
    torch.manual_seed(99)
    info = _checkpointer(store).restore(
        model=fresh_model, optimizer=fresh_optimizer, scheduler=fresh_scheduler
    )
    assert info is not None
    assert info.path == saved
    assert (info.step, info.epoch, info.extra) == (3, 1, {"note": "x"})
    assert_state_equal(dict(fresh_model.state_dict()), expected_model)
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    assert torch.equal(torch.get_rng_state(), expected_rng)
    a, b = optimizer.state_dict(), fresh_optimizer.state_dict()
    for index, values in a["state"].items():
        for name, value in values.items():
            assert torch.equal(value, b["state"][index][name])


def test_retention_deletes_stored_objects(store: Store) -> None:
    model, _, _ = _setup()
    ckpts = _checkpointer(store, keep_last=2, keep_best=1, monitor="val_loss")
    losses = [0.9, 0.2, 0.5, 0.7, 0.8]
    for step, loss in enumerate(losses):
        ckpts.save(step, model=model, metrics={"val_loss": loss})
    assert [e.step for e in ckpts.list()] == [1, 3, 4]  # best (step 1) and the newest two
    folders = sorted({name.split("/")[0] for name in store.files()})
    assert folders == ["blobs", "step-00000001", "step-00000003", "step-00000004"]  # the others are gone
    packs = [name for name in store.files() if name.startswith("blobs/")]
    assert len(packs) == 1  # the same weights in every checkpoint: stored once, by the first save
    assert ckpts.best == _expected_path(store, "step-00000001")
    model_best, _, _ = _setup()
    info = ckpts.restore(model=model_best, path=ckpts.best, restore_rng=False)
    assert info is not None
    assert info.metrics == {"val_loss": 0.2}


def test_replacing_a_step(store: Store) -> None:
    model, _, _ = _setup()
    ckpts = _checkpointer(store)
    ckpts.save(1, model=model)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ckpts.save(1, model=model)
    assert [e.step for e in ckpts.list(verify=True)] == [1]
    restored, _, _ = _setup()
    ckpts.restore(model=restored, restore_rng=False)
    assert torch.equal(restored[0].weight, model[0].weight)


def test_a_save_that_dies_before_its_manifest_is_absent(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, _, _ = _setup()
    ckpts = _checkpointer(store)
    ckpts.save(1, model=model)
    # die right before the commit, leaving whatever the save had written (no cleanup runs in a crash)
    died = RuntimeError("killed")
    monkeypatch.setattr(torchkeep.storage.local.LocalStore, "abandon", lambda *a: None)
    monkeypatch.setattr(torchkeep.storage.fsspec_store.FsspecStore, "abandon", lambda *a: None)
    real_upload = Remote.upload

    def upload(self: Remote, local: Path) -> None:
        if self.name == "manifest.json" and "step-00000002" in self.path:
            raise died
        real_upload(self, local)

    monkeypatch.setattr(Remote, "upload", upload)
    if store.kind == "file":
        real_rename = torchkeep.storage.local.os.rename

        def rename(src: Any, dst: Any) -> None:
            if Path(dst).name == "step-00000002":
                raise died
            real_rename(src, dst)

        monkeypatch.setattr(torchkeep.storage.local.os, "rename", rename)
    with pytest.raises(RuntimeError, match="killed"):
        ckpts.save(2, model=model)
    monkeypatch.undo()
    leftovers = [name for name in store.files() if "step-00000002" in name]
    assert leftovers, "the crashed save left files behind, as a real crash would"
    assert "step-00000002/manifest.json" not in leftovers

    assert [e.step for e in ckpts.list()] == [1]  # readers do not see the half-written step ...
    assert ckpts.latest == _expected_path(store, "step-00000001")
    restored, _, _ = _setup()
    info = ckpts.restore(model=restored, restore_rng=False)
    assert info is not None
    assert info.step == 1
    _checkpointer(store, read_only=True).list()  # ... a reader leaves it alone ...
    assert [name for name in store.files() if "step-00000002" in name] == leftovers
    ckpts.close()
    _checkpointer(store).save(3, model=model)  # ... and the next writer, holding the lock, removes it
    assert not [name for name in store.files() if "step-00000002" in name]


def test_a_corrupted_object_fails_verification_and_restore_falls_back(store: Store) -> None:
    model, _, _ = _setup()
    ckpts = _checkpointer(store)
    ckpts.save(1, model=model)
    with torch.no_grad():
        model[0].weight.add_(1.0)  # step 2 stores this tensor in a pack of its own
    ckpts.save(2, model=model)
    [pack] = [name for name in store.files() if name.startswith("blobs/step-00000002-")]
    target = store.location(pack)
    if isinstance(target, Path):
        data = bytearray(target.read_bytes())
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))
    else:
        data = bytearray(target.fs.cat_file(target.path))
        data[-1] ^= 0xFF
        target.fs.pipe_file(target.path, bytes(data))
    entries = ckpts.list(verify=True)
    assert [(e.step, e.valid) for e in entries] == [(1, True), (2, False)]
    assert "checksum" in entries[1].reason
    restored, _, _ = _setup()
    info = ckpts.restore(model=restored, restore_rng=False)
    assert info is not None
    assert info.step == 1


def test_weights_files_at_urls(store: Store) -> None:
    model, _, _ = _setup()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for suffix in ("safetensors", "pt"):
        url = f"{store.url}/weights/model.{suffix}"
        written = torchkeep.save_weights(model, url, storage_options=store.options)
        assert str(written).endswith(f"model.{suffix}")
        assert_state_equal(torchkeep.load_weights(url, storage_options=store.options), expected)
        fresh, _, _ = _setup()
        report = torchkeep.load_into(fresh, url, storage_options=store.options)
        assert report.ok
        assert_state_equal(dict(fresh.state_dict()), expected)
    with pytest.raises(torchkeep.ModelFileNotFoundError):
        torchkeep.load_weights(f"{store.url}/weights/missing.safetensors", storage_options=store.options)


def test_consolidate_from_and_to_urls(store: Store) -> None:
    model, _, _ = _setup()
    ckpts = _checkpointer(store)
    folder = ckpts.save(5, model=model)
    out = f"{store.url}/export/model.safetensors"
    torchkeep.consolidate(folder, out, storage_options=store.options)
    assert_state_equal(torchkeep.load_weights(out, storage_options=store.options), dict(model.state_dict()))


def test_url_errors_are_typed(tmp_path: Path) -> None:
    with pytest.raises(torchkeep.UnknownProtocolError, match="no protocol 'nosuch'"):
        torchkeep.Checkpointer("nosuch://bucket/run")
    with pytest.raises(ValueError, match="storage_options only apply to URLs"):
        torchkeep.Checkpointer(tmp_path / "run", storage_options={"key": "x"})
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(torchkeep.MissingExtraError, match=r"gcsfs.*torchkeep\[gcs\]"):
            torchkeep.load_weights("gs://bucket/model.safetensors")


def test_sigkill_during_saves_to_s3_never_exposes_a_partial_checkpoint(s3_server: S3Server) -> None:
    sys.path.insert(0, str(HERE))
    import _crash_worker as worker

    url = f"s3://{s3_server.new_bucket()}/run"
    # a child imports the S3 client on its first save (about a second), hence the later window
    newest = worker.crash_rounds(url, rounds=8, storage_options=dict(s3_server.options), window=(0.8, 2.5))
    assert newest > 0


def test_a_remote_restore_downloads_the_checkpoint_once(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    if store.kind == "file":
        pytest.skip("a local run folder is read in place")
    model, _, _ = _setup()
    ckpts = _checkpointer(store)
    ckpts.save(1, model=model)
    fetched: list[str] = []
    real_download = Remote.download

    def download(self: Remote, local: Path) -> None:
        fetched.append(self.name)
        real_download(self, local)

    monkeypatch.setattr(Remote, "download", download)
    info = ckpts.restore(model=_setup()[0], restore_rng=False)
    assert info is not None
    # verified and read once: the folder, and the one pack it uses
    assert sorted(n for n in fetched if not n.startswith("step-")) == [
        "manifest.json",
        "state.json",
        "tensors.json",
    ]
    assert [n.split("-")[1] for n in fetched if n.startswith("step-")] == ["00000001"]
