"""Incremental checkpoints (run/blobs.py): each distinct tensor stored once, every checkpoint whole."""

from __future__ import annotations

import itertools
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash
from torch import nn

import torchkeep
import torchkeep.run.blobs as blobs
import torchkeep.storage.tensorfile as tensorfile
from conftest import STORABLE_DTYPES, TiedNet, assert_state_equal, tensor_data
from torchkeep.cli import main
from torchkeep.storage.digests import tensor_digest
from torchkeep.storage.manifest import file_record


def _cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as done:
        main(args)
    return int(done.value.code or 0)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 3)
    )


@pytest.mark.parametrize("dtype", STORABLE_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "slice", "scalar", "empty", "grad"])
def test_a_digest_is_xxh3_of_dtype_shape_and_row_major_bytes(dtype: torch.dtype, layout: str) -> None:
    base = (torch.randn(6, 5, generator=torch.Generator().manual_seed(1)) * 20).to(dtype)
    t = {
        "contiguous": base,
        "transposed": base.t(),
        "slice": base[1:4, ::2],
        "scalar": base[2, 3],
        "empty": base[:0],
        "grad": base.float().requires_grad_() if dtype.is_floating_point else base,
    }[layout]
    expected = xxhash.xxh3_128(f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}".encode())
    expected.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    assert tensor_digest(t) == expected.hexdigest()


def _frozen_net() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = _net()
    torchkeep.freeze(model, bn="eval")
    torchkeep.unfreeze(model, "4")
    return model, torch.optim.SGD(torchkeep.trainable(model), lr=0.1, momentum=0.9)


def _train(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    loss = model(torch.randn(8, 64)).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _packs(run: Path) -> dict[str, int]:
    folder = run / "blobs"
    return {p.name: p.stat().st_size for p in folder.iterdir()} if folder.is_dir() else {}


def _flip_a_byte_of(folder: Path, key: str) -> Path:
    """Flip one byte of model tensor ``key``'s data in the pack that holds it; return the pack."""
    index = json.loads((folder / "tensors.json").read_text())
    digest = index["files"]["model.safetensors"]["tensors"][key]
    pack = folder.parent / index["packs"][digest]
    data = bytearray(pack.read_bytes())
    length = int.from_bytes(data[:8], "little")
    start, _ = json.loads(data[8 : 8 + length])[digest]["data_offsets"]
    data[8 + length + start] ^= 0x01  # same size: only the checksums see it
    pack.write_bytes(bytes(data))
    return pack


def _rewrite_index(folder: Path, change: Callable[[dict[str, Any]], object]) -> None:
    """Edit a checkpoint's tensors.json and re-sign its manifest, as someone crafting one would."""
    index = json.loads((folder / "tensors.json").read_text())
    change(index)
    (folder / "tensors.json").write_text(json.dumps(index))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["tensors.json"] = file_record(folder / "tensors.json").entry()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.name != ".writer.lock"
    }


def test_frozen_tensors_are_written_by_the_first_save_only(tmp_path: Path) -> None:
    model, optimizer = _frozen_net()
    ckpts = torchkeep.Checkpointer(tmp_path)
    sizes = []
    for step in range(5):
        _train(model, optimizer)
        ckpts.save(step, model=model, optimizer=optimizer)
        sizes.append(sum(_packs(tmp_path).values()))
    first = sizes[0]
    frozen = sum(v.nbytes for k, v in model.state_dict().items() if not k.startswith("4."))
    assert first > frozen
    head = sum(v.nbytes for k, v in model.state_dict().items() if k.startswith("4."))
    rng = torch.get_rng_state().nbytes
    for before, after in itertools.pairwise(sizes):
        # the head, its momentum and the random state, plus the pack's header: never the frozen part
        assert 2 * head + rng <= after - before < 2 * head + rng + 4096
    entries = ckpts.list()
    assert entries[0].new > frozen  # the first save wrote the frozen part
    for entry in entries[1:]:
        assert entry.size - entry.new >= frozen  # whole, the frozen part shared, not new
    index = json.loads((tmp_path / "step-00000004" / "tensors.json").read_text())
    model_digests = index["files"]["model.safetensors"]["tensors"]
    assert model_digests["0.weight"] == tensor_digest(model[0].weight)
    assert index["packs"][model_digests["0.weight"]].startswith("blobs/step-00000000-")
    assert index["packs"][model_digests["4.weight"]].startswith("blobs/step-00000004-")


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_restoring_an_incremental_checkpoint_equals_restoring_a_standalone_one(
    tmp_path: Path, async_save: bool
) -> None:
    model, optimizer = _frozen_net()
    for step in range(3):
        _train(model, optimizer)
        for incremental in (True, False):
            with torchkeep.Checkpointer(
                tmp_path / str(incremental), incremental=incremental, async_save=async_save
            ) as ckpts:
                ckpts.save(step, model=model, optimizer=optimizer, extra={"t": torch.arange(3)})
    restored = {}
    for incremental in (True, False):
        fresh, fresh_optimizer = _frozen_net()
        info = torchkeep.Checkpointer(tmp_path / str(incremental)).restore(
            model=fresh, optimizer=fresh_optimizer, restore_rng=False
        )
        assert info is not None
        assert info.step == 2
        assert torch.equal(info.extra["t"], torch.arange(3))
        restored[incremental] = (dict(fresh.state_dict()), fresh_optimizer.state_dict())
    assert_state_equal(restored[True][0], restored[False][0])
    assert_state_equal(restored[True][0], dict(model.state_dict()))
    a, b = restored[True][1]["state"], restored[False][1]["state"]
    assert a.keys() == b.keys()
    for index in a:
        assert torch.equal(a[index]["momentum_buffer"], b[index]["momentum_buffer"])


def test_tied_weights_stay_tied_and_equal_values_stay_separate(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TiedNet()
    ckpts = torchkeep.Checkpointer(tmp_path)
    folder = Path(ckpts.save(1, model=model, extra={"a": torch.zeros(4), "b": torch.zeros(4)}))
    index = json.loads((folder / "tensors.json").read_text())
    assert index["files"]["model.safetensors"]["tensors"].keys() == {"embed.weight"}
    state = index["files"]["state.safetensors"]["tensors"]
    zeros = [d for k, d in state.items() if k.startswith("extra/")]
    assert len(zeros) == 2
    assert zeros[0] == zeros[1]  # equal values: one stored tensor
    weights = torchkeep.load_weights(folder)
    assert weights["out.weight"] is weights["embed.weight"]
    fresh = TiedNet()
    info = ckpts.restore(model=fresh, restore_rng=False)
    assert info is not None
    assert fresh.out.weight is fresh.embed.weight
    assert torch.equal(fresh.embed.weight, model.embed.weight)
    info.extra["a"].add_(1)  # each key its own tensor, though stored once
    assert torch.equal(info.extra["b"], torch.zeros(4))


def _data_write(model: nn.Module) -> None:
    model[0].weight.data.mul_(2)


def _load_state_dict(model: nn.Module) -> None:
    other = _net()
    with torch.no_grad():
        other[0].weight.add_(1)
    model.load_state_dict(other.state_dict())


def _no_grad_inplace(model: nn.Module) -> None:
    with torch.no_grad():
        model[0].weight[0, 0] += 1


def _replaced_data(model: nn.Module) -> None:
    model[0].weight.data = torch.ones_like(model[0].weight)


def _numpy_alias(model: nn.Module) -> None:
    model[0].weight.detach().numpy()[0, 0] = 42.0


def _batchnorm_in_train_mode(model: nn.Module) -> None:
    model[1].train()
    model[1](torch.randn(8, 64))


WRITES: dict[str, Callable[[nn.Module], None]] = {
    "data": _data_write,
    "load_state_dict": _load_state_dict,
    "no_grad": _no_grad_inplace,
    "replaced_data": _replaced_data,
    "numpy": _numpy_alias,
    "batchnorm": _batchnorm_in_train_mode,
}


@pytest.mark.parametrize("write", list(WRITES))
@pytest.mark.parametrize("trust", [False, True], ids=["hash", "versions"])
def test_every_way_of_changing_a_frozen_tensor_reaches_the_next_checkpoint(
    tmp_path: Path, write: str, trust: bool
) -> None:
    # By default every tensor is hashed, so every write is seen. With trust_version_counters,
    # frozen parameters whose version counter did not move are not read: writes through .data
    # and through a NumPy view are not counted by torch (documented; this test pins it down).
    unseen_by_versions = {"data", "numpy"}
    model, optimizer = _frozen_net()
    ckpts = torchkeep.Checkpointer(tmp_path, trust_version_counters=trust)
    ckpts.save(1, model=model, optimizer=optimizer)
    _train(model, optimizer)  # optimizer steps on the head: counted, and hashed anyway
    WRITES[write](model)
    ckpts.save(2, model=model, optimizer=optimizer)
    fresh, _ = _frozen_net()
    ckpts.restore(model=fresh, restore_rng=False)
    live = dict(model.state_dict())
    if trust and write in unseen_by_versions:
        assert not torch.equal(fresh[0].weight, live["0.weight"])
        fresh.load_state_dict(live)  # the rest of the check is the same
    assert_state_equal(dict(fresh.state_dict()), live)


def test_trusting_version_counters_skips_reading_unchanged_frozen_parameters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[tuple[int, ...]] = []
    real = blobs.tensor_digest

    def counting(t: torch.Tensor) -> str:
        hashed.append(tuple(t.shape))
        return real(t)

    monkeypatch.setattr(blobs, "tensor_digest", counting)
    model, optimizer = _frozen_net()
    _train(model, optimizer)  # the optimizer holds its momentum at both saves
    ckpts = torchkeep.Checkpointer(tmp_path, trust_version_counters=True)
    ckpts.save(1, model=model, optimizer=optimizer)
    first = sorted(hashed)
    hashed.clear()
    _train(model, optimizer)
    ckpts.save(2, model=model, optimizer=optimizer)
    for p in model.parameters():
        if not p.requires_grad:
            first.remove(tuple(p.shape))
    assert sorted(hashed) == first  # buffers, the head, its momentum, the random state: hashed again
    with pytest.raises(ValueError, match="incremental=True"):
        torchkeep.Checkpointer(tmp_path / "x", incremental=False, trust_version_counters=True)


def test_tensors_are_hashed_beside_the_pack_write_not_before_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Full fine-tuning (everything new): once a batch is chosen a second thread writes it while
    the saving thread (and its helper, for large tensors) hashes the rest, so hashing adds
    nothing to the save's time where the write is the bottleneck."""
    monkeypatch.setattr(tensorfile, "_HASH_BATCH", 1)  # every chosen tensor is a batch
    monkeypatch.setattr(tensorfile, "_SHARED_MIN", 0)  # every tensor may go to the helper
    hashed: set[str] = set()
    wrote: set[str] = set()
    real_digest, real_write = blobs.tensor_digest, tensorfile._write_all

    def digest(t: torch.Tensor) -> str:
        hashed.add(threading.current_thread().name)
        return real_digest(t)

    def write(fd: int, views: list[memoryview]) -> None:
        wrote.add(threading.current_thread().name)
        real_write(fd, views)

    monkeypatch.setattr(blobs, "tensor_digest", digest)
    monkeypatch.setattr(tensorfile, "_write_all", write)
    model = _net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ckpts = torchkeep.Checkpointer(tmp_path)
    for step in range(2):
        _train(model, optimizer)
        ckpts.save(step, model=model, optimizer=optimizer)
    assert wrote == {"torchkeep-write"}
    assert hashed  # on the saving thread or its helper (which one takes which tensor may vary)
    assert hashed <= {threading.current_thread().name, "torchkeep-prepare"}
    assert _cli(["verify", str(tmp_path / "step-00000001")]) == 0  # checksums of the packs included
    fresh = _net()
    torchkeep.Checkpointer(tmp_path, read_only=True).restore(model=fresh, restore_rng=False)
    assert_state_equal(dict(fresh.state_dict()), dict(model.state_dict()))


def test_retention_deletes_the_packs_no_kept_checkpoint_uses(tmp_path: Path) -> None:
    model, optimizer = _frozen_net()
    ckpts = torchkeep.Checkpointer(tmp_path, keep_last=2)
    for step in range(6):
        _train(model, optimizer)
        ckpts.save(step, model=model, optimizer=optimizer)
    assert [e.step for e in ckpts.list()] == [4, 5]
    # the first save's pack (the frozen part) and the packs of the two kept saves
    assert sorted(name.split("-")[1] for name in _packs(tmp_path)) == ["00000000", "00000004", "00000005"]
    assert all(e.valid for e in ckpts.list(verify=True))
    fresh, fresh_optimizer = _frozen_net()
    ckpts.restore(model=fresh, optimizer=fresh_optimizer, path=tmp_path / "step-00000004")
    unfrozen = _frozen_net()[0]
    assert torch.equal(fresh[0].weight, unfrozen[0].weight)


def test_a_new_writer_shares_the_packs_of_the_run_it_resumes(tmp_path: Path) -> None:
    model, optimizer = _frozen_net()
    with torchkeep.Checkpointer(tmp_path) as first:
        first.save(0, model=model, optimizer=optimizer)
    _train(model, optimizer)
    with torchkeep.Checkpointer(tmp_path) as second:  # as a resumed process would
        second.save(1, model=model, optimizer=optimizer)
    new = tensor_data(tmp_path / "step-00000001")
    head = sum(v.nbytes for k, v in model.state_dict().items() if k.startswith("4."))
    rng = torch.get_rng_state().nbytes
    assert new.stat().st_size < 2 * head + rng + 4096  # the frozen part was not written again


def test_a_damaged_pack_is_never_shared_by_a_new_checkpoint(tmp_path: Path) -> None:
    model, optimizer = _frozen_net()
    with torchkeep.Checkpointer(tmp_path) as first:
        first.save(0, model=model, optimizer=optimizer)
    pack = tensor_data(tmp_path / "step-00000000")
    pack.write_bytes(pack.read_bytes()[:-8])  # truncated: its size no longer matches
    with torchkeep.Checkpointer(tmp_path) as second:
        second.save(1, model=model, optimizer=optimizer)
    entries = torchkeep.Checkpointer(tmp_path).list(verify=True)
    assert [(e.step, e.valid) for e in entries] == [(0, False), (1, True)]
    assert "bytes" in entries[0].reason
    fresh, _ = _frozen_net()
    info = torchkeep.Checkpointer(tmp_path).restore(model=fresh, restore_rng=False)
    assert info is not None
    assert info.step == 1
    assert_state_equal(dict(fresh.state_dict()), dict(model.state_dict()))


def test_damage_to_a_shared_pack_shows_in_every_checkpoint_that_uses_it(tmp_path: Path) -> None:
    model, optimizer = _frozen_net()
    ckpts = torchkeep.Checkpointer(tmp_path)
    for step in range(3):
        _train(model, optimizer)
        ckpts.save(step, model=model, optimizer=optimizer)
    shared = _flip_a_byte_of(tmp_path / "step-00000002", "0.weight")  # written by the first save
    assert shared == tensor_data(tmp_path / "step-00000000")
    assert all(e.valid for e in ckpts.list())  # sizes only
    checked = ckpts.list(verify=True)
    assert [e.valid for e in checked] == [False, False, False]
    assert all("xxh3_128 checksum" in e.reason and shared.name in e.reason for e in checked)
    assert _cli(["verify", str(tmp_path / "step-00000002")]) == 1
    with pytest.raises(torchkeep.NoValidCheckpointError):
        ckpts.restore(model=_frozen_net()[0])
    (shared).unlink()
    assert all("is missing" in e.reason for e in ckpts.list())


def test_a_frozen_tensor_holding_nan_flags_every_checkpoint_that_uses_it(tmp_path: Path) -> None:
    model, optimizer = _frozen_net()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    ckpts = torchkeep.Checkpointer(tmp_path)
    for step in range(2):
        with pytest.warns(torchkeep.NonFiniteCheckpointWarning, match="0.weight"):
            ckpts.save(step, model=model, optimizer=optimizer)
    ckpts.close()
    with pytest.warns(torchkeep.NonFiniteCheckpointWarning, match="0.weight"):  # a new process
        torchkeep.Checkpointer(tmp_path).save(2, model=model, optimizer=optimizer)
    assert [e.nonfinite for e in torchkeep.Checkpointer(tmp_path).list()] == [{"tensors": ["0.weight"]}] * 3


def test_every_reader_sees_a_whole_checkpoint_and_none_writes(tmp_path: Path) -> None:
    model, optimizer = _frozen_net()
    ckpts = torchkeep.Checkpointer(tmp_path / "run")
    for step in range(2):
        _train(model, optimizer)
        folder = Path(ckpts.save(step, model=model, optimizer=optimizer))
    ckpts.close()
    before = _tree(tmp_path / "run")
    live = dict(model.state_dict())
    assert_state_equal(torchkeep.load_weights(folder), live)
    fresh = _net()
    assert torchkeep.load_into(fresh, folder).loaded
    assert_state_equal(dict(fresh.state_dict()), live)
    assert not torchkeep.diff(folder, model).changed
    assert {r.name for r in torchkeep.summarize(folder).rows} == set(live)
    out = torchkeep.consolidate(folder, tmp_path / "w.safetensors")
    assert_state_equal(torchkeep.load_weights(out), live)
    for args in (
        ["inspect", str(folder)],
        ["inspect", str(folder), "--stats"],
        ["ls", str(tmp_path / "run"), "--verify"],
        ["verify", str(tmp_path / "run")],
        ["convert", str(folder), str(tmp_path / "c.safetensors")],
    ):
        assert _cli(args) == 0, args
    assert_state_equal(torchkeep.load_weights(tmp_path / "c.safetensors"), live)
    assert _tree(tmp_path / "run") == before  # reading never creates, deletes or changes a thing


def test_export_step_writes_a_standalone_checkpoint(tmp_path: Path) -> None:
    model, optimizer = _frozen_net()
    ckpts = torchkeep.Checkpointer(tmp_path / "run", keep_last=1)
    for step in range(3):
        _train(model, optimizer)
        ckpts.save(step, model=model, optimizer=optimizer)
    ckpts.close()
    out = torchkeep.export_step(tmp_path / "run" / "step-00000002", tmp_path / "elsewhere" / "step-00000002")
    assert sorted(p.name for p in Path(out).iterdir()) == [
        "manifest.json",
        "model.safetensors",
        "state.json",
        "state.safetensors",
    ]
    assert "blobs" not in json.loads((Path(out) / "manifest.json").read_text())
    [entry] = torchkeep.Checkpointer(tmp_path / "elsewhere").list(verify=True)
    assert entry.valid
    fresh, fresh_optimizer = _frozen_net()
    torchkeep.Checkpointer(tmp_path / "elsewhere").restore(model=fresh, optimizer=fresh_optimizer)
    assert_state_equal(dict(fresh.state_dict()), dict(model.state_dict()))
    with pytest.raises(torchkeep.OutputExistsError, match="overwrite=True"):
        torchkeep.export_step(tmp_path / "run", out)
    assert _cli(["export-step", str(tmp_path / "run"), str(out), "--force"]) == 0
    _flip_a_byte_of(tmp_path / "run" / "step-00000002", "4.weight")
    with pytest.raises(torchkeep.CorruptFileError, match="xxh3_128 checksum"):
        torchkeep.export_step(tmp_path / "run" / "step-00000002", tmp_path / "never")
    with pytest.raises(torchkeep.CorruptFileError, match="xxh3_128 checksum"):
        torchkeep.export_step(tmp_path / "run", tmp_path / "never")  # its newest checkpoint
    assert sorted(os.listdir(tmp_path)) == ["elsewhere", "run"]  # nothing written, no leftovers


@pytest.mark.parametrize(
    "ref",
    ["../outside.safetensors", "blobs/../../outside.safetensors", "/etc/passwd", "blobs/a/b.safetensors"],
)
def test_an_index_naming_a_file_outside_the_packs_is_refused(tmp_path: Path, ref: str) -> None:
    model = _net()
    folder = Path(torchkeep.Checkpointer(tmp_path / "run").save(1, model=model))
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    _rewrite_index(folder, lambda index: index.update(packs=dict.fromkeys(index["packs"], ref)))
    assert not torchkeep.Checkpointer(tmp_path / "run").list(verify=True)[0].valid
    with pytest.raises(torchkeep.CorruptFileError, match="invalid pack entry"):
        torchkeep.load_weights(folder)
    assert not blobs.is_pack_ref(ref)


def test_a_checkpointer_used_again_after_another_writer_pruned_reads_the_packs_anew(tmp_path: Path) -> None:
    model, optimizer = _frozen_net()
    first = torchkeep.Checkpointer(tmp_path)
    for step in (0, 1):
        _train(model, optimizer)
        first.save(step, model=model, optimizer=optimizer)
    first.close()
    with torchkeep.Checkpointer(tmp_path, keep_last=1) as second:  # collects what only 0 and 1 used
        _train(model, optimizer)
        second.save(5, model=model, optimizer=optimizer)
    _train(model, optimizer)
    first.save(6, model=model, optimizer=optimizer)  # the same object, taking the lock again
    first.close()
    assert all(e.valid for e in torchkeep.Checkpointer(tmp_path).list(verify=True))
    fresh, _ = _frozen_net()
    torchkeep.Checkpointer(tmp_path).restore(model=fresh, restore_rng=False)
    assert_state_equal(dict(fresh.state_dict()), dict(model.state_dict()))


def test_damage_that_keeps_a_packs_size_is_not_carried_into_new_checkpoints(tmp_path: Path) -> None:
    model, optimizer = _frozen_net()
    with torchkeep.Checkpointer(tmp_path) as first:
        first.save(0, model=model, optimizer=optimizer)
    _flip_a_byte_of(tmp_path / "step-00000000", "0.weight")
    with torchkeep.Checkpointer(tmp_path) as second:
        for step in (1, 2):
            _train(model, optimizer)
            second.save(step, model=model, optimizer=optimizer)
    entries = torchkeep.Checkpointer(tmp_path).list(verify=True)
    assert [(e.step, e.valid) for e in entries] == [(0, False), (1, True), (2, True)]
    fresh, _ = _frozen_net()
    torchkeep.Checkpointer(tmp_path).restore(model=fresh, restore_rng=False)
    assert_state_equal(dict(fresh.state_dict()), dict(model.state_dict()))


def test_an_index_naming_another_tensor_file_is_refused_and_export_writes_nothing(tmp_path: Path) -> None:
    folder = Path(torchkeep.Checkpointer(tmp_path / "run").save(1, model=_net()))
    outside = str(tmp_path / "outside.safetensors")
    _rewrite_index(
        folder, lambda index: index["files"].update({outside: index["files"]["model.safetensors"]})
    )
    assert not torchkeep.Checkpointer(tmp_path / "run").list(verify=True)[0].valid
    with pytest.raises(torchkeep.CorruptFileError, match="names a tensor file"):
        torchkeep.load_weights(folder)
    with pytest.raises(torchkeep.CorruptFileError):
        torchkeep.export_step(folder, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_a_remote_restore_falls_back_past_a_checkpoint_whose_pack_is_gone(tmp_path: Path) -> None:
    import fsspec

    url = f"memory://torchkeep-fallback-{os.getpid()}/run"
    model, optimizer = _frozen_net()
    ckpts = torchkeep.Checkpointer(url)
    for step in (1, 2):
        _train(model, optimizer)
        ckpts.save(step, model=model, optimizer=optimizer)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    ckpts.close()
    fs = fsspec.filesystem("memory")
    index = json.loads(fs.cat_file(f"{url}/step-00000002/tensors.json"))
    digest = index["files"]["model.safetensors"]["tensors"]["4.weight"]
    fs.rm_file(f"{url}/{index['packs'][digest]}")  # step 2's own pack
    _train(model, optimizer)  # the live model moves on; the restore must give step 1
    entries = torchkeep.Checkpointer(url).list(verify=True)
    assert [(e.step, e.valid) for e in entries] == [(1, True), (2, False)]
    assert "is missing" in entries[1].reason
    fresh, _ = _frozen_net()
    info = torchkeep.Checkpointer(url).restore(model=fresh, restore_rng=False)
    assert info is not None
    assert info.step == 1
    for key, value in fresh.state_dict().items():
        if key.startswith("0."):  # the frozen part, shared: step 1's and step 2's alike
            assert torch.equal(value, expected[key])
    fs.rm(url.removeprefix("memory://").split("/")[0], recursive=True)


def test_a_standalone_writer_still_deletes_packs_no_checkpoint_uses(tmp_path: Path) -> None:
    model, optimizer = _frozen_net()
    with torchkeep.Checkpointer(tmp_path) as incremental:
        incremental.save(0, model=model, optimizer=optimizer)
    with torchkeep.Checkpointer(tmp_path, incremental=False, keep_last=1) as standalone:
        for step in (1, 2):
            standalone.save(step, model=model, optimizer=optimizer)
    assert [e.step for e in torchkeep.Checkpointer(tmp_path).list()] == [2]
    assert _packs(tmp_path) == {}


def test_an_unreadable_index_keeps_every_pack(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model, optimizer = _frozen_net()
    ckpts = torchkeep.Checkpointer(tmp_path, keep_last=1)
    ckpts.save(0, model=model, optimizer=optimizer)
    (tmp_path / "step-00000000" / "tensors.json").write_text("{damaged")
    ckpts.close()
    before = set(_packs(tmp_path))
    with torchkeep.Checkpointer(tmp_path) as again, caplog.at_level("WARNING", logger="torchkeep"):
        _train(model, optimizer)
        again.save(1, model=model, optimizer=optimizer)
    assert before <= set(_packs(tmp_path))  # what the damaged checkpoint used is unknown: kept
    assert "no pack is deleted" in caplog.text


def test_load_checkpoint_restores_a_checkpoint_folder(tmp_path: Path) -> None:
    model, optimizer = _frozen_net()
    _train(model, optimizer)
    folder = torchkeep.Checkpointer(tmp_path).save(3, model=model, optimizer=optimizer, epoch=2)
    fresh, fresh_optimizer = _frozen_net()
    info = torchkeep.load_checkpoint(folder, model=fresh, optimizer=fresh_optimizer)
    assert (info.step, info.epoch) == (3, 2)
    assert_state_equal(dict(fresh.state_dict()), dict(model.state_dict()))
    assert str(fresh_optimizer.state_dict()) == str(optimizer.state_dict())


def test_verifying_reads_only_what_a_checkpoint_uses_of_a_large_pack(tmp_path: Path) -> None:
    model = _net()
    model[4].bias.requires_grad_(False)  # the one tensor later checkpoints share with the first
    ckpts = torchkeep.Checkpointer(tmp_path)
    for step in (0, 1):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name != "4.bias":
                    p.add_(1.0)
        ckpts.save(step, model=model)
    first = tensor_data(tmp_path / "step-00000000")
    index = json.loads((tmp_path / "step-00000001" / "tensors.json").read_text())
    assert sorted(set(index["packs"].values())) == sorted(
        {f"blobs/{first.name}", f"blobs/{tensor_data(tmp_path / 'step-00000001').name}"}
    )
    _flip_a_byte_of(tmp_path / "step-00000000", "0.weight")  # not used by step 1
    assert [e.valid for e in ckpts.list(verify=True)] == [False, True]
    _flip_a_byte_of(tmp_path / "step-00000000", "4.bias")  # used by step 1 too
    checked = ckpts.list(verify=True)
    assert [e.valid for e in checked] == [False, False]
    assert "xxh3_128 checksum" in checked[1].reason
