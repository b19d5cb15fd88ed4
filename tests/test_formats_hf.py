"""Reading Hugging Face model folders and sharded checkpoints (``torchkeep.formats.hf``).

Folders are made by real ``transformers`` ``save_pretrained`` (tiny random-init configs, no
network); ``.bin`` shards, which transformers 5 no longer writes, are made the way transformers 4
wrote them (``torch.save`` per shard + ``pytorch_model.bin.index.json``). Hostile indexes are
edited copies of real ones.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import torchkeep
from test_cli import run_cli
from torchkeep.formats.hf import find_hf_weights, read_index

transformers = pytest.importorskip("transformers")


def gpt2() -> Any:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def bert() -> Any:
    torch.manual_seed(1)
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100
    )
    return transformers.BertModel(config)


@pytest.fixture(scope="module")
def model() -> Any:
    return gpt2()


@pytest.fixture(scope="module")
def sharded(model: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("gpt2-sharded")
    model.save_pretrained(folder, max_shard_size="50KB")
    (folder / "README.md").write_text("# tiny gpt2\n")
    (folder / "tokenizer_config.json").write_text("{}")
    return folder


@pytest.fixture(scope="module")
def single(model: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("gpt2-single")
    model.save_pretrained(folder)
    return folder


def write_bin_shards(state: dict[str, torch.Tensor], folder: Path, per_shard: int) -> Path:
    """``.bin`` shards + index as transformers 4 wrote them."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(state)
    groups = [keys[i : i + per_shard] for i in range(0, len(keys), per_shard)]
    weight_map = {}
    for k, group in enumerate(groups, start=1):
        name = f"pytorch_model-{k:05d}-of-{len(groups):05d}.bin"
        torch.save({key: state[key].clone() for key in group}, folder / name)
        weight_map.update(dict.fromkeys(group, name))
    total = sum(t.nbytes for t in state.values())
    index = folder / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return index


def reference(model: Any) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def copy_of(folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(folder, out)
    return out


def edit_index(folder: Path, change: Any) -> Path:
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data = change(data)
    index.write_text(json.dumps(data))
    return index


# --- reading every layout ---------------------------------------------------------------------


def test_sharded_safetensors_folder_and_index_load(sharded: Path, model: Any) -> None:
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) == 3
    assert_same(torchkeep.load_weights(sharded), reference(model))
    assert_same(torchkeep.load_weights(sharded / "model.safetensors.index.json"), reference(model))


def test_single_file_folder_loads(single: Path, model: Any) -> None:
    assert_same(torchkeep.load_weights(single), reference(model))


def test_bin_shards_load_and_transformers_agrees(tmp_path: Path) -> None:
    model = bert()
    index = write_bin_shards(model.state_dict(), tmp_path / "bert", per_shard=10)
    transformers.BertConfig.save_pretrained(model.config, tmp_path / "bert")
    assert len(list((tmp_path / "bert").glob("pytorch_model-*.bin"))) > 2
    assert_same(torchkeep.load_weights(index), model.state_dict())
    assert_same(torchkeep.load_weights(tmp_path / "bert"), model.state_dict())
    theirs = transformers.BertModel.from_pretrained(tmp_path / "bert")
    assert_same(torchkeep.load_weights(tmp_path / "bert"), theirs.state_dict())


def test_single_bin_folder_loads(tmp_path: Path) -> None:
    state = {"a": torch.arange(4.0), "b": torch.ones(2, dtype=torch.int64)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert_same(torchkeep.load_weights(tmp_path), state)


def test_safetensors_preferred_over_bin_with_a_log_line(
    sharded: Path, tmp_path: Path, model: Any, caplog: pytest.LogCaptureFixture
) -> None:
    folder = copy_of(sharded, tmp_path)
    torch.save({"other": torch.zeros(1)}, folder / "pytorch_model.bin")
    with caplog.at_level(logging.INFO, logger="torchkeep.formats.hf"):
        state = torchkeep.load_weights(folder)
    assert_same(state, reference(model))
    assert "both safetensors and .bin" in caplog.text


def test_one_file_before_an_index_as_transformers_does(sharded: Path, tmp_path: Path) -> None:
    folder = copy_of(sharded, tmp_path)
    save_file({"x": torch.ones(3)}, folder / "model.safetensors")
    assert set(torchkeep.load_weights(folder)) == {"x"}


def test_adapter_folder_finds_adapter_model(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    state = {"base_model.model.q.lora_A.weight": torch.randn(2, 4)}
    save_file(state, tmp_path / "adapter_model.safetensors")
    assert_same(torchkeep.load_weights(tmp_path), state)


def test_load_into_summarize_diff_on_folders(sharded: Path, single: Path, model: Any) -> None:
    fresh = gpt2()
    torch.nn.init.zeros_(fresh.transformer.wte.weight)
    report = torchkeep.load_into(fresh, sharded)
    assert report.tied == {"lm_head.weight": "transformer.wte.weight"}
    assert torch.equal(fresh.lm_head.weight, model.transformer.wte.weight)
    summary = torchkeep.summarize(sharded)
    assert len(summary.rows) == 28
    assert summary.file_format == "safetensors, 3 shards (model.safetensors.index.json)"
    assert summary.metadata["total_size"] == str(summary.total_bytes)
    assert summary.file_size == sum(p.stat().st_size for p in sharded.glob("model-*.safetensors"))
    assert torchkeep.summarize(single).file_format == "safetensors"
    assert torchkeep.diff(sharded, single).identical
    assert torchkeep.diff(sharded / "model.safetensors.index.json", single / "model.safetensors").identical


def test_limits_apply_to_the_total_of_all_shards(sharded: Path, tmp_path: Path) -> None:
    total = sum(t.nbytes for t in torchkeep.load_weights(sharded).values())
    biggest = max(p.stat().st_size for p in sharded.glob("model-*.safetensors"))
    with pytest.raises(torchkeep.LimitExceededError, match="max_bytes") as info:
        torchkeep.load_weights(sharded, limits=torchkeep.Limits(max_bytes=biggest))
    assert info.value.value == total
    model = bert()
    index = write_bin_shards(model.state_dict(), tmp_path / "bert", per_shard=10)
    bin_total = sum(t.nbytes for t in model.state_dict().values())
    with pytest.raises(torchkeep.LimitExceededError, match="max_bytes"):
        torchkeep.load_weights(index, limits=torchkeep.Limits(max_bytes=bin_total - 1))
    assert len(torchkeep.load_weights(index, limits=torchkeep.Limits(max_bytes=bin_total))) == len(
        model.state_dict()
    )


def test_hub_cache_links_into_blobs_are_followed(sharded: Path, tmp_path: Path, model: Any) -> None:
    repo = tmp_path / "models--tiny--gpt2"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for number, file in enumerate(sorted(sharded.iterdir())):
        shutil.copy(file, repo / "blobs" / f"blob{number}")
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", f"blob{number}"))
    assert_same(torchkeep.load_weights(snapshot), reference(model))


def test_a_folder_without_weights_is_still_a_directory_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert find_hf_weights(tmp_path) is None
    with pytest.raises(torchkeep.PathIsDirectoryError):
        torchkeep.load_weights(tmp_path)


# --- hostile and broken indexes -------------------------------------------------------------


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/x.safetensors", "..", ""])
def test_shard_names_that_leave_the_folder_are_refused(sharded: Path, tmp_path: Path, name: str) -> None:
    folder = copy_of(sharded, tmp_path)
    save_file({"x": torch.ones(1)}, tmp_path / "outside.safetensors")

    def change(data: dict[str, Any]) -> dict[str, Any]:
        data["weight_map"]["transformer.wte.weight"] = name
        return data

    index = edit_index(folder, change)
    with pytest.raises(torchkeep.UnsafeFileError, match="not a plain file name") as info:
        torchkeep.load_weights(index)
    assert repr(name) in str(info.value)
    with pytest.raises(torchkeep.UnsafeFileError):
        torchkeep.summarize(folder)


def test_a_shard_linked_outside_the_folder_is_refused(sharded: Path, tmp_path: Path) -> None:
    folder = copy_of(sharded, tmp_path)
    shard = folder / "model-00002-of-00003.safetensors"
    shard.rename(tmp_path / "elsewhere.safetensors")
    shard.symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(torchkeep.UnsafeFileError, match="outside its folder"):
        torchkeep.load_weights(folder)


def test_a_missing_shard_is_named(sharded: Path, tmp_path: Path) -> None:
    folder = copy_of(sharded, tmp_path)
    (folder / "model-00003-of-00003.safetensors").unlink()
    with pytest.raises(torchkeep.CorruptFileError, match=r"00003-of-00003.safetensors.*missing") as info:
        torchkeep.load_weights(folder)
    assert info.value.member == "model-00003-of-00003.safetensors"


def test_a_key_in_the_wrong_shard(sharded: Path, tmp_path: Path) -> None:
    folder = copy_of(sharded, tmp_path)

    def change(data: dict[str, Any]) -> dict[str, Any]:
        data["weight_map"]["transformer.wte.weight"] = "model-00003-of-00003.safetensors"
        return data

    edit_index(folder, change)
    with pytest.raises(torchkeep.CorruptFileError, match=r"transformer.wte.weight") as info:
        torchkeep.load_weights(folder)
    assert "model-0000" in str(info.value)


def test_a_shard_with_tensors_the_index_does_not_list(sharded: Path, tmp_path: Path) -> None:
    folder = copy_of(sharded, tmp_path)
    shard = folder / "model-00001-of-00003.safetensors"
    tensors = torchkeep.load_weights(shard)
    save_file({**{k: v.clone() for k, v in tensors.items()}, "smuggled": torch.ones(2)}, shard)
    with pytest.raises(torchkeep.CorruptFileError, match="'smuggled', which the index does not list"):
        torchkeep.load_weights(folder)


def test_a_bin_shard_with_extra_tensors(tmp_path: Path) -> None:
    state = {"a": torch.ones(2), "b": torch.zeros(3)}
    index = write_bin_shards(state, tmp_path, per_shard=1)
    torch.save({"b": torch.zeros(3), "extra": torch.ones(1)}, tmp_path / "pytorch_model-00002-of-00002.bin")
    with pytest.raises(torchkeep.CorruptFileError, match=r"'extra'.*does not list"):
        torchkeep.load_weights(index)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("[1, 2]", "JSON list, not an object"),
        ('{"metadata": {}}', "no 'weight_map'"),
        ('{"weight_map": ["a"]}', "'weight_map' that is a list"),
        ('{"weight_map": {}}', "lists no tensors"),
        ('{"weight_map": {"a": 3}}', "maps 'a' to a int"),
        ('{"weight_map": {"a": "s.safetensors", "a": "t.safetensors"}}', "appears twice"),
        ('{"metadata": {"total_size": "big"}, "weight_map": {"a": "s"}}', "total_size"),
        ('{"metadata": [], "weight_map": {"a": "s"}}', "'metadata' is a list"),
        ("{not json", "not valid JSON"),
    ],
)
def test_malformed_indexes_are_corrupt(tmp_path: Path, content: str, match: str) -> None:
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(content)
    with pytest.raises(torchkeep.CorruptFileError, match=match):
        torchkeep.load_weights(index)
    with pytest.raises(torchkeep.CorruptFileError):
        torchkeep.load_weights(tmp_path)


class Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo owned > /dev/null",))


def test_a_shard_that_is_a_pickle_with_a_payload_is_refused_by_the_shard_reader(
    sharded: Path, tmp_path: Path
) -> None:
    folder = copy_of(sharded, tmp_path)
    shard = folder / "model-00002-of-00003.safetensors"
    keys = read_index(folder / "model.safetensors.index.json").keys_in(shard)
    torch.save({**{k: torch.ones(1) for k in keys}, "hook": Payload()}, shard)
    with pytest.raises(torchkeep.UnsafeFileError, match=r"posix.system") as info:
        torchkeep.load_weights(folder)
    assert info.value.path == shard
    shutil.copy(sharded / shard.name, shard)
    raw = folder / "model-00003-of-00003.safetensors"
    raw.write_bytes(pickle.dumps([Payload()], protocol=2))
    with pytest.raises(torchkeep.UnsafeFileError) as info:
        torchkeep.load_weights(folder)
    assert info.value.path == raw


# --- the CLI on folders -----------------------------------------------------------------------


def test_cli_inspect_diff_convert_on_folders(
    sharded: Path, single: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(["inspect", str(sharded), "--limit", "2"], capsys)
    assert code == 0
    assert "3 shards" in out
    assert "28 tensors" in out
    code, out, _ = run_cli(["diff", str(sharded), str(single / "model.safetensors")], capsys)
    assert code == 0
    assert "28 equal, 0 changed" in out
    code, out, _ = run_cli(
        ["convert", str(sharded / "model.safetensors.index.json"), str(tmp_path / "one.pt")], capsys
    )
    assert code == 0
    assert "wrote 28 tensors" in out
    assert torchkeep.diff(tmp_path / "one.pt", sharded).identical


def test_cli_scan_skips_config_and_readme(sharded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["scan", str(sharded)], capsys)
    assert code == 0
    assert out.count("SAFE ") == 3
    assert "ERROR" not in out
    for name in ("config.json", "README.md", "tokenizer_config.json", "model.safetensors.index.json"):
        assert f"SKIPPED {sharded / name}" in out
    code, out, _ = run_cli(["scan", "--json", str(sharded)], capsys)
    verdicts = {Path(r["path"]).name: r["verdict"] for r in json.loads(out)}
    assert verdicts["config.json"] == "SKIPPED"
    assert verdicts["model-00001-of-00003.safetensors"] == "SAFE"


def test_cli_scan_still_scans_a_pickle_named_like_a_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "config.json").write_bytes(pickle.dumps([Payload()], protocol=2))
    (tmp_path / "notes.txt").write_text("hello")
    code, out, _ = run_cli(["scan", str(tmp_path)], capsys)
    assert code == 1
    assert "UNSAFE" in out
    assert "posix.system" in out
    assert f"SKIPPED {tmp_path / 'notes.txt'}" in out
    (tmp_path / "config.json").unlink()
    code, out, _ = run_cli(["scan", str(tmp_path)], capsys)
    assert code == 2
    assert "no model files found" in out
