"""torchkeep.stats: per-tensor statistics against torch's own, read in chunks; relative changes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep
from torchkeep.cli import main
from torchkeep.stats import TensorStats, chunks, relative_changes, tensor_stats


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code in (0, None), capsys.readouterr().err
    return capsys.readouterr().out


CHUNK = 1000  # elements: every tensor below but the small ones spans several chunks


def _expected(t: torch.Tensor) -> dict[str, object]:
    """What torch says about ``t``: min / max / mean / std over the finite values, NaN / Inf counts."""
    x = t.double() if not t.dtype.is_complex else t
    finite = x[torch.isfinite(x)] if t.is_floating_point() else x
    return {
        "numel": t.numel(),
        "nan": int(torch.isnan(x).sum()) if t.is_floating_point() else 0,
        "inf": int(torch.isinf(x).sum()) if t.is_floating_point() else 0,
        "min": float(finite.min()) if finite.numel() else None,
        "max": float(finite.max()) if finite.numel() else None,
        "mean": float(finite.mean()) if finite.numel() else None,
        "std": float(finite.std()) if finite.numel() > 1 else None,
    }


def _assert_matches(row: TensorStats, t: torch.Tensor) -> None:
    want = _expected(t)
    assert row.numel == want["numel"], row.name
    assert (row.nan, row.inf) == (want["nan"], want["inf"]), row.name
    for field in ("min", "max"):
        assert row.__getattribute__(field) == want[field], (row.name, field)
    for field in ("mean", "std"):
        got, expected = row.__getattribute__(field), want[field]
        if expected is None:
            assert got is None, (row.name, field)
        else:
            assert got == pytest.approx(expected, rel=1e-9, abs=1e-12), (row.name, field)


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    poisoned = torch.randn(3000, 7, generator=g)
    poisoned[5, 3] = float("nan")
    poisoned[7, 1] = float("inf")
    poisoned[2999, 6] = float("-inf")
    wide_rows = torch.randn(2, 5000, generator=g) * 3 + 10  # one row is larger than a chunk
    return {
        "poisoned": poisoned,
        "wide_rows": wide_rows,
        "half": (torch.randn(4000, generator=g) * 100).half(),
        "bf16": torch.randn(2500, generator=g).bfloat16(),
        "ints": torch.randint(-(2**40), 2**40, (3001,), generator=g),
        "small_ints": torch.arange(-5, 20, dtype=torch.int32),
        "flags": torch.rand(1500, generator=g) > 0.3,
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 4),
        "all_nan": torch.full((10,), float("nan")),
    }


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_stats_match_torch_including_nan_inf_and_tensors_bigger_than_a_chunk(
    tmp_path: Path, suffix: str
) -> None:
    state = _state()
    path = tmp_path / f"w{suffix}"
    torchkeep.save_weights(state, path)
    report = tensor_stats(path, chunk=CHUNK)
    rows = {r.name: r for r in report.rows}
    assert set(rows) == set(state)
    for name, t in state.items():
        _assert_matches(rows[name], t)
    assert rows["poisoned"].nan == 1
    assert rows["poisoned"].inf == 2
    assert rows["all_nan"].nan == 10
    assert rows["all_nan"].mean is None
    assert rows["all_nan"].min is None
    assert isinstance(rows["ints"].min, int)
    assert rows["ints"].min == int(state["ints"].min())
    assert (rows["flags"].min, rows["flags"].max) == (0, 1)
    assert rows["scalar"].std is None
    assert rows["scalar"].mean == 3.25
    assert [r.name for r in report.nonfinite] == [
        r.name for r in report.rows if r.name in ("poisoned", "all_nan")
    ]
    # the same numbers whatever the chunk size: the chunks are combined exactly (up to rounding)
    whole = {r.name: r for r in tensor_stats(path, chunk=1 << 24).rows}
    for name in state:
        assert whole[name].mean == pytest.approx(rows[name].mean, rel=1e-12, abs=1e-12)
        assert (whole[name].min, whole[name].max, whole[name].nan) == (
            rows[name].min,
            rows[name].max,
            rows[name].nan,
        )


def test_float64_accumulation_beats_the_tensors_own_precision(tmp_path: Path) -> None:
    # 1e6 float16 values of 1000.5: a float16 running sum would stall; float64 gets the mean exactly
    t = torch.full((1_000_000,), 1000.5, dtype=torch.float16)
    path = tmp_path / "h.safetensors"
    torchkeep.save_weights({"h": t}, path)
    row = tensor_stats(path, chunk=4096).rows[0]
    assert row.mean == float(t[0])
    assert row.std == 0.0


def test_chunks_cover_every_element_once_for_non_contiguous_views() -> None:
    base = torch.arange(6 * 7 * 11, dtype=torch.float64).reshape(6, 7, 11)
    view = base.transpose(0, 2)[:, 1:, ::2]
    parts = list(chunks(view, 5))
    assert all(p.numel() <= 11 for p in parts)  # at most the limit, or one innermost row
    assert sorted(torch.cat([p.reshape(-1) for p in parts]).tolist()) == sorted(view.reshape(-1).tolist())


def test_non_contiguous_and_tied_tensors_of_a_torch_save_file(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    big = torch.randn(300, 40, generator=g)
    path = tmp_path / "views.pt"
    torch.save({"transposed": big.t(), "same": big, "again": big}, path)
    rows = {r.name: r for r in tensor_stats(path, chunk=CHUNK).rows}
    _assert_matches(rows["transposed"], big.t())
    _assert_matches(rows["same"], big)
    assert rows["again"].tied_to == "same"
    assert rows["again"].mean == rows["same"].mean


def test_checkpoint_folder_run_folder_and_hf_folder(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.BatchNorm1d(30), nn.Linear(30, 3))
    ckpts = torchkeep.Checkpointer(tmp_path / "run")
    ckpts.save(1, model=model)
    with torch.no_grad():
        model[0].weight.mul_(2)
    ckpts.save(2, model=model)
    state = model.state_dict()
    for source in (tmp_path / "run", tmp_path / "run" / "step-00000002"):
        report = tensor_stats(source, chunk=100)
        assert report.file_format == "torchkeep checkpoint step-00000002"
        rows = {r.name: r for r in report.rows}
        assert set(rows) == set(state)
        for name, t in state.items():
            _assert_matches(rows[name], t)
    folder = tmp_path / "hf"
    torchkeep.save_weights(model, folder, max_shard_size=2000)  # a Hugging Face folder of shards
    assert len(list(folder.glob("*.safetensors"))) > 1
    rows = {r.name: r for r in tensor_stats(folder, chunk=100).rows}
    assert set(rows) == set(state)
    _assert_matches(rows["0.weight"], state["0.weight"])


def test_models_and_state_dicts() -> None:
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    report = tensor_stats(model)
    assert report.source == "Linear"
    _assert_matches(report.rows[0], model.weight.detach())
    assert tensor_stats(dict(model.state_dict())).source == "state dict"
    with pytest.raises(ValueError, match="chunk"):
        tensor_stats(model, chunk=0)


def test_inspect_stats_plain_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = _state()
    path = tmp_path / "w.safetensors"
    torchkeep.save_weights(state, path)
    out = _cli(["inspect", str(path), "--stats"], capsys)
    lines = out.splitlines()
    assert "\x1b[" not in out
    assert "│" not in out
    assert lines[1].split() == ["name", "dtype", "shape", "min", "max", "mean", "std", "nan", "inf", "note"]
    poisoned = next(line for line in lines if line.startswith("poisoned "))
    assert poisoned.split()[-2:] == ["1", "2"]
    assert lines[-1].endswith("2 hold NaN/Inf: poisoned, all_nan")
    data = json.loads(_cli(["inspect", str(path), "--stats", "--json"], capsys))
    by_name = {t["name"]: t for t in data["tensors"]}
    assert by_name["poisoned"]["nan"] == 1
    assert by_name["poisoned"]["inf"] == 2
    assert by_name["poisoned"]["mean"] == pytest.approx(_expected(state["poisoned"])["mean"], rel=1e-9)
    assert data["totals"]["nonfinite_tensors"] == 2
    assert "more (pass --limit 10 to see all)" in _cli(
        ["inspect", str(path), "--stats", "--limit", "2"], capsys
    )


def test_relative_changes_against_torch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    before = nn.Sequential(nn.Linear(50, 40), nn.BatchNorm1d(40), nn.Linear(40, 10))
    a = {k: v.clone() for k, v in before.state_dict().items()}
    b = {k: v.clone() for k, v in a.items()}
    b["2.weight"] += 0.01 * torch.randn_like(b["2.weight"])  # fine-tuned
    b["1.num_batches_tracked"] += 5
    b["2.bias"] = torch.zeros(3)  # a new head of another size
    a["0.bias"] = torch.zeros(40)
    b["0.bias"] = torch.full((40,), 0.5)  # moved away from all zeros
    del b["1.running_var"]
    b["extra.weight"] = torch.ones(2)
    torchkeep.save_weights(a, tmp_path / "a.pt")
    torchkeep.save_weights(b, tmp_path / "b.safetensors")
    changes = relative_changes(tmp_path / "a.pt", tmp_path / "b.safetensors", chunk=97)
    by_key = {c.key: c for c in changes}
    assert [c.key for c in changes] == [*a, "extra.weight"]  # A's order, then what only B has
    want = float((b["2.weight"].double() - a["2.weight"].double()).norm() / a["2.weight"].double().norm())
    assert by_key["2.weight"].status == "changed"
    assert by_key["2.weight"].relative == pytest.approx(want, rel=1e-12)
    assert by_key["0.weight"].status == "unchanged"
    assert by_key["0.weight"].relative == 0.0
    assert by_key["1.num_batches_tracked"].status == "not_float"
    assert by_key["2.bias"].status == "shape"
    assert by_key["0.bias"].status == "from_zero"
    assert by_key["0.bias"].norm_diff == pytest.approx(math.sqrt(40 * 0.25))
    assert by_key["1.running_var"].status == "only_a"
    assert by_key["extra.weight"].status == "only_b"


def test_relative_changes_flags_nan_and_lists_tied_names_once() -> None:
    shared = torch.randn(4, 4)
    a = {"emb.weight": shared, "head.weight": shared, "w": torch.ones(3)}
    b = {"emb.weight": shared * 1.5, "w": torch.tensor([1.0, float("nan"), 1.0])}
    changes = relative_changes(a, b)
    assert [(c.key, c.status) for c in changes] == [("emb.weight", "changed"), ("w", "nonfinite")]
    assert changes[0].relative == pytest.approx(0.5)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_stats_of_a_large_safetensors_file_stay_within_a_few_chunks_of_memory(tmp_path: Path) -> None:
    size = 128 * 2**20
    child = r"""
import gc, json, sys, torch, torchkeep
from torchkeep.stats import tensor_stats
def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
path = sys.argv[1]
g = torch.Generator().manual_seed(0)
torchkeep.save_weights({f"t{i}": torch.randn(SIZE // 4 // 4, generator=g) for i in range(4)}, path)
torchkeep.save_weights({"w": torch.randn(5000)}, path + ".small.safetensors")
tensor_stats(path + ".small.safetensors", chunk=1000)  # warm up: the first call's imports are not the reading
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS
base = status("VmRSS")
report = tensor_stats(path)
print(json.dumps({"peak": max(status("VmHWM"), status("VmRSS")) - base, "rows": len(report.rows)}))
""".replace("SIZE", str(size))
    done = subprocess.run(
        [sys.executable, "-c", child, str(tmp_path / "big.safetensors")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rows"] == 4
    # the default chunk is 1 Mi elements: a 4 MiB read buffer and an 8 MiB float64 scratch, both reused
    # (12 MiB measured); reading the file whole would need 128 MiB
    assert result["peak"] < 32 * 2**20, f"peak {result['peak'] / 2**20:.1f} MiB for a {size >> 20} MiB file"
