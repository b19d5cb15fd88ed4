"""Writing Hugging Face sharded checkpoints (``torchkeep.shards``): layout, sizes, tied weights, crashes.

The crash tests run a real process (``_shard_worker.py``) that stops for good at a named step of
the save (a log record), are killed there with SIGKILL, and then check what a reader finds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import torchkeep
from _shard_worker import state
from torchkeep.formats.hf import ENTRY_POINTS, find_hf_weights
from torchkeep.shards import parse_shard_size, plan_shards

WORKER = Path(__file__).with_name("_shard_worker.py")


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key


# --- sizes and layout -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1234, 1234),
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("50KB", 50_000),
        ("50kb", 50_000),
        ("2GiB", 2 * 2**30),
        ("512MiB", 512 * 2**20),
        ("1.5GB", 1_500_000_000),
        ("100", 100),
        ("7B", 7),
    ],
)
def test_parse_shard_size(value: int | str, expected: int) -> None:
    assert parse_shard_size(value) == expected


@pytest.mark.parametrize("value", ["5 gigs", "GB", "", "-1KB", 0, -5, True, 1.5])
def test_bad_shard_sizes_are_refused(value: Any, tmp_path: Path) -> None:
    with pytest.raises(torchkeep.InvalidShardSizeError, match="max_shard_size") as info:
        torchkeep.save_weights({"a": torch.ones(1)}, tmp_path / "out", max_shard_size=value)
    assert isinstance(info.value, ValueError)
    assert not (tmp_path / "out").exists()


def test_plan_packs_in_order_and_a_big_tensor_gets_its_own_shard() -> None:
    kept = {"a": torch.zeros(10), "b": torch.zeros(10), "big": torch.zeros(100), "c": torch.zeros(5)}
    assert plan_shards(kept, 80) == [["a", "b"], ["big"], ["c"]]
    assert plan_shards(kept, 10**6) == [["a", "b", "big", "c"]]


def test_shards_layout_index_and_round_trip(tmp_path: Path) -> None:
    weights = state(0, 5)
    written = torchkeep.save_weights(weights, tmp_path / "out", max_shard_size="50KB", metadata={"run": "x"})
    assert written == tmp_path / "out"
    names = sorted(p.name for p in written.iterdir())
    assert names == [f"model-{k:05d}-of-00005.safetensors" for k in range(1, 6)] + [
        "model.safetensors.index.json"
    ]
    index = json.loads((written / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in weights.values())
    assert index["weight_map"]["layer3.weight"] == "model-00004-of-00005.safetensors"
    # every shard is a plain safetensors file that other tools read
    assert_same(
        load_file(written / "model-00002-of-00005.safetensors"), {"layer1.weight": weights["layer1.weight"]}
    )
    assert torchkeep.read_metadata(written / "model-00001-of-00005.safetensors")["run"] == "x"
    assert_same(torchkeep.load_weights(written), weights)


def test_torch_shards_by_index_name(tmp_path: Path) -> None:
    weights = state(1, 3)
    folder = torchkeep.save_weights(weights, tmp_path / "pytorch_model.bin.index.json", max_shard_size="50KB")
    assert folder == tmp_path
    assert sorted(p.name for p in tmp_path.glob("pytorch_model-*.bin")) == [
        f"pytorch_model-{k:05d}-of-00003.bin" for k in range(1, 4)
    ]
    shard = torch.load(tmp_path / "pytorch_model-00003-of-00003.bin", weights_only=True)
    assert_same(shard, {"layer2.weight": weights["layer2.weight"]})
    assert_same(torchkeep.load_weights(tmp_path), weights)


def test_everything_in_one_shard_is_one_file_without_index(tmp_path: Path) -> None:
    weights = state(2, 3)
    torchkeep.save_weights(weights, tmp_path, max_shard_size="5GB")
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    assert_same(torchkeep.load_weights(tmp_path), weights)


def test_the_target_name_picks_folder_and_format(tmp_path: Path) -> None:
    weights = state(3, 2)
    assert (
        torchkeep.save_weights(weights, tmp_path / "run-v1.5", max_shard_size="50KB") == tmp_path / "run-v1.5"
    )
    assert len(list((tmp_path / "run-v1.5").glob("model-*-of-00002.safetensors"))) == 2
    torchkeep.save_weights(weights, tmp_path / "bin" / "pytorch_model.bin", max_shard_size="50KB")
    assert len(list((tmp_path / "bin").glob("pytorch_model-*-of-00002.bin"))) == 2
    assert_same(torchkeep.load_weights(tmp_path / "bin"), weights)


def test_tied_weights_are_stored_once_and_come_back_tied(tmp_path: Path) -> None:
    shared = torch.randn(100, 100)
    weights = {"embed.weight": shared, "mid": torch.randn(100, 100), "head.weight": shared}
    torchkeep.save_weights(weights, tmp_path / "st", max_shard_size="50KB")
    index = json.loads((tmp_path / "st" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {"embed.weight", "mid"}
    assert index["metadata"]["total_size"] == 2 * shared.nbytes
    back = torchkeep.load_weights(tmp_path / "st")
    assert_same(back, weights)
    assert back["head.weight"] is back["embed.weight"]
    torchkeep.save_weights(weights, tmp_path / "bin" / "pytorch_model.bin.index.json", max_shard_size="50KB")
    back = torchkeep.load_weights(tmp_path / "bin")
    assert_same(back, weights)
    assert (
        back["head.weight"].untyped_storage().data_ptr() == back["embed.weight"].untyped_storage().data_ptr()
    )


def test_a_new_save_replaces_the_previous_one_whatever_its_layout(tmp_path: Path) -> None:
    steps: list[tuple[str, int, str]] = [
        ("", 4, "model-00001-of-00004.safetensors"),
        ("", 4, "model-b-00001-of-00004.safetensors"),  # the live names are never overwritten
        ("", 4, "model-00001-of-00004.safetensors"),
        ("", 2, "model-00001-of-00002.safetensors"),
        ("pytorch_model.bin.index.json", 3, "pytorch_model-00001-of-00003.bin"),
        ("", 1, "model.safetensors"),
        ("pytorch_model.bin.index.json", 1, "pytorch_model.bin"),
        ("", 3, "model-00001-of-00003.safetensors"),
    ]
    (tmp_path / "config.json").write_text("{}")
    for seed, (name, count, first) in enumerate(steps):
        weights = state(seed, count)
        torchkeep.save_weights(weights, tmp_path / name if name else tmp_path, max_shard_size="50KB")
        files = sorted(p.name for p in tmp_path.iterdir())
        assert first in files
        found = find_hf_weights(tmp_path)
        assert found is not None
        on_disk = {*found.files, *([found.index.path] if found.index else [])}
        assert set(files) == {p.name for p in on_disk} | {"config.json"}, files
        assert_same(torchkeep.load_weights(tmp_path), weights)


# --- crash safety -----------------------------------------------------------------------------


def kill_at(target: Path, seed: int, count: int, stop_at: str) -> None:
    """Run a save in a real process and SIGKILL it when it reaches ``stop_at``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(WORKER.parent), *sys.path])}
    with subprocess.Popen(
        [sys.executable, str(WORKER), str(target), str(seed), str(count), stop_at],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    ) as worker:
        assert worker.stdout is not None
        line = worker.stdout.readline()
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
    assert line == "reached\n", f"the worker never reached {stop_at!r}"
    assert worker.returncode == -signal.SIGKILL


def no_index_points_at_a_missing_shard(folder: Path) -> None:
    for name in ENTRY_POINTS:
        if name.endswith(".index.json") and (folder / name).is_file():
            index = json.loads((folder / name).read_text())
            for shard in set(index["weight_map"].values()):
                assert (folder / shard).is_file(), (name, shard)


@pytest.mark.parametrize(
    ("old_count", "new_target", "new_count", "stop_at"),
    [
        (4, "", 4, "shard 3 of 4"),  # the same count: the new shards must not overwrite the live ones
        (4, "", 6, "shard 5 of 6"),
        (3, "", 1, "shard 1 of 1"),
        (1, "", 4, "shard 2 of 4"),
        (4, "pytorch_model.bin.index.json", 2, "shard 2 of 2"),
        (4, "", 4, "index:"),
    ],
)
def test_a_save_killed_midway_leaves_the_previous_save(
    tmp_path: Path, old_count: int, new_target: str, new_count: int, stop_at: str
) -> None:
    old = state(10, old_count)
    torchkeep.save_weights(old, tmp_path, max_shard_size="50KB")
    kill_at(tmp_path / new_target if new_target else tmp_path, 11, new_count, stop_at)
    no_index_points_at_a_missing_shard(tmp_path)
    assert_same(torchkeep.load_weights(tmp_path), old)
    # the next save completes and cleans up what the killed one left
    new = state(12, new_count)
    torchkeep.save_weights(new, tmp_path / new_target if new_target else tmp_path, max_shard_size="50KB")
    assert_same(torchkeep.load_weights(tmp_path), new)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    ("new_target", "new_count", "found"),
    [
        ("", 4, "new"),
        ("", 2, "new"),
        # .bin weights come after safetensors for readers: the old save is found until it is removed
        ("pytorch_model.bin.index.json", 3, "old"),
    ],
)
def test_a_save_killed_while_removing_the_previous_one_leaves_a_whole_save(
    tmp_path: Path, new_target: str, new_count: int, found: str
) -> None:
    old, new = state(20, 4), state(21, new_count)
    torchkeep.save_weights(old, tmp_path, max_shard_size="50KB")
    kill_at(tmp_path / new_target if new_target else tmp_path, 21, new_count, "removing the previous save")
    no_index_points_at_a_missing_shard(tmp_path)
    assert_same(torchkeep.load_weights(tmp_path), new if found == "new" else old)


# --- interop with transformers ----------------------------------------------------------------


@pytest.mark.parametrize("index_name", ["", "pytorch_model.bin.index.json"])
@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_transformers_reads_our_shards(tmp_path: Path, family: str, index_name: str) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    if family == "gpt2":
        config: Any = transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=16, bos_token_id=0, eos_token_id=0
        )
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100
        )
        model = transformers.BertForMaskedLM(config)
    torchkeep.save_weights(model, tmp_path / index_name if index_name else tmp_path, max_shard_size="50KB")
    model.config.save_pretrained(tmp_path)
    found = find_hf_weights(tmp_path)
    assert found is not None
    assert found.index is not None
    assert len(found.files) > 2
    theirs = type(model).from_pretrained(tmp_path)
    assert_same(theirs.state_dict(), model.state_dict())
    ours = torchkeep.load_weights(tmp_path)
    assert_same(ours, {k: v for k, v in model.state_dict().items() if k in ours})
    fresh = type(model)(config)
    report = torchkeep.load_into(fresh, tmp_path)
    assert report.ok
    assert_same(fresh.state_dict(), model.state_dict())


def test_cli_convert_between_one_file_and_shards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from test_cli import run_cli

    weights = state(30, 4)
    torchkeep.save_weights(weights, tmp_path / "model.safetensors")
    code, out, _ = run_cli(
        ["convert", str(tmp_path / "model.safetensors"), str(tmp_path / "out"), "--max-shard-size", "50KB"],
        capsys,
    )
    assert code == 0
    assert "wrote 4 tensors" in out
    assert len(list((tmp_path / "out").glob("model-*-of-00004.safetensors"))) == 4
    code, _, _ = run_cli(["convert", str(tmp_path / "out"), str(tmp_path / "back.safetensors")], capsys)
    assert code == 0
    assert_same(torchkeep.load_weights(tmp_path / "back.safetensors"), weights)
    code, _, _ = run_cli(
        [
            "convert",
            str(tmp_path / "out" / "model.safetensors.index.json"),
            str(tmp_path / "bin" / "pytorch_model.bin.index.json"),
            "--max-shard-size",
            "80KB",
        ],
        capsys,
    )
    assert code == 0
    assert len(list((tmp_path / "bin").glob("pytorch_model-*-of-00002.bin"))) == 2
    assert_same(torchkeep.load_weights(tmp_path / "bin"), weights)
    code, _, _ = run_cli(
        ["convert", str(tmp_path / "model.safetensors"), str(tmp_path / "x"), "--max-shard-size", "lots"],
        capsys,
    )
    assert code != 0
