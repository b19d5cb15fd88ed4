"""torchkeep.EMA: the average itself, swapping it in, saving it alone, and riding in checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep
from conftest import TiedNet, assert_state_equal
from torchkeep.tutorial import TheModelClass


def _step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """One training step on random images from the global RNG (restored by a checkpoint)."""
    model.train()
    loss = model(torch.randn(8, 3, 26, 26)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _trained(seed: int = 0) -> tuple[TheModelClass, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = TheModelClass()
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


# -- the average ------------------------------------------------------------------------------------


def test_update_is_the_exponential_average_and_copies_integer_buffers() -> None:
    model, optimizer = _trained()
    ema = torchkeep.EMA(model, decay=0.8)
    exact = {k: v.double() for k, v in _snapshot(model).items() if v.is_floating_point()}
    lerped = {k: v.clone() for k, v in _snapshot(model).items() if v.is_floating_point()}
    for _ in range(5):
        _step(model, optimizer)
        ema.update()
        live = _snapshot(model)
        for key in exact:
            exact[key] = 0.8 * exact[key] + 0.2 * live[key].double()
            lerped[key] = torch.lerp(lerped[key], live[key], 0.2)
    averaged = ema.model_state_dict()
    assert list(averaged) == list(model.state_dict())
    for key, value in exact.items():
        assert averaged[key].dtype == torch.float32
        assert torch.allclose(averaged[key].double(), value, rtol=1e-5, atol=1e-6), key
        assert torch.equal(averaged[key], lerped[key]), key  # the foreach kernel is lerp, bit for bit
    assert not torch.equal(averaged["fc1.weight"], model.fc1.weight)
    assert not torch.equal(averaged["bn.running_mean"], model.bn.running_mean)  # buffers averaged too
    assert averaged["bn.num_batches_tracked"].item() == 5  # copied, not averaged
    assert torch.equal(averaged["bn.num_batches_tracked"], model.bn.num_batches_tracked)
    assert ema.num_updates == 5
    assert not any(t.requires_grad for t in averaged.values())


def test_warmup_ramps_the_decay_up_to_the_configured_one() -> None:
    model, optimizer = _trained()
    ema = torchkeep.EMA(model, decay=0.99, warmup=True)
    assert ema.decay_at(1) == pytest.approx(1 - 2 ** (-2 / 3))
    assert ema.decay_at(30) == pytest.approx(1 - 31 ** (-2 / 3))
    assert ema.decay_at(10**6) == 0.99
    assert torchkeep.EMA(model, decay=0.999, warmup=True, warmup_power=0.75).decay_at(9999) == pytest.approx(
        0.999
    )
    assert torchkeep.EMA(model, decay=0.99).decay_at(1) == 0.99
    before = _snapshot(model)
    _step(model, optimizer)
    ema.update()
    weight = 1 - ema.decay_at(1)
    expected = torch.lerp(before["fc2.weight"], model.fc2.weight.detach(), weight)
    assert torch.equal(ema.model_state_dict()["fc2.weight"], expected)


@pytest.mark.parametrize("decay", [0, 1, 1.0, -0.5, 1.5, math.nan, math.inf, True, "0.999", None])
def test_a_decay_outside_0_1_is_refused_with_the_fix(decay: object) -> None:
    with pytest.raises(torchkeep.InvalidArgumentError, match=r"decay=.*e\.g\. decay=0\.999") as err:
        torchkeep.EMA(nn.Linear(2, 2), decay=decay)  # type: ignore[arg-type]
    assert isinstance(err.value, ValueError)
    assert err.value.argument == "decay"


def test_other_bad_options_are_refused() -> None:
    with pytest.raises(torchkeep.InvalidArgumentError, match=r"warmup_power=1\.5"):
        torchkeep.EMA(nn.Linear(2, 2), warmup=True, warmup_power=1.5)
    with pytest.raises(torchkeep.InvalidArgumentError, match=r"dtype=torch\.int64 is not a floating-point"):
        torchkeep.EMA(nn.Linear(2, 2), dtype=torch.int64)
    with torch.device("meta"):
        ghost = nn.Linear(2, 2)
    with pytest.raises(torchkeep.NotAStateDictError, match="meta device"):
        torchkeep.EMA(ghost)


def test_tied_weights_share_one_average_updated_once(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TiedNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ema = torchkeep.EMA(model, decay=0.5)
    start = model.embed.weight.detach().clone()
    loss = model.out(model.embed(torch.tensor([1, 2, 3]))).pow(2).sum()
    loss.backward()
    optimizer.step()
    ema.update()
    averaged = ema.model_state_dict()
    assert averaged["embed.weight"] is averaged["out.weight"]
    assert torch.equal(averaged["embed.weight"], torch.lerp(start, model.embed.weight.detach(), 0.5))
    path = torchkeep.save_weights(ema, tmp_path / "ema.safetensors")
    loaded = torchkeep.load_weights(path)
    assert loaded["embed.weight"] is loaded["out.weight"]
    assert torch.equal(loaded["out.weight"], averaged["out.weight"])


def test_the_model_inside_a_wrapper_is_averaged_under_its_own_names() -> None:
    model = TheModelClass()
    ema = torchkeep.EMA(nn.DataParallel(model))
    assert list(ema.model_state_dict()) == list(model.state_dict())


def test_a_changed_model_is_refused_at_update() -> None:
    model, _ = _trained()
    ema = torchkeep.EMA(model)
    model.fc2 = nn.Linear(1000, 3)
    with pytest.raises(torchkeep.KeyMismatchError, match="make the EMA after") as err:
        ema.update()
    assert [m.key for m in err.value.mismatched] == ["fc2.weight", "fc2.bias"]
    assert ema.num_updates == 0


def test_a_float32_average_of_a_bfloat16_model_keeps_small_steps() -> None:
    torch.manual_seed(0)
    model = nn.Linear(64, 64).to(torch.bfloat16)
    with pytest.warns(torchkeep.LowPrecisionWarning, match=r"bfloat16.*pass dtype=torch\.float32"):
        same = torchkeep.EMA(model, decay=0.999)
    wide = torchkeep.EMA(model, decay=0.999, dtype=torch.float32)  # no warning: warnings are errors here
    start = model.weight.detach().float().clone()
    with torch.no_grad():
        model.weight.add_(0.01)
    target = model.weight.detach().float()
    for _ in range(200):
        same.update()
        wide.update()
    expected = start + (target - start) * (1 - 0.999**200)
    assert wide.model_state_dict()["weight"].dtype == torch.float32
    assert torch.allclose(wide.model_state_dict()["weight"], expected, atol=1e-5)
    # the documented reason for dtype=: most bfloat16 steps round away (a sixth of the way, at best)
    moved = (same.model_state_dict()["weight"].float() - start).abs().mean()
    assert moved < (expected - start).abs().mean() / 6
    with wide.applied(model):
        assert model.weight.dtype == torch.bfloat16
        assert torch.equal(model.weight, expected.to(torch.bfloat16))


def test_dtype_widens_narrower_tensors_and_never_narrows_wider_ones() -> None:
    torch.manual_seed(0)
    model = nn.Module()
    model.half = nn.Linear(4, 4).to(torch.float16)
    model.full = nn.Linear(4, 4)
    model.register_buffer("exact", torch.randn(5, dtype=torch.float64))
    ema = torchkeep.EMA(model, decay=0.9, dtype=torch.float32)
    kept = {k: v.dtype for k, v in ema.model_state_dict().items()}
    assert kept == {
        "exact": torch.float64,  # not cast down to float32
        "half.weight": torch.float32,
        "half.bias": torch.float32,
        "full.weight": torch.float32,
        "full.bias": torch.float32,
    }
    start = model.exact.clone()
    model.exact.add_(1e-9)  # a step float32 could not hold
    ema.update()
    assert torch.equal(ema.model_state_dict()["exact"], torch.lerp(start, model.exact, 0.1))
    narrow = torchkeep.EMA(nn.Linear(2, 2), dtype=torch.bfloat16)  # float32 model: kept in float32
    assert {v.dtype for v in narrow.model_state_dict().values()} == {torch.float32}


def test_a_compiled_model_is_averaged_under_its_own_names(tmp_path: Path) -> None:
    model = TheModelClass()
    compiled = torch.compile(model)  # lazy: nothing is compiled until it runs, so this test is quick
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    ema = torchkeep.EMA(compiled, decay=0.5)
    assert list(ema.model_state_dict()) == list(model.state_dict())
    with torch.no_grad():
        model.fc1.weight.add_(1.0)
    ema.update()
    with ema.applied(compiled) as inner:
        assert inner is model
        assert torch.equal(
            compiled.state_dict()["_orig_mod.fc1.weight"], ema.model_state_dict()["fc1.weight"]
        )
    path = torchkeep.save_weights(ema, tmp_path / "ema.safetensors")
    assert sorted(torchkeep.load_weights(path)) == sorted(model.state_dict())  # no _orig_mod. prefix


def test_a_real_decay_of_any_type_is_accepted() -> None:
    np = pytest.importorskip("numpy")
    assert torchkeep.EMA(nn.Linear(2, 2), decay=np.float32(0.5)).decay == 0.5
    assert type(torchkeep.EMA(nn.Linear(2, 2), decay=np.float64(0.25)).decay) is float


# -- using it ---------------------------------------------------------------------------------------


def test_applied_swaps_the_average_in_and_the_live_weights_back() -> None:
    model, optimizer = _trained()
    ema = torchkeep.EMA(model, decay=0.5)
    for _ in range(3):
        _step(model, optimizer)
        ema.update()
    live = _snapshot(model)
    images = torch.randn(4, 3, 26, 26)
    reference = TheModelClass()
    reference.load_state_dict(ema.model_state_dict())
    reference.eval()
    with ema.applied(model) as swapped, torchkeep.evaluating(model):
        assert swapped is model
        assert_state_equal(_snapshot(model), {k: v.clone() for k, v in ema.model_state_dict().items()})
        assert torch.equal(model(images), reference(images))
    assert_state_equal(_snapshot(model), live)
    assert model.training
    _step(model, optimizer)  # training goes on with the live weights (and the optimizer's)


def test_applied_restores_the_live_weights_when_the_block_raises() -> None:
    model, optimizer = _trained()
    ema = torchkeep.EMA(model, decay=0.5)
    _step(model, optimizer)
    ema.update()
    live = _snapshot(model)

    def evaluate_and_fail() -> None:
        with ema.applied(model), torch.no_grad():
            model.fc1.weight.mul_(3)  # changes inside the block are undone too
            raise RuntimeError("evaluation failed")

    with pytest.raises(RuntimeError, match="evaluation failed"):
        evaluate_and_fail()
    assert_state_equal(_snapshot(model), live)


def test_applied_into_another_model_of_the_same_architecture() -> None:
    model, optimizer = _trained()
    ema = torchkeep.EMA(model, decay=0.5)
    _step(model, optimizer)
    ema.update()
    other = TheModelClass()
    own = _snapshot(other)
    with ema.applied(other):
        assert torch.equal(other.fc1.weight, ema.model_state_dict()["fc1.weight"])
    assert_state_equal(_snapshot(other), own)
    with pytest.raises(torchkeep.KeyMismatchError, match=r"applied\(\)") as err, ema.applied(nn.Linear(3, 3)):
        pass
    assert "fc1.weight" in err.value.unexpected


def test_update_inside_applied_is_refused_and_changes_nothing() -> None:
    model, optimizer = _trained()
    ema = torchkeep.EMA(model, decay=0.5)
    _step(model, optimizer)
    live = _snapshot(model)
    before = {k: v.clone() for k, v in ema.model_state_dict().items()}
    with ema.applied(model), pytest.raises(torchkeep.CallOrderError, match=r"outside the block") as err:
        ema.update()
    assert err.value.call == "EMA.update()"
    assert isinstance(err.value, RuntimeError)
    assert_state_equal(ema.model_state_dict(), before)
    assert ema.num_updates == 0
    assert_state_equal(_snapshot(model), live)
    with ema.applied(TheModelClass()):  # an evaluation copy: the model still holds its own weights
        ema.update()
    ema.update()  # and after the block, as usual
    assert ema.num_updates == 2
    expected = {k: torch.lerp(torch.lerp(before[k], live[k], 0.5), live[k], 0.5) for k in ("fc1.weight",)}
    assert torch.equal(ema.model_state_dict()["fc1.weight"], expected["fc1.weight"])


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_save_weights_writes_the_average_as_the_models_state_dict(tmp_path: Path, suffix: str) -> None:
    model, optimizer = _trained()
    ema = torchkeep.EMA(model, decay=0.5)
    _step(model, optimizer)
    ema.update()
    path = torchkeep.save_weights(ema, tmp_path / f"ema{suffix}")
    if suffix == ".pt":  # plain torch reads it, keys in the model's order
        plain = torch.load(path, weights_only=True)
        assert list(plain) == list(model.state_dict())
    loaded = torchkeep.load_weights(path)
    assert_state_equal(loaded, ema.model_state_dict())
    fresh = TheModelClass()
    report = torchkeep.load_into(fresh, path)
    assert not report.missing
    assert not report.unexpected
    assert torch.equal(fresh.fc1.weight, ema.model_state_dict()["fc1.weight"])


# -- checkpoints ------------------------------------------------------------------------------------


@pytest.mark.parametrize("async_save", [False, True])
def test_checkpointer_round_trip_resumes_exactly(tmp_path: Path, async_save: bool) -> None:
    model, optimizer = _trained(seed=0)
    ema = torchkeep.EMA(model, decay=0.9, warmup=True)
    for _ in range(6):
        _step(model, optimizer)
        ema.update()
    straight_model, straight_ema = _snapshot(model), {k: v.clone() for k, v in ema.model_state_dict().items()}
    assert all(v.isfinite().all() for v in straight_model.values() if v.is_floating_point())

    model, optimizer = _trained(seed=0)
    ema = torchkeep.EMA(model, decay=0.9, warmup=True)
    with torchkeep.Checkpointer(tmp_path / "run", async_save=async_save) as ckpts:
        for _ in range(3):
            _step(model, optimizer)
            ema.update()
        ckpts.save(2, model=model, optimizer=optimizer, ema=ema)
        for _ in range(2):  # what the interrupted run did after its last checkpoint, lost
            _step(model, optimizer)
            ema.update()

    model, optimizer = _trained(seed=7)  # another start: everything must come from the checkpoint
    ema = torchkeep.EMA(model, decay=0.9, warmup=True)
    with torchkeep.Checkpointer(tmp_path / "run") as ckpts:
        info = ckpts.restore(model=model, optimizer=optimizer, ema=ema)
        assert info is not None
        assert "ema" in info.restored
        assert ema.num_updates == 3
        for _ in range(info.step + 1, 6):
            _step(model, optimizer)
            ema.update()
    assert_state_equal(_snapshot(model), straight_model)
    assert_state_equal({k: v.clone() for k, v in ema.model_state_dict().items()}, straight_ema)


def test_restoring_into_the_ema_of_another_model_is_refused(tmp_path: Path) -> None:
    model, _ = _trained()
    with torchkeep.Checkpointer(tmp_path) as ckpts:
        ckpts.save(0, model=model, ema=torchkeep.EMA(model))
        other = torchkeep.EMA(nn.Linear(576, 10))
        before = {k: v.clone() for k, v in other.model_state_dict().items()}
        with pytest.raises(torchkeep.KeyMismatchError, match="restore without ema=") as err:
            ckpts.restore(ema=other)
    assert err.value.missing == ["weight", "bias"]
    assert "fc1.weight" in err.value.unexpected
    assert_state_equal(other.model_state_dict(), before)
    assert other.num_updates == 0


def test_a_failed_ema_restore_leaves_the_model_and_optimizer_as_they_were(tmp_path: Path) -> None:
    model, optimizer = _trained()
    _step(model, optimizer)
    with torchkeep.Checkpointer(tmp_path) as ckpts:
        ckpts.save(0, model=model, optimizer=optimizer, ema=torchkeep.EMA(model))
        fresh, fresh_optimizer = _trained(seed=1)
        _step(fresh, fresh_optimizer)
        model_before, optimizer_before = _snapshot(fresh), fresh_optimizer.state_dict()
        momentum_before = {i: s["momentum_buffer"].clone() for i, s in optimizer_before["state"].items()}
        wrong = torchkeep.EMA(nn.Linear(576, 10))  # the EMA of another model: its check refuses
        with pytest.raises(torchkeep.KeyMismatchError, match="restore without ema="):
            ckpts.restore(model=fresh, optimizer=fresh_optimizer, ema=wrong)
    assert_state_equal(_snapshot(fresh), model_before)  # checked before the model was loaded
    for i, s in fresh_optimizer.state_dict()["state"].items():
        assert torch.equal(s["momentum_buffer"], momentum_before[i])
    assert wrong.num_updates == 0


class _Refuses:
    """A Stateful whose own check refuses every state with a plain ValueError."""

    def __init__(self) -> None:
        self.loaded = False

    def state_dict(self) -> dict[str, int]:
        return {"version": 1}

    def check_state_dict(self, state: dict[str, int], /) -> None:
        raise ValueError(f"version {state['version']} is too old for this object")

    def load_state_dict(self, state: dict[str, int], /) -> None:
        self.loaded = True


def test_every_objects_check_state_dict_runs_before_any_object_changes(tmp_path: Path) -> None:
    model, optimizer = _trained()
    _step(model, optimizer)
    with torchkeep.Checkpointer(tmp_path) as ckpts:
        ckpts.save(0, model=model, ema=torchkeep.EMA(model), sampler=_Refuses())
        fresh, _ = _trained(seed=1)
        before, ema = _snapshot(fresh), torchkeep.EMA(fresh)
        ema_before = {k: v.clone() for k, v in ema.model_state_dict().items()}
        refuses = _Refuses()
        with pytest.raises(torchkeep.CheckpointMismatchError, match="version 1 is too old") as err:
            ckpts.restore(model=fresh, ema=ema, sampler=refuses)
    assert "check_state_dict refused" in str(err.value)
    assert "restore without sampler=" in str(err.value)
    assert not refuses.loaded
    assert_state_equal(_snapshot(fresh), before)
    assert_state_equal(ema.model_state_dict(), ema_before)
    assert ema.num_updates == 0


def test_load_state_dict_checks_everything_before_changing_anything() -> None:
    model, _ = _trained()
    ema = torchkeep.EMA(model)
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in ema.state_dict().items()}
    state["weights"] = {k: v.clone() for k, v in state["weights"].items()}
    state["weights"]["fc2.weight"] = torch.zeros(3, 1000)
    state["weights"]["fc1.bias"] = torch.full((1000,), 5.0)
    before = {k: v.clone() for k, v in ema.model_state_dict().items()}
    with pytest.raises(torchkeep.KeyMismatchError, match=r"size mismatch for fc2\.weight") as err:
        ema.load_state_dict(state)
    assert [m.key for m in err.value.mismatched] == ["fc2.weight"]
    assert_state_equal(ema.model_state_dict(), before)
    with pytest.raises(torchkeep.NotAStateDictError, match=r"EMA\.state_dict"):
        ema.load_state_dict(model.state_dict())  # the model's weights, not an EMA state


def test_it_rides_in_a_single_file_checkpoint(tmp_path: Path) -> None:
    model, optimizer = _trained()
    ema = torchkeep.EMA(model, decay=0.5)
    _step(model, optimizer)
    ema.update()
    path = torchkeep.save_checkpoint(tmp_path / "ckpt.tar", model=model, extra={"ema": ema.state_dict()})
    info = torchkeep.load_checkpoint(path, model=TheModelClass())
    again = torchkeep.EMA(TheModelClass(), decay=0.5)
    again.load_state_dict(info.extra["ema"])
    assert again.num_updates == 1
    assert_state_equal(again.model_state_dict(), ema.model_state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_average_stays_there_or_on_the_cpu(tmp_path: Path) -> None:
    model, optimizer = _trained()
    model.cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    on_gpu = torchkeep.EMA(model, decay=0.8)
    on_cpu = torchkeep.EMA(model, decay=0.8, device="cpu")
    for _ in range(4):
        loss = model(torch.randn(8, 3, 26, 26, device="cuda")).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        on_gpu.update()
        on_cpu.update()
    gpu, cpu = on_gpu.model_state_dict(), on_cpu.model_state_dict()
    assert gpu["fc1.weight"].is_cuda
    assert not cpu["fc1.weight"].is_cuda
    for key in gpu:
        assert torch.allclose(gpu[key].cpu().double(), cpu[key].double(), rtol=1e-5, atol=1e-6), key
    with torchkeep.Checkpointer(tmp_path) as ckpts:
        ckpts.save(3, model=model, optimizer=optimizer, ema=on_gpu)
        again = torchkeep.EMA(model, decay=0.8)
        ckpts.restore(ema=again)
    assert_state_equal(
        {k: v.cpu() for k, v in again.model_state_dict().items()}, {k: v.cpu() for k, v in gpu.items()}
    )
    live = _snapshot(model)
    with on_cpu.applied(model):
        assert torch.equal(model.fc1.weight.cpu(), cpu["fc1.weight"])
    assert_state_equal(_snapshot(model), live)
