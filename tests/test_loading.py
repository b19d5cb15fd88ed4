"""load_into: name matching, reports, strictness, and never a silent empty load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep
from conftest import TiedNet
from torchkeep.matching import match_keys
from torchkeep.tutorial import TheModelClass


def fresh() -> TheModelClass:
    torch.manual_seed(123)
    return TheModelClass()


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_exact_match_loads_everything(tmp_path: Path, model: TheModelClass) -> None:
    torchkeep.save_weights(model, tmp_path / "w.safetensors")
    target = fresh()
    report = torchkeep.load_into(target, tmp_path / "w.safetensors")
    assert report.ok
    assert len(report.loaded) == 11
    assert report.renamed == {}
    assert_same_weights(target, model)
    assert "every key matched" in str(report)


def test_loads_in_place_so_optimizer_references_stay_valid(model: TheModelClass) -> None:
    target = fresh()
    weight = target.fc1.weight
    optimizer = torch.optim.SGD(target.parameters(), lr=0.1)
    torchkeep.load_into(target, model.state_dict())
    assert target.fc1.weight is weight
    assert optimizer.param_groups[0]["params"][4] is target.fc1.weight
    assert torch.equal(weight, model.fc1.weight)


def test_data_parallel_prefix_is_removed(tmp_path: Path, model: TheModelClass) -> None:
    torch.save(nn.DataParallel(model).state_dict(), tmp_path / "dp.pt")
    target = fresh()
    report = torchkeep.load_into(target, tmp_path / "dp.pt")
    assert report.ok
    assert report.renamed["module.fc1.weight"] == "fc1.weight"
    assert len(report.renamed) == 11
    assert_same_weights(target, model)
    assert "dropped prefix 'module.'" in str(report)


def test_torch_compile_prefix_is_removed(model: TheModelClass) -> None:
    compiled = torch.compile(model)  # state_dict keys gain _orig_mod.; nothing is compiled until called
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    target = fresh()
    report = torchkeep.load_into(target, compiled.state_dict())
    assert report.ok
    assert_same_weights(target, model)


def test_stacked_prefixes_are_removed(model: TheModelClass) -> None:
    state = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    target = fresh()
    assert torchkeep.load_into(target, state).ok
    assert_same_weights(target, model)


def test_plain_state_dict_loads_into_wrapped_models(model: TheModelClass) -> None:
    wrapped = nn.DataParallel(fresh())
    report = torchkeep.load_into(wrapped, model.state_dict())
    assert report.ok
    assert report.renamed["fc1.weight"] == "module.fc1.weight"
    assert_same_weights(wrapped.module, model)
    compiled = torch.compile(fresh())
    assert torchkeep.load_into(compiled, model.state_dict()).ok


def test_lightning_style_attribute_prefix_is_removed(model: TheModelClass) -> None:
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    target = fresh()
    report = torchkeep.load_into(target, state)
    assert report.ok
    assert_same_weights(target, model)


def test_rename_with_a_mapping(model: TheModelClass) -> None:
    state = dict(model.state_dict())
    state["head.weight"] = state.pop("fc2.weight")
    state["head.bias"] = state.pop("fc2.bias")
    target = fresh()
    report = torchkeep.load_into(target, state, rename={"head.weight": "fc2.weight", "head.bias": "fc2.bias"})
    assert report.ok
    assert report.renamed == {"head.weight": "fc2.weight", "head.bias": "fc2.bias"}
    assert_same_weights(target, model)


def test_rename_with_regex_pairs_and_a_function(model: TheModelClass) -> None:
    state = {k.replace("fc", "dense"): v for k, v in model.state_dict().items()}
    target = fresh()
    assert torchkeep.load_into(target, state, rename=[(r"^dense(\d)", r"fc\1")]).ok
    assert_same_weights(target, model)
    target = fresh()
    assert torchkeep.load_into(target, state, rename=lambda k: k.replace("dense", "fc")).ok
    assert_same_weights(target, model)


def test_strict_mismatch_raises_with_the_facts_and_leaves_the_model_alone(model: TheModelClass) -> None:
    state = dict(model.state_dict())
    del state["fc2.bias"]
    state["extra.weight"] = torch.ones(1)
    state["fc1.weight"] = torch.ones(10, 576)
    target = fresh()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(torchkeep.KeyMismatchError) as info:
        torchkeep.load_into(target, state)
    err = info.value
    assert isinstance(err, RuntimeError)
    assert err.missing == ["fc2.bias"]
    assert err.unexpected == ["extra.weight"]
    assert err.mismatched == [torchkeep.ShapeMismatch("fc1.weight", (10, 576), (1000, 576))]
    message = str(err)
    assert "size mismatch for fc1.weight: file [10, 576], model [1000, 576]" in message
    assert "skip_mismatched=True" in message
    assert "strict=False" in message
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_non_strict_loads_the_rest_and_reports(model: TheModelClass) -> None:
    state = dict(model.state_dict())
    del state["fc2.bias"]
    state["extra.weight"] = torch.ones(1)
    target = fresh()
    kept_bias = target.fc2.bias.detach().clone()
    report = torchkeep.load_into(target, state, strict=False)
    assert not report.ok
    assert report.missing == ("fc2.bias",)
    assert report.unexpected == ("extra.weight",)
    assert torch.equal(target.fc2.bias, kept_bias)
    assert torch.equal(target.fc1.weight, model.fc1.weight)
    text = str(report)
    assert "missing" in text
    assert "unexpected" in text


def test_skip_mismatched_keeps_the_models_head(model: TheModelClass) -> None:
    class Wide(TheModelClass):
        def __init__(self) -> None:
            super().__init__()
            self.fc2 = nn.Linear(1000, 10)

    target = Wide()
    head = target.fc2.weight.detach().clone()
    with pytest.raises(torchkeep.KeyMismatchError, match="skip_mismatched=True"):
        torchkeep.load_into(target, model.state_dict(), strict=False)
    report = torchkeep.load_into(target, model.state_dict(), skip_mismatched=True)
    assert [m.key for m in report.mismatched] == ["fc2.weight", "fc2.bias"]
    assert report.mismatched[0].file_shape == (1, 1000)
    assert report.mismatched[0].model_shape == (10, 1000)
    assert torch.equal(target.fc2.weight, head)
    assert torch.equal(target.fc1.weight, model.fc1.weight)
    assert "file [1, 1000], model [10, 1000]" in str(report)


@pytest.mark.parametrize("strict", [True, False])
def test_a_load_that_matches_nothing_always_raises(model: TheModelClass, strict: bool) -> None:
    other = {f"encoder.layer{i}.weight": torch.ones(2) for i in range(3)}
    target = fresh()
    with pytest.raises(torchkeep.KeyMismatchError, match="no key matched") as info:
        torchkeep.load_into(target, other, strict=strict)
    assert info.value.loaded == 0
    assert "encoder.layer0.weight" in str(info.value)
    assert "rename=" in str(info.value)


def test_all_shapes_mismatched_counts_as_nothing_loaded(model: TheModelClass) -> None:
    state = {k: torch.zeros(*(s + 1 for s in v.shape)) for k, v in model.state_dict().items() if v.dim()}
    with pytest.raises(torchkeep.KeyMismatchError):
        torchkeep.load_into(fresh(), state, strict=False, skip_mismatched=True)


def test_dtype_differences_are_cast_and_reported(model: TheModelClass) -> None:
    state = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    target = fresh()
    report = torchkeep.load_into(target, state)
    assert "fc1.weight" in report.cast
    assert target.fc1.weight.dtype == torch.float32
    assert torch.equal(target.fc1.weight, state["fc1.weight"].float())


def test_tied_weights_stay_tied(tmp_path: Path) -> None:
    source = TiedNet()
    torchkeep.save_weights(source, tmp_path / "t.safetensors")
    target = TiedNet()
    report = torchkeep.load_into(target, tmp_path / "t.safetensors")
    assert report.ok
    assert target.out.weight is target.embed.weight
    assert torch.equal(target.embed.weight, source.embed.weight)


def test_report_to_dict_is_plain_data(model: TheModelClass) -> None:
    import json

    report = torchkeep.load_into(nn.DataParallel(fresh()), model.state_dict())
    data = json.loads(json.dumps(report.to_dict()))
    assert data["renamed"]["fc1.bias"] == "module.fc1.bias"
    assert len(data["loaded"]) == 11


def test_match_keys_never_pairs_ambiguously() -> None:
    # both "module.x" and "x" exist in the model: a file's "_orig_mod.x" could mean either
    pairs = match_keys(["_orig_mod.x"], ["module.x", "x"])
    assert pairs == {}
    assert match_keys(["a", "module.b"], ["a", "b"]) == {"a": "a", "module.b": "b"}


def test_a_tied_key_the_file_stores_once_is_filled_through_its_twin(tmp_path: Path) -> None:
    # transformers writes GPT-2 with transformer.wte.weight only; here: embed.weight only
    source = TiedNet()
    torchkeep.save_weights({"embed.weight": source.embed.weight.detach().clone()}, tmp_path / "once.pt")
    target = TiedNet()
    report = torchkeep.load_into(target, tmp_path / "once.pt")
    assert report.ok
    assert report.loaded == ("embed.weight",)
    assert report.tied == {"out.weight": "embed.weight"}
    assert report.missing == ()
    assert target.out.weight is target.embed.weight
    assert torch.equal(target.out.weight, source.embed.weight)
    assert report.headline() == f"loaded 2/2 tensors from {tmp_path / 'once.pt'}, 1 through a tied twin"
    assert "shares its tensor with embed.weight" in str(report)
    assert report.to_dict()["tied"] == {"out.weight": "embed.weight"}


def test_either_name_of_a_tied_pair_fills_the_other() -> None:
    weight = torch.randn(10, 4)
    target = TiedNet()
    report = torchkeep.load_into(target, {"out.weight": weight})
    assert report.tied == {"embed.weight": "out.weight"}
    assert torch.equal(target.embed.weight, weight)


def test_tying_does_not_excuse_a_genuinely_missing_key(model: TheModelClass) -> None:
    class TiedWithHead(TiedNet):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(10, 2)

    state = {"embed.weight": torch.randn(10, 4), "head.weight": torch.randn(2, 10)}
    target = TiedWithHead()
    with pytest.raises(torchkeep.KeyMismatchError) as caught:
        torchkeep.load_into(target, state)
    assert caught.value.missing == ["head.bias"]
    report = torchkeep.load_into(target, state, strict=False)
    assert report.missing == ("head.bias",)
    assert report.tied == {"out.weight": "embed.weight"}


def test_a_tied_key_whose_twin_is_skipped_for_its_shape_is_missing() -> None:
    target = TiedNet()
    before = target.embed.weight.detach().clone()
    with pytest.raises(torchkeep.KeyMismatchError) as caught:
        torchkeep.load_into(target, {"embed.weight": torch.randn(12, 4)}, strict=False, skip_mismatched=True)
    assert caught.value.missing == ["out.weight"]
    assert [m.key for m in caught.value.mismatched] == ["embed.weight"]
    assert torch.equal(target.embed.weight, before)


def test_tied_detection_is_by_memory_not_by_equal_values() -> None:
    class Twins(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 3, bias=False)
            self.b = nn.Linear(3, 3, bias=False)
            with torch.no_grad():
                self.b.weight.copy_(self.a.weight)  # equal values, two tensors

    with pytest.raises(torchkeep.KeyMismatchError) as caught:
        torchkeep.load_into(Twins(), {"a.weight": torch.randn(3, 3)})
    assert caught.value.missing == ["b.weight"]


def test_ties_are_found_on_the_meta_device_too() -> None:
    with torch.device("meta"):
        target = TiedNet()
    report = torchkeep.load_into(target, {"embed.weight": torch.randn(10, 4, device="meta")})
    assert report.tied == {"out.weight": "embed.weight"}


def test_a_file_with_two_different_tensors_for_one_tied_weight_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, second = torch.zeros(10, 4), torch.ones(10, 4)
    target = TiedNet()
    with caplog.at_level("WARNING", logger="torchkeep.loading"):
        report = torchkeep.load_into(target, {"embed.weight": first, "out.weight": second})
    assert report.tied == {}
    assert "different tensors for embed.weight and out.weight" in caplog.text
    assert torch.equal(target.embed.weight, second)
