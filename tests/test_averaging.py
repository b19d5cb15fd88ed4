"""torchkeep.average and `torchkeep average`: uniform and weighted averages of weights files."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import torchkeep
from conftest import TiedNet, assert_state_equal
from torchkeep import averaging
from torchkeep.cli import main
from torchkeep.tutorial import TheModelClass

FLOATS = [torch.float32, torch.bfloat16, torch.float16]


def _state(seed: int, dtype: torch.dtype = torch.float32, count: int = 3) -> dict[str, torch.Tensor]:
    """A small state dict: two float tensors, one integer buffer."""
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(4, 5, generator=g).to(dtype),
        "layer.bias": (torch.rand(5, generator=g) * 100).to(dtype),
        "bn.num_batches_tracked": torch.tensor(count + seed),
    }


def _direct(
    states: list[dict[str, torch.Tensor]], weights: list[float], *, magnitude: bool = False
) -> dict[str, torch.Tensor]:
    """The weighted average computed in one expression, in float64 (of the absolute values: magnitude)."""
    total = sum(weights)
    shares = [w / total for w in weights]  # first, as a sum of tiny w * x would underflow (w = 5e-324)
    return {
        key: sum(
            w * (s[key].double().abs() if magnitude else s[key].double())
            for w, s in zip(shares, states, strict=True)
        )
        for key in states[0]
        if states[0][key].is_floating_point()
    }


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as done:
        code = int(done.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


# -- the arithmetic (properties) --------------------------------------------------------------------

weight_lists = st.integers(2, 5).flatmap(
    lambda n: st.lists(st.floats(0, 10, allow_nan=False), min_size=n, max_size=n).filter(lambda w: sum(w) > 0)
)


@given(seed=st.integers(0, 2**16), dtype=st.sampled_from(FLOATS), weights=weight_lists)
def test_averaging_one_file_with_itself_gives_the_file_bit_for_bit(
    seed: int, dtype: torch.dtype, weights: list[float]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = torchkeep.save_weights(_state(seed, dtype), Path(tmp) / "w.safetensors")
        result = torchkeep.average([path] * len(weights), weights=weights)
        assert_state_equal(result, torchkeep.load_weights(path))


@given(seed=st.integers(0, 2**16), n=st.integers(2, 5), data=st.data())
def test_a_weight_of_one_on_a_source_gives_that_source(seed: int, n: int, data: st.DataObject) -> None:
    chosen = data.draw(st.integers(0, n - 1))
    scale = data.draw(st.floats(0.01, 100))
    states = [_state(seed + i) for i in range(n)]
    for i, s in enumerate(states):  # a source of weight 0 leaves no trace, even holding NaN or inf
        if i != chosen:
            s["layer.weight"][0, 0] = float("nan") if i % 2 else float("inf")
    weights = [scale if i == chosen else 0.0 for i in range(n)]
    result = torchkeep.average(states, weights=weights)
    assert_state_equal(result, states[chosen])  # the integer buffer too: from the heaviest source


@given(
    seed=st.integers(0, 2**16),
    weights=weight_lists,
    accumulate=st.sampled_from([torch.float64, torch.float32]),
)
def test_the_result_is_the_weighted_average_within_float_tolerance(
    seed: int, weights: list[float], accumulate: torch.dtype
) -> None:
    states = [_state(seed + i) for i in range(len(weights))]
    result = torchkeep.average(states, weights=weights, accumulate_dtype=accumulate)
    direct, scale = _direct(states, weights), _direct(states, weights, magnitude=True)
    rtol = 1e-6 if accumulate == torch.float64 else 1e-5  # of the terms' size: sums may cancel
    for key, value in direct.items():
        assert result[key].dtype == torch.float32
        assert ((result[key].double() - value).abs() <= rtol * scale[key]).all(), key
    heaviest = max(range(len(weights)), key=lambda i: (weights[i], -i))
    assert torch.equal(result["bn.num_batches_tracked"], states[heaviest]["bn.num_batches_tracked"])


def test_weights_are_normalised_and_uniform_by_default() -> None:
    states = [_state(i) for i in range(3)]
    assert_state_equal(
        torchkeep.average(states, weights=[2, 1, 1]), torchkeep.average(states, weights=[0.5, 0.25, 0.25])
    )
    uniform = torchkeep.average(states)
    direct = _direct(states, [1, 1, 1])
    assert torch.allclose(uniform["layer.weight"].double(), direct["layer.weight"], rtol=1e-6)
    assert uniform["bn.num_batches_tracked"].item() == 3  # ties on the weight: the first source
    assert averaging.normalized_weights([2, 1, 1], 3) == [0.5, 0.25, 0.25]


# -- sources and output -----------------------------------------------------------------------------


def _models(n: int) -> list[TheModelClass]:
    models = []
    for seed in range(n):
        torch.manual_seed(seed)
        m = TheModelClass()
        m.train()
        with torch.no_grad():
            for _ in range(seed + 1):
                m(torch.randn(4, 3, 26, 26))  # BN statistics and counts that differ per model
        models.append(m)
    return models


def test_sources_may_be_weights_checkpoints_step_and_run_folders(tmp_path: Path) -> None:
    models = _models(5)
    weights_file = torchkeep.save_weights(models[0], tmp_path / "a.pt")
    checkpoint = torchkeep.save_checkpoint(tmp_path / "b.tar", model=models[1], epoch=3)
    with torchkeep.Checkpointer(tmp_path / "run-c") as ckpts:
        step_folder = ckpts.save(7, model=models[2])
    with torchkeep.Checkpointer(tmp_path / "run-d") as ckpts:
        ckpts.save(1, model=models[0])
        ckpts.save(2, model=models[3])  # the run folder's newest: this one
    sources = [weights_file, checkpoint, step_folder, tmp_path / "run-d", models[4]]
    result = torchkeep.average(sources, tmp_path / "soup.safetensors")
    expected = torchkeep.average(
        [m.state_dict() for m in (models[0], models[1], models[2], models[3], models[4])]
    )
    assert_state_equal(result, expected)
    assert_state_equal(torchkeep.load_weights(tmp_path / "soup.safetensors"), expected)
    report = torchkeep.load_into(TheModelClass(), tmp_path / "soup.safetensors")
    assert not report.missing
    metadata = torchkeep.read_metadata(tmp_path / "soup.safetensors")
    assert json.loads(metadata["averaged_from"])[:2] == [str(weights_file), str(checkpoint)]
    assert json.loads(metadata["average_weights"]) == [0.2] * 5


def test_the_output_format_follows_the_suffix(tmp_path: Path) -> None:
    states = [_state(i) for i in range(2)]
    path = tmp_path / "avg.pt"
    result = torchkeep.average(states, path)
    plain = torch.load(path, weights_only=True)  # a plain state dict, readable without torchkeep
    assert_state_equal(plain, result)
    with pytest.raises(torchkeep.UnsupportedSuffixError):  # refused before any source is read
        torchkeep.average([tmp_path / "missing-a.pt", tmp_path / "missing-b.pt"], tmp_path / "avg.txt")


def test_one_source_is_read_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = [torchkeep.save_weights(_state(i), tmp_path / f"{i}.safetensors") for i in range(4)]
    alive: weakref.WeakSet[torch.Tensor] = weakref.WeakSet()
    most = []
    read = averaging.load_weights

    def spy(path: Path, **options: object) -> dict[str, torch.Tensor]:
        most.append(len(alive))  # tensors of earlier sources still referenced when this one is read
        state = read(path, **options)  # type: ignore[arg-type]
        alive.update(state.values())
        return state

    monkeypatch.setattr(averaging, "load_weights", spy)
    torchkeep.average(paths)
    assert most == [0, 0, 0, 0]


def test_tied_weights_stay_tied_and_must_agree(tmp_path: Path) -> None:
    tied = []
    for seed in range(2):
        torch.manual_seed(seed)
        tied.append(torchkeep.save_weights(TiedNet(), tmp_path / f"tied{seed}.safetensors"))
    result = torchkeep.average(tied, tmp_path / "avg.safetensors")
    assert result["embed.weight"] is result["out.weight"]
    loaded = torchkeep.load_weights(tmp_path / "avg.safetensors")
    assert loaded["embed.weight"] is loaded["out.weight"]
    untied = {k: v.clone() for k, v in torchkeep.load_weights(tied[1]).items()}
    untied["out.weight"] += 1
    with pytest.raises(torchkeep.IncompatibleSourcesError, match=r"is tied to 'embed\.weight'") as err:
        torchkeep.average([tied[0], untied])
    assert err.value.key == "out.weight"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_it_adds_on_a_gpu(tmp_path: Path) -> None:
    paths = [torchkeep.save_weights(_state(i), tmp_path / f"{i}.safetensors") for i in range(3)]
    on_gpu = torchkeep.average(paths, weights=[1, 2, 3], device="cuda")
    assert on_gpu["layer.weight"].is_cuda
    on_cpu = torchkeep.average(paths, weights=[1, 2, 3])
    assert_state_equal({k: v.cpu() for k, v in on_gpu.items()}, on_cpu)


def test_the_documented_batchnorm_recipe(tmp_path: Path) -> None:
    models = _models(3)
    averaged = torchkeep.average([m.state_dict() for m in models])
    model = TheModelClass()
    model.load_state_dict(averaged)
    loader = [torch.randn(8, 3, 26, 26) for _ in range(4)]
    torch.optim.swa_utils.update_bn(loader, model)  # what the docs tell users to run next
    assert not torch.equal(model.bn.running_mean, averaged["bn.running_mean"])
    assert model.bn.num_batches_tracked.item() == 4


# -- refusals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda s: s.update({"extra": torch.zeros(1)}), r"'extra' is in .*b\.safetensors but not in .*a\.s"),
        (lambda s: s.pop("layer.bias"), r"'layer\.bias' is in .*a\.safetensors but not in .*b\.s"),
        (
            lambda s: s.update({"layer.weight": torch.zeros(5, 4)}),
            r"has the shape \[4, 5\] in .*but \[5, 4\]",
        ),
        (
            lambda s: s.update({"layer.bias": s["layer.bias"].half()}),
            r"is torch\.float32 in .*a\.safetensors but torch\.float16 in",
        ),
    ],
)
def test_sources_that_differ_are_refused_naming_the_key_and_files(
    tmp_path: Path, change: object, reason: str
) -> None:
    a = torchkeep.save_weights(_state(0), tmp_path / "a.safetensors")
    other = _state(1)
    change(other)  # type: ignore[operator]
    b = torchkeep.save_weights(other, tmp_path / "b.safetensors")
    with pytest.raises(torchkeep.IncompatibleSourcesError, match=reason) as err:
        torchkeep.average([a, b], tmp_path / "avg.safetensors")
    assert isinstance(err.value, ValueError)
    assert err.value.reference == str(a)
    assert err.value.source == str(b)
    assert "cannot average" in str(err.value)
    assert "convert --dtype" in str(err.value)
    assert not (tmp_path / "avg.safetensors").exists()


@pytest.mark.parametrize(
    ("weights", "reason"),
    [
        ([1.0, -1.0], r"holds -1\.0, which is not a finite number >= 0"),
        ([0, 0], "sums to zero"),
        ([1.0], "holds 1 weights for 2 sources"),
        ([1.0, float("nan")], "holds nan"),
        ([1.0, float("inf")], "holds inf"),
        ("1,1", "is not a list of numbers"),
    ],
)
def test_unusable_weights_are_refused(weights: object, reason: str) -> None:
    with pytest.raises(torchkeep.InvalidArgumentError, match=reason) as err:
        torchkeep.average([_state(0), _state(1)], weights=weights)  # type: ignore[arg-type]
    assert err.value.argument == "weights"
    assert "non-negative numbers, one per source" in str(err.value)


def test_bad_sources_are_refused(tmp_path: Path) -> None:
    with pytest.raises(torchkeep.InvalidArgumentError, match="is empty"):
        torchkeep.average([])
    with pytest.raises(torchkeep.InvalidArgumentError, match=r"pass a list, e\.g\."):
        torchkeep.average("a.safetensors")  # type: ignore[arg-type]
    with pytest.raises(torchkeep.InvalidArgumentError, match="accumulate_dtype"):
        torchkeep.average([_state(0), _state(1)], accumulate_dtype=torch.int64)
    with pytest.raises(torchkeep.ModelFileNotFoundError):
        torchkeep.average([tmp_path / "nope.safetensors", tmp_path / "nope.safetensors"])


def test_a_single_source_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = torchkeep.save_weights(_state(0), tmp_path / "a.safetensors")
    with pytest.raises(torchkeep.InvalidArgumentError, match="holds one source") as err:
        torchkeep.average([path], tmp_path / "out.safetensors")
    assert err.value.argument == "sources"
    assert "the same file twice" in str(err.value)
    assert "torchkeep convert" in str(err.value)
    assert not (tmp_path / "out.safetensors").exists()
    assert_state_equal(torchkeep.average([path, path]), _state(0))  # the fix the message gives


def test_every_source_is_checked_to_exist_before_the_first_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = torchkeep.save_weights(_state(0), tmp_path / "a.safetensors")
    read: list[object] = []
    real = averaging.load_weights
    monkeypatch.setattr(averaging, "load_weights", lambda p, **kw: read.append(p) or real(p, **kw))
    with pytest.raises(torchkeep.ModelFileNotFoundError, match=r"typo\.safetensors: no such file") as err:
        torchkeep.average([a, a, tmp_path / "typo.safetensors"], tmp_path / "out.safetensors")
    assert err.value.path == tmp_path / "typo.safetensors"
    assert read == []  # refused before any reading
    assert not (tmp_path / "out.safetensors").exists()


def test_numpy_and_other_real_weights_are_accepted() -> None:
    np = pytest.importorskip("numpy")
    from fractions import Fraction

    states = [_state(0), _state(1)]
    expected = torchkeep.average(states, weights=[0.25, 0.75])
    assert_state_equal(torchkeep.average(states, weights=[np.float32(1), np.int64(3)]), expected)
    assert_state_equal(torchkeep.average(states, weights=np.array([1.0, 3.0])), expected)
    assert_state_equal(torchkeep.average(states, weights=torch.tensor([1.0, 3.0])), expected)
    with pytest.raises(torchkeep.InvalidArgumentError, match="is not a list of numbers"):
        torchkeep.average(states, weights=np.ones((2, 1)))  # type: ignore[arg-type]
    assert_state_equal(torchkeep.average(states, weights=[Fraction(1, 4), Fraction(3, 4)]), expected)
    assert averaging.normalized_weights([np.float16(1), np.float32(1)], 2) == [0.5, 0.5]
    assert all(type(w) is float for w in averaging.normalized_weights([np.float32(1), 3], 2))


def test_the_weights_fix_names_the_right_count(tmp_path: Path) -> None:
    with pytest.raises(torchkeep.InvalidArgumentError, match=r"pass 4 non-negative") as err:
        torchkeep.average([_state(i) for i in range(4)], weights=[1, 1])
    assert "e.g. weights=[1, 1, 1, 2]" in str(err.value)
    with pytest.raises(torchkeep.InvalidArgumentError) as err:
        averaging.normalized_weights([float("nan"), 1.0], 2, option="--weights")
    assert str(err.value).startswith("--weights='nan,1' holds nan")
    assert "pass --weights with 2 comma-separated non-negative numbers" in str(err.value)
    assert "e.g. --weights 1,2" in str(err.value)


@pytest.mark.parametrize("spelling", ["same", "dotted", "symlink", "hardlink", "inside"])
def test_out_may_not_be_a_source_under_any_name(tmp_path: Path, spelling: str) -> None:
    a = torchkeep.save_weights(_state(0), tmp_path / "a.safetensors")
    b = torchkeep.save_weights(_state(1), tmp_path / "b.safetensors")
    sources: list[averaging.Source] = [a, b]
    if spelling == "same":
        out: Path = b
    elif spelling == "dotted":
        out = tmp_path / "sub" / ".." / "b.safetensors"
        (tmp_path / "sub").mkdir()
    elif spelling == "symlink":
        out = tmp_path / "link.safetensors"
        out.symlink_to(b)
    elif spelling == "hardlink":
        out = tmp_path / "hard.safetensors"
        out.hardlink_to(b)
    else:
        folder = tmp_path / "hf"
        folder.mkdir()
        torchkeep.save_weights(_state(1), folder / "model.safetensors")
        sources = [a, folder]
        out = folder / "model.safetensors"
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.safetensors")}
    with pytest.raises(torchkeep.InvalidArgumentError, match=r"is (inside )?sources\[1\]") as err:
        torchkeep.average(sources, out)
    assert err.value.argument == "out"
    assert "sources[1]" in str(err.value)
    assert "write the average to a new file" in str(err.value)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.safetensors")} == before


def test_the_library_replaces_an_existing_out_as_save_weights_does(tmp_path: Path) -> None:
    paths = [torchkeep.save_weights(_state(i), tmp_path / f"{i}.safetensors") for i in range(2)]
    out = torchkeep.save_weights(_state(7), tmp_path / "out.safetensors")
    result = torchkeep.average(paths, out)
    assert_state_equal(torchkeep.load_weights(out), result)


# -- the command ------------------------------------------------------------------------------------


def test_cli_average_writes_the_weighted_average(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = [str(torchkeep.save_weights(_state(i), tmp_path / f"{i}.safetensors")) for i in range(3)]
    out = tmp_path / "soup.safetensors"
    code, stdout, _ = run_cli(["average", str(out), *paths, "--weights", "1,1,2"], capsys)
    assert code == 0
    assert "averaged 3 sources (weights 0.25, 0.25, 0.5)" in stdout
    assert str(out) in stdout
    assert_state_equal(torchkeep.load_weights(out), torchkeep.average(paths, weights=[1, 1, 2]))
    code, _, _ = run_cli(["average", str(tmp_path / "f32.pt"), *paths, "--float32"], capsys)
    assert code == 0
    assert torch.allclose(
        torchkeep.load_weights(tmp_path / "f32.pt")["layer.weight"], torchkeep.average(paths)["layer.weight"]
    )


def test_cli_average_errors_are_one_line_with_the_group_exit_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = str(torchkeep.save_weights(_state(0), tmp_path / "a.safetensors"))
    b = str(torchkeep.save_weights(TheModelClass(), tmp_path / "b.safetensors"))
    out = str(tmp_path / "out.safetensors")
    code, _, err = run_cli(["average", out, a, b], capsys)
    assert code == 6  # does not fit
    assert "error: cannot average" in err
    assert "Traceback" not in err
    code, _, err = run_cli(["average", out, a, a, "--weights", "1,-2"], capsys)
    assert code == 9  # usage
    assert "holds -2.0" in err
    code, _, err = run_cli(["average", out, a, a, "--weights", "1,x"], capsys)
    assert code == 2  # typer's bad parameter
    assert "comma-separated list of numbers" in err


def test_cli_average_refuses_an_existing_out_unless_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b, c = (str(torchkeep.save_weights(_state(i), tmp_path / f"{i}.safetensors")) for i in range(3))
    before = Path(a).read_bytes()
    code, stdout, err = run_cli(["average", a, b, c], capsys)  # OUT forgotten: a is taken as OUT
    assert code == 9
    assert stdout == ""
    assert f"OUT={a!r} already exists" in err
    assert "pass --force to replace it" in err
    assert f"torchkeep average soup.safetensors {a} {b} {c}" in err
    assert Path(a).read_bytes() == before
    code, _, _ = run_cli(["average", a, b, c, "--force"], capsys)
    assert code == 0
    assert_state_equal(torchkeep.load_weights(a), torchkeep.average([_state(1), _state(2)]))


def test_cli_average_never_writes_over_a_source_even_with_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = (str(torchkeep.save_weights(_state(i), tmp_path / f"{i}.safetensors")) for i in range(2))
    link = tmp_path / "link.safetensors"
    link.symlink_to(b)
    before = Path(b).read_bytes()
    for out in (b, str(link)):
        code, _, err = run_cli(["average", out, a, b, "--force"], capsys)
        assert code == 9  # the usage group
        assert "is sources[1]" in err
        assert Path(b).read_bytes() == before


def test_cli_messages_keep_their_brackets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = (str(torchkeep.save_weights(_state(i), tmp_path / f"{i}.safetensors")) for i in range(2))
    out = tmp_path / "soup[v2].safetensors"
    code, stdout, _ = run_cli(["average", str(out), a, b], capsys)
    assert code == 0
    assert f"into {out}: 3 tensors" in stdout  # rich markup would eat "[v2]"
    code, _, err = run_cli(["average", str(tmp_path / "x.safetensors"), a, b, "--weights", "nan,1"], capsys)
    assert code == 9
    assert "error: --weights='nan,1' holds nan" in err
    old = torchkeep.save_weights(_state(2), tmp_path / "old[bold].safetensors")
    code, _, err = run_cli(["average", str(old), a, b], capsys)
    assert code == 9
    assert f"OUT={str(old)!r} already exists" in err  # the error printer keeps "[bold]" as text


def test_cli_average_as_a_real_process(tmp_path: Path) -> None:
    models = _models(2)
    paths = [str(torchkeep.save_weights(m, tmp_path / f"{i}.pt")) for i, m in enumerate(models)]
    out = tmp_path / "avg.safetensors"
    done = subprocess.run(
        [sys.executable, "-m", "torchkeep", "average", str(out), *paths],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    fresh = TheModelClass()
    torchkeep.load_into(fresh, out)
    expected = torchkeep.average([m.state_dict() for m in models])
    assert torch.equal(fresh.fc1.weight, expected["fc1.weight"])
    assert isinstance(fresh, nn.Module)
