"""save_weights(trainable_only=True) and load_into's base check, on real models and files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import torchkeep
from torchkeep.storage.digests import state_digest, tensor_digest
from torchkeep.trainable_only import BASE_DIGEST_KEY, BASE_INDEX_KEY, BASE_TENSORS_KEY, TRAINABLE_KEY

SUFFIXES = [".safetensors", ".pt"]


def _resnet(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=10)


def _fine_tuned_resnet() -> nn.Module:
    """A resnet18 with a frozen backbone whose fc was changed, as after fine-tuning."""
    model = _resnet(0)
    torchkeep.freeze(model)
    torchkeep.unfreeze(model, "fc")
    with torch.no_grad():
        model.fc.weight.mul_(3.0)
        model.fc.bias.add_(1.0)
    return model


class HeadWithNorm(nn.Module):
    """A small backbone (with its own BatchNorm) and a new head that has a BatchNorm too."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.backbone(x))
        return out


def _head_model(seed: int) -> HeadWithNorm:
    torch.manual_seed(seed)
    return HeadWithNorm()


def _trained_head_model() -> HeadWithNorm:
    """Backbone frozen; a few forward passes in train mode move the head's BatchNorm statistics."""
    model = _head_model(0)
    torchkeep.freeze(model)
    torchkeep.unfreeze(model, "head")
    model.backbone.eval()
    model.head.train()
    with torch.no_grad():
        for step in range(3):
            model(torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(step)))
        model.head[0].weight.add_(0.5)
    return model


def _clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_state_equal(
    actual: nn.Module | dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> None:
    state = actual.state_dict() if isinstance(actual, nn.Module) else actual
    assert list(state) == list(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def _raw_metadata(path: Path) -> dict[str, str]:
    if path.suffix == ".safetensors":
        with safetensors.safe_open(str(path), "pt") as f:
            meta = f.metadata()
        return dict(meta)
    import zipfile

    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("/extra/torchkeep_metadata.json"))
        loaded: dict[str, str] = json.loads(archive.read(name))
    return loaded


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_resnet_file_holds_the_head_and_records_the_base(tmp_path: Path, suffix: str) -> None:
    model = _fine_tuned_resnet()
    path = tmp_path / f"head{suffix}"
    torchkeep.save_weights(model, path, trainable_only=True, metadata={"task": "digits"})

    stored = torchkeep.load_weights(path)
    assert set(stored) == {"fc.weight", "fc.bias"}
    assert torch.equal(stored["fc.weight"], model.fc.weight.detach())
    assert torch.equal(stored["fc.bias"], model.fc.bias.detach())

    base = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    meta = _raw_metadata(path)
    assert meta[TRAINABLE_KEY] == "1"
    assert meta[BASE_TENSORS_KEY] == str(len(base)) == "120"
    assert meta[BASE_DIGEST_KEY] == state_digest({k: tensor_digest(v) for k, v in base.items()})
    assert json.loads(meta[BASE_INDEX_KEY]) == {k: tensor_digest(v) for k, v in base.items()}
    assert meta["task"] == "digits"
    assert torchkeep.read_metadata(path) == ({"format": "pt"} if suffix == ".safetensors" else {}) | {
        "task": "digits"
    }
    shown = torchkeep.summarize(path).metadata  # what `torchkeep inspect` prints
    assert shown[TRAINABLE_KEY] == "1"
    assert shown[BASE_TENSORS_KEY] == "120"
    assert shown[BASE_DIGEST_KEY] == meta[BASE_DIGEST_KEY]
    assert BASE_INDEX_KEY not in shown  # one line per base tensor would drown the table


def test_head_batchnorm_buffers_go_with_the_head_and_the_backbone_ones_stay(tmp_path: Path) -> None:
    model = _trained_head_model()
    path = tmp_path / "head.safetensors"
    torchkeep.save_weights(model, path, trainable_only=True)
    stored = torchkeep.load_weights(path)
    assert set(stored) == {
        "head.0.weight",
        "head.0.bias",
        "head.1.weight",
        "head.1.bias",
        "head.1.running_mean",
        "head.1.running_var",
        "head.1.num_batches_tracked",
    }
    assert int(stored["head.1.num_batches_tracked"]) == 3
    assert torch.equal(stored["head.1.running_mean"], model.head[1].running_mean)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_round_trip_onto_a_fresh_model_given_the_base_first(tmp_path: Path, suffix: str) -> None:
    trained = _trained_head_model()
    expected = _clone_state(trained)
    base_file = tmp_path / f"base{suffix}"
    torchkeep.save_weights(_head_model(0), base_file)  # the pretrained weights, before fine-tuning
    head_file = tmp_path / f"head{suffix}"
    torchkeep.save_weights(trained, head_file, trainable_only=True)

    fresh = _head_model(seed=7)
    torchkeep.load_into(fresh, base_file)
    report = torchkeep.load_into(fresh, head_file)

    _assert_state_equal(fresh, expected)
    assert report.trainable_only
    assert report.base_checked
    assert report.ok
    assert set(report.loaded) == set(torchkeep.load_weights(head_file))
    assert report.base_kept == tuple(k for k in expected if not k.startswith("head."))
    assert report.missing == ()
    assert "the same as the file was trained on" in report.headline()
    assert report.to_dict()["trainable_only"] is True
    assert report.to_dict()["base_checked"] is True


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_a_base_differing_in_one_element_is_refused_and_the_model_is_unchanged(
    tmp_path: Path, suffix: str
) -> None:
    trained = _fine_tuned_resnet()
    path = tmp_path / f"head{suffix}"
    torchkeep.save_weights(trained, path, trainable_only=True)

    other = _resnet(0)
    with torch.no_grad():
        other.layer3[1].bn2.running_var[5] += 1e-3
    before = _clone_state(other)
    with pytest.raises(torchkeep.BaseMismatchError) as caught:
        torchkeep.load_into(other, path)

    err = caught.value
    assert isinstance(err, ValueError)
    assert isinstance(err, torchkeep.DoesNotFitError)
    assert err.differing == ["layer3.1.bn2.running_var"]
    assert err.expected == _raw_metadata(path)[BASE_DIGEST_KEY]
    assert err.found != err.expected
    assert err.path == str(path)
    message = str(err)
    assert "different base" in message
    assert "load_into(model" in message
    assert "check_base=False" in message
    _assert_state_equal(other, before)


def test_check_base_false_loads_onto_another_base(tmp_path: Path) -> None:
    trained = _fine_tuned_resnet()
    path = tmp_path / "head.safetensors"
    torchkeep.save_weights(trained, path, trainable_only=True)

    other = _resnet(3)  # another random base
    before = _clone_state(other)
    report = torchkeep.load_into(other, path, check_base=False)

    assert report.trainable_only
    assert not report.base_checked
    assert "not checked" in report.headline()
    expected = before | {"fc.weight": trained.fc.weight.detach(), "fc.bias": trained.fc.bias.detach()}
    _assert_state_equal(other, expected)


def test_a_state_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "head.safetensors"
    with pytest.raises(torchkeep.InvalidArgumentError, match=r"pass the nn\.Module") as caught:
        torchkeep.save_weights(_fine_tuned_resnet().state_dict(), path, trainable_only=True)
    assert isinstance(caught.value, ValueError)
    assert caught.value.argument == "trainable_only"
    assert not path.exists()


def test_nothing_trainable_is_refused(tmp_path: Path) -> None:
    model = _resnet(0)
    torchkeep.freeze(model)
    path = tmp_path / "head.safetensors"
    with pytest.raises(torchkeep.InvalidArgumentError, match="nothing trains") as caught:
        torchkeep.save_weights(model, path, trainable_only=True)
    assert "unfreeze" in str(caught.value)
    assert not path.exists()


def test_shards_are_refused(tmp_path: Path) -> None:
    with pytest.raises(torchkeep.InvalidArgumentError, match="max_shard_size"):
        torchkeep.save_weights(
            _fine_tuned_resnet(), tmp_path / "out", trainable_only=True, max_shard_size="1MB"
        )
    assert not (tmp_path / "out").exists()


def test_reserved_metadata_keys_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "head.safetensors"
    with pytest.raises(torchkeep.InvalidMetadataError, match="reserved"):
        torchkeep.save_weights(
            _fine_tuned_resnet(), path, trainable_only=True, metadata={BASE_DIGEST_KEY: "0" * 32}
        )
    assert not path.exists()


def test_the_file_is_a_small_fraction_of_the_full_save(tmp_path: Path) -> None:
    model = _fine_tuned_resnet()
    full = tmp_path / "full.safetensors"
    head = tmp_path / "head.safetensors"
    torchkeep.save_weights(model, full)
    torchkeep.save_weights(model, head, trainable_only=True)
    assert head.stat().st_size < full.stat().st_size / 100  # 5130 floats and the base record, of 11.7M


def test_dtype_casts_the_file_and_the_base_is_recorded_as_the_model_holds_it(tmp_path: Path) -> None:
    trained = _fine_tuned_resnet()
    path = tmp_path / "head.safetensors"
    torchkeep.save_weights(trained, path, trainable_only=True, dtype=torch.bfloat16)
    assert {t.dtype for t in torchkeep.load_weights(path).values()} == {torch.bfloat16}

    other = _resnet(0)
    report = torchkeep.load_into(other, path)  # the float32 base still matches
    assert report.base_checked
    assert set(report.cast) == {"fc.weight", "fc.bias"}
    assert torch.equal(other.fc.weight, trained.fc.weight.detach().to(torch.bfloat16).float())


class Wrapped(nn.Module):
    """What DataParallel / DDP look like to state_dict(): the model under ``module.``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.module = inner


def test_a_file_saved_from_a_wrapper_loads_into_the_bare_model(tmp_path: Path) -> None:
    trained = _trained_head_model()
    expected = _clone_state(trained)
    path = tmp_path / "head.safetensors"
    torchkeep.save_weights(Wrapped(trained), path, trainable_only=True)
    assert all(k.startswith("module.head.") for k in torchkeep.load_weights(path))

    fresh = _head_model(0)
    report = torchkeep.load_into(fresh, path)
    assert report.base_checked
    _assert_state_equal(fresh, expected)

    moved = _head_model(0)
    with torch.no_grad():
        moved.backbone[0].bias[0] += 1
    with pytest.raises(torchkeep.BaseMismatchError) as caught:
        torchkeep.load_into(moved, path)
    assert caught.value.differing == ["module.backbone.0.bias"]  # named as the file names it


def test_a_model_without_the_whole_base_is_another_architecture(tmp_path: Path) -> None:
    path = tmp_path / "head.safetensors"
    torchkeep.save_weights(_trained_head_model(), path, trainable_only=True)

    smaller = _head_model(0)
    smaller.backbone[1] = nn.Identity()  # no BatchNorm: the model lacks 5 base keys
    with pytest.raises(torchkeep.KeyMismatchError, match="trainable-only") as caught:
        torchkeep.load_into(smaller, path)
    assert caught.value.missing == ["backbone.0.weight", "backbone.0.bias"]

    report = torchkeep.load_into(smaller, path, strict=False)
    assert report.trainable_only
    assert not report.base_checked
    assert report.missing == ("backbone.0.weight", "backbone.0.bias")


def test_unexpected_keys_and_shape_mismatches_still_raise(tmp_path: Path) -> None:
    path = tmp_path / "head.safetensors"
    trained = _fine_tuned_resnet()
    torchkeep.save_weights(trained, path, trainable_only=True)

    smaller_head = _resnet(0)
    smaller_head.fc = nn.Linear(512, 4)
    with pytest.raises(torchkeep.KeyMismatchError) as caught:
        torchkeep.load_into(smaller_head, path)
    assert [m.key for m in caught.value.mismatched] == ["fc.weight", "fc.bias"]
    assert caught.value.missing == []

    no_fc = _resnet(0)
    no_fc.fc = nn.Identity()
    with pytest.raises(torchkeep.KeyMismatchError) as caught_unexpected:
        torchkeep.load_into(no_fc, path)
    assert caught_unexpected.value.unexpected == ["fc.weight", "fc.bias"]


class TiedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.body = nn.Linear(4, 4)
        self.out = nn.Linear(4, 7, bias=False)
        self.out.weight = self.embed.weight


def test_tied_trainable_weights_are_stored_once_and_come_back_tied(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TiedHead()
    torchkeep.freeze(model)
    torchkeep.unfreeze(model, "embed")
    path = tmp_path / "head.safetensors"
    torchkeep.save_weights(model, path, trainable_only=True)
    assert set(safetensors.torch.load_file(str(path))) == {"embed.weight"}

    torch.manual_seed(0)
    fresh = TiedHead()
    with torch.no_grad():
        fresh.embed.weight.zero_()
    report = torchkeep.load_into(fresh, path)
    assert report.base_checked
    assert fresh.out.weight is fresh.embed.weight
    assert torch.equal(fresh.out.weight, model.embed.weight)


def test_a_damaged_base_record_is_a_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "head.safetensors"
    torchkeep.save_weights(_trained_head_model(), path, trainable_only=True)
    meta = _raw_metadata(path)
    tensors = safetensors.torch.load_file(str(path))
    index = json.loads(meta[BASE_INDEX_KEY])
    index.pop(next(iter(index)))
    safetensors.torch.save_file(tensors, str(path), metadata=meta | {BASE_INDEX_KEY: json.dumps(index)})
    with pytest.raises(torchkeep.CorruptFileError, match="trainable-only record"):
        torchkeep.load_into(_head_model(0), path)


@settings(max_examples=12)
@given(st.sets(st.sampled_from(["backbone.0", "backbone.1", "head.0", "head.1"]), min_size=1))
def test_any_unfrozen_part_round_trips(tmp_path: Path, unfrozen: set[str]) -> None:
    trained = _head_model(0)
    torchkeep.freeze(trained)
    torchkeep.unfreeze(trained, *sorted(unfrozen))
    with torch.no_grad():
        for param in torchkeep.trainable(trained):
            param.add_(1.0)
    path = tmp_path / "part.safetensors"
    torchkeep.save_weights(trained, path, trainable_only=True)

    owners = {
        name for name, m in trained.named_modules() if any(p.requires_grad for p in m.parameters(False))
    }
    stored = torchkeep.load_weights(path)
    assert {k.rsplit(".", 1)[0] for k in stored} == owners == unfrozen

    fresh = _head_model(0)
    report = torchkeep.load_into(fresh, path)
    assert report.base_checked
    _assert_state_equal(fresh, dict(trained.state_dict()))


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_a_file_at_a_url_is_downloaded_once_and_checked(suffix: str) -> None:
    fsspec = pytest.importorskip("fsspec")
    url = f"memory://trainable-only-test/head{suffix}"
    trained = _trained_head_model()
    expected = _clone_state(trained)
    try:
        torchkeep.save_weights(trained, url, trainable_only=True)
        fresh = _head_model(0)
        report = torchkeep.load_into(fresh, url)
        assert report.base_checked
        _assert_state_equal(fresh, expected)

        other = _head_model(1)
        before = _clone_state(other)
        with pytest.raises(torchkeep.BaseMismatchError):
            torchkeep.load_into(other, url)
        _assert_state_equal(other, before)
    finally:
        fsspec.filesystem("memory").rm("trainable-only-test", recursive=True)
