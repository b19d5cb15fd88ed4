"""Differential tests: torchkeep's reader returns what ``torch.load(weights_only=True)`` returns.

A benign corpus of real files (torchvision state dicts, optimizer states,
checkpoint layouts of common tools, tied weights, views, every dtype, nested
plain values, the legacy format, pickle protocol 4) is written with
``torch.save`` and read both ways; results must be equal in type, structure,
dtype, shape, stride, storage sharing and bits.
"""

from __future__ import annotations

import collections
import math
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import torchkeep
from conftest import STORABLE_DTYPES, TiedNet, rewrite_as_saved_on_gpu
from torchkeep.safety import Limits, load_torch_file
from torchkeep.tutorial import TheModelClass

# -- comparing ----------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.numel() else flat.to(torch.uint8)


def assert_same(ours: Any, theirs: Any, where: str = "result") -> None:
    assert type(ours) is type(theirs), f"{where}: {type(ours).__name__} vs {type(theirs).__name__}"
    if isinstance(theirs, torch.Tensor):
        assert ours.dtype == theirs.dtype, where
        assert ours.shape == theirs.shape, where
        assert ours.stride() == theirs.stride(), where
        assert ours.storage_offset() == theirs.storage_offset(), where
        assert ours.requires_grad == theirs.requires_grad, where
        assert ours.is_conj() == theirs.is_conj(), where
        assert ours.is_neg() == theirs.is_neg(), where
        assert ours.device == theirs.device, where
        assert torch.equal(_bits(ours), _bits(theirs)), f"{where}: data differs"
    elif isinstance(theirs, dict):
        assert list(ours) == list(theirs), where
        for key in theirs:
            assert_same(ours[key], theirs[key], f"{where}[{key!r}]")
        if hasattr(theirs, "__dict__"):  # an OrderedDict state dict carries _metadata
            assert_same(vars(ours), vars(theirs), f"{where}.__dict__")
    elif isinstance(theirs, list | tuple):
        assert len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(theirs, float) and math.isnan(theirs):
        assert math.isnan(ours), where
    else:
        assert ours == theirs, where


def _tensors(obj: Any, found: list[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        found.append(obj)
    elif isinstance(obj, dict):
        for value in obj.values():
            _tensors(value, found)
    elif isinstance(obj, list | tuple):
        for value in obj:
            _tensors(value, found)
    return found


def assert_same_sharing(ours: Any, theirs: Any) -> None:
    """Tensors that share memory in torch's result share it in ours, and no others."""

    def pattern(obj: Any) -> list[int]:
        ids: dict[tuple[int, int], int] = {}
        return [
            ids.setdefault((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()), len(ids))
            for t in _tensors(obj, [])
            if t.numel()
        ]

    assert pattern(ours) == pattern(theirs)


def read_both(path: Path, *, weights_only: bool = True, **kwargs: Any) -> tuple[Any, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own deprecation notes on old formats
        theirs = torch.load(path, weights_only=weights_only, **kwargs)
    return load_torch_file(path, **kwargs), theirs


# -- the benign corpus ----------------------------------------------------------

TORCHVISION_MODELS = [
    "squeezenet1_0",
    "squeezenet1_1",
    "shufflenet_v2_x0_5",
    "shufflenet_v2_x1_0",
    "mnasnet0_5",
    "mnasnet1_0",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "efficientnet_b1",
    "efficientnet_v2_s",
    "densenet121",
    "resnet18",
    "resnet50",
    "googlenet",
    "inception_v3",
    "regnet_x_400mf",
    "regnet_y_400mf",
    "convnext_tiny",
    "swin_t",
    "maxvit_t",
    "mc3_18",
    "s3d",
    "raft_small",
    "ssdlite320_mobilenet_v3_large",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "lraspp_mobilenet_v3_large",
    "deeplabv3_mobilenet_v3_large",
    "quantized_mobilenet_v2",
]


def torchvision_state_dict(name: str) -> dict[str, torch.Tensor]:
    models = pytest.importorskip("torchvision.models")
    kwargs: dict[str, Any] = {"weights": None}
    if any(k in name for k in ("rcnn", "ssd", "lraspp", "deeplab")):
        kwargs["weights_backbone"] = None
    if name.startswith("quantized_"):
        kwargs["quantize"] = False
    meta_ok = not name.startswith("regnet")  # regnet's init copies out of tensors
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if meta_ok:
            with torch.device("meta"):
                model = models.get_model(name, **kwargs)
            model.to_empty(device="cpu")  # uninitialised memory: bits are compared, not values
        else:
            model = models.get_model(name, **kwargs)
    return model.state_dict()


def _trained(optimizer: Callable[[Any], torch.optim.Optimizer]) -> dict[str, Any]:
    torch.manual_seed(0)
    model = TheModelClass()
    opt = optimizer(model.parameters())
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 3, 26, 26)).sum().backward()
        opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict()}


def _views() -> dict[str, torch.Tensor]:
    base = torch.arange(48.0).reshape(6, 8)
    return {
        "base": base,
        "row_slice": base[2:5],
        "transposed": base.t(),
        "strided": base[:, ::3],
        "offset_1d": base.view(-1)[7:19],
        "expanded": torch.ones(3, 1).expand(3, 4),
        "other": torch.randn(2, 2),
    }


def _lightning_layout() -> dict[str, Any]:
    torch.manual_seed(1)
    net = nn.Linear(4, 2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3)
    return {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": collections.OrderedDict((f"model.{k}", v) for k, v in net.state_dict().items()),
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4, "completed": 3}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_loss'}": {"best_model_score": torch.tensor(0.25)}},
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [sched.state_dict()],
        "hparams_name": "kwargs",
        "hyper_parameters": {"lr": 1e-3, "layers": [64, 32], "name": "run"},
    }


def _hf_bin() -> dict[str, torch.Tensor]:
    torch.manual_seed(2)
    embeddings = torch.randn(50, 8)
    return {
        "bert.embeddings.word_embeddings.weight": embeddings,
        "bert.embeddings.position_ids": torch.arange(16).unsqueeze(0),
        "bert.encoder.layer.0.attention.self.query.weight": torch.randn(8, 8),
        "bert.encoder.layer.0.attention.self.query.bias": torch.zeros(8),
        "cls.predictions.decoder.weight": embeddings,  # tied
        "cls.predictions.bias": torch.zeros(50),
    }


def _dtypes() -> dict[str, torch.Tensor]:
    source = torch.linspace(-3, 3, 12)
    out = {str(dtype): source.to(dtype) for dtype in STORABLE_DTYPES if dtype != torch.bool}
    out["bool"] = source > 0
    out["complex64"] = torch.complex(source, -source)  # a value with an imaginary part
    out["complex128"] = torch.complex(source.double(), source.double())
    return out


def _plain_values() -> dict[str, Any]:
    return {
        "list": [1, 2.5, "text", None, True, False],
        "tuple": (1, (2, (3, "deep"))),
        "nested": {"a": {"b": {"c": [1, {"d": 2}]}}},
        "set": {1, 2, 3},
        "bytes": b"\x00\xff\x10",
        "bytearray": bytearray(b"abc"),
        "complex": 1.5 - 2j,
        "big_int": 2**100,
        "negative": -(2**40),
        "inf": float("inf"),
        "nan": float("nan"),
        "unicode": "ünïcødé ✓",
        "counter": collections.Counter({"a": 2}),
        "device": torch.device("cpu"),
        "dtype": torch.bfloat16,
        "size": torch.Size([2, 3]),
        "int_keys": {1: "one", 2: "two"},
        "tuple_keys": {(1, 2): "pair"},
    }


def _scheduler_and_scaler() -> dict[str, Any]:
    net = nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scaler = torch.amp.GradScaler("cuda", enabled=False)
    return {"scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "optimizer": opt.state_dict()}


OBJECTS: dict[str, Callable[[], Any]] = {
    "adam": lambda: _trained(lambda p: torch.optim.Adam(p, lr=1e-3)),
    "adamw": lambda: _trained(lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1)),
    "sgd_momentum": lambda: _trained(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True)),
    "classic_checkpoint": lambda: {**_trained(torch.optim.Adam), "epoch": 7, "loss": 0.125},
    "lightning_ckpt": _lightning_layout,
    "hf_pytorch_model_bin": _hf_bin,
    "tied_weights": lambda: TiedNet().state_dict(),
    "views": _views,
    "dtypes": _dtypes,
    "zero_dim": lambda: {"float": torch.tensor(3.5), "int": torch.tensor(7), "bool": torch.tensor(True)},
    "empty_tensors": lambda: {"empty": torch.empty(0, 3), "empty_int": torch.zeros(0, dtype=torch.int64)},
    "plain_values": _plain_values,
    "parameters": lambda: {"p": nn.Parameter(torch.randn(3)), "frozen": nn.Parameter(torch.ones(2), False)},
    "requires_grad": lambda: {"t": torch.randn(3, requires_grad=True)},
    "conj_and_neg": lambda: {
        "conj": torch.complex(torch.ones(3), torch.arange(3.0)).conj(),
        "neg": torch.complex(torch.ones(2), torch.ones(2)).conj().imag,
    },
    "bare_tensor": lambda: torch.randn(3, 4),
    "list_of_tensors": lambda: [torch.randn(2), torch.randn(3), {"x": torch.ones(1)}],
    "scheduler_and_scaler": _scheduler_and_scaler,
    "module_state_dict_metadata": lambda: TheModelClass().state_dict(),
}


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_torchvision_state_dicts_read_like_torch_load(tmp_path: Path, name: str) -> None:
    state = torchvision_state_dict(name)
    torch.save(state, tmp_path / "w.pth")
    ours, theirs = read_both(tmp_path / "w.pth")
    assert_same(ours, theirs)
    assert_same_sharing(ours, theirs)


@pytest.mark.parametrize("name", sorted(OBJECTS))
def test_benign_files_read_like_torch_load(tmp_path: Path, name: str) -> None:
    torch.save(OBJECTS[name](), tmp_path / "f.pt")
    ours, theirs = read_both(tmp_path / "f.pt")
    assert_same(ours, theirs)
    assert_same_sharing(ours, theirs)
    mapped, theirs_mapped = read_both(tmp_path / "f.pt", mmap=True)
    assert_same(mapped, theirs_mapped)
    assert_same_sharing(mapped, theirs_mapped)


def _legacy_dtypes() -> dict[str, torch.Tensor]:
    # the legacy format predates uint16/32/64 and float8: torch itself cannot write them there
    return {k: v for k, v in _dtypes().items() if "uint" not in k[6:] and "float8" not in k}


@pytest.mark.parametrize(
    "name", ["classic_checkpoint", "views", "legacy_dtypes", "plain_values", "tied_weights"]
)
def test_legacy_format_reads_like_torch_load(tmp_path: Path, name: str) -> None:
    obj = _legacy_dtypes() if name == "legacy_dtypes" else OBJECTS[name]()
    torch.save(obj, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    ours, theirs = read_both(tmp_path / "old.pt")
    assert_same(ours, theirs)
    assert_same_sharing(ours, theirs)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_every_pickle_protocol_reads_like_torch_load(tmp_path: Path, protocol: int) -> None:
    # torch's weights-only reader refuses protocol 3+ (bytes opcodes, frames); ours reads them,
    # so the reference for these files, written here and benign, is a full torch.load.
    torch.save(_plain_values() | _views(), tmp_path / "p.pt", pickle_protocol=protocol)
    ours, theirs = read_both(tmp_path / "p.pt", weights_only=protocol == 2)
    assert_same(ours, theirs)


def test_files_written_by_torchkeep_read_like_torch_load(tmp_path: Path, model: TheModelClass) -> None:
    torchkeep.save_weights(model, tmp_path / "w.pt", metadata={"note": "with an extra record"})
    torchkeep.save_checkpoint(tmp_path / "c.pt", model=model, epoch=2, loss=0.5)
    for name in ("w.pt", "c.pt"):
        ours, theirs = read_both(tmp_path / name)
        assert_same(ours, theirs)


def test_a_file_saved_on_gpu_reads_on_cpu(tmp_path: Path, model: TheModelClass) -> None:
    torch.save(model.state_dict(), tmp_path / "cpu.pt")
    rewrite_as_saved_on_gpu(tmp_path / "cpu.pt", tmp_path / "gpu.pt")
    ours = load_torch_file(tmp_path / "gpu.pt", map_location="cpu")
    theirs = torch.load(tmp_path / "cpu.pt", weights_only=True)
    assert_same(ours, theirs)
    if not torch.cuda.is_available():
        with pytest.raises(torchkeep.UnsupportedFormatError, match="map_location='cpu'"):
            load_torch_file(tmp_path / "gpu.pt", map_location=None)


def test_mmap_returns_tensors_backed_by_the_file_without_reading_it(tmp_path: Path) -> None:
    torch.save({"big": torch.arange(1 << 20, dtype=torch.float32)}, tmp_path / "big.pt")
    mapped = load_torch_file(tmp_path / "big.pt", mmap=True)["big"]
    assert mapped[12345].item() == 12345.0
    mapped[0] = -1.0  # a private mapping: the file is not changed
    assert torch.load(tmp_path / "big.pt", weights_only=True)["big"][0].item() == 0.0


def test_a_flipped_data_byte_fails_the_crc_check(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(1000)}, tmp_path / "w.pt")
    data = bytearray((tmp_path / "w.pt").read_bytes())
    at = data.index(b"FB", data.index(b"w/data/0")) + 100  # inside the record's zeros
    data[at] ^= 0xFF
    (tmp_path / "w.pt").write_bytes(bytes(data))
    with pytest.raises(torchkeep.CorruptFileError, match="CRC-32") as info:
        load_torch_file(tmp_path / "w.pt")
    assert info.value.member == "w/data/0"


@pytest.mark.parametrize("which", [0, 7, 29])
def test_a_flipped_byte_in_one_of_many_small_records_fails_the_crc_check(tmp_path: Path, which: int) -> None:
    """Small records are read in groups and their CRCs checked once the interpreter is done."""
    torch.save({f"t{i}": torch.full((300,), float(i)) for i in range(30)}, tmp_path / "w.pt")
    data = bytearray((tmp_path / "w.pt").read_bytes())
    at = data.index(b"FB", data.index(f"w/data/{which}".encode())) + 200  # inside the record
    data[at] ^= 0xFF
    (tmp_path / "w.pt").write_bytes(bytes(data))
    with pytest.raises(torchkeep.CorruptFileError, match="CRC-32") as info:
        load_torch_file(tmp_path / "w.pt")
    assert info.value.member == f"w/data/{which}"


def test_limits_are_checked_before_allocating(tmp_path: Path) -> None:
    torch.save({f"t{i}": torch.ones(100) for i in range(20)}, tmp_path / "w.pt")
    with pytest.raises(torchkeep.LimitExceededError, match="max_tensors") as info:
        load_torch_file(tmp_path / "w.pt", limits=Limits(max_tensors=10))
    assert (info.value.limit, info.value.maximum) == ("max_tensors", 10)
    with pytest.raises(torchkeep.LimitExceededError, match="max_bytes"):
        torchkeep.load_weights(tmp_path / "w.pt", limits=Limits(max_bytes=1000))
    with pytest.raises(torchkeep.LimitExceededError, match="max_numel"):
        torchkeep.load_checkpoint(tmp_path / "w.pt", limits=Limits(max_numel=99))
    assert len(load_torch_file(tmp_path / "w.pt", limits=Limits(max_tensors=20))) == 20


def test_a_pickle_that_is_not_a_torch_file_is_refused_as_such(tmp_path: Path) -> None:
    import pickle

    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"a": [1, 2]}, protocol=2))
    with pytest.raises(torchkeep.UnknownFormatError, match="plain pickle"):
        torchkeep.load_weights(tmp_path / "plain.pkl")


def test_quantized_tensors_are_refused_with_the_reason(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated in torch
        q = torch.quantize_per_tensor(torch.randn(4), scale=0.1, zero_point=0, dtype=torch.qint8)
    torch.save({"q": q}, tmp_path / "q.pt")
    with pytest.raises(torchkeep.UnsafeFileError, match="_rebuild_qtensor") as info:
        torchkeep.load_weights(tmp_path / "q.pt")
    assert "trust=True" in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_reading_straight_to_cuda_matches_torch_load(tmp_path: Path) -> None:
    state = _views() | _hf_bin() | {"half": torch.randn(64, 64).half()}
    torch.save(state, tmp_path / "cpu.pt")
    for mmap in (False, True):
        ours, theirs = read_both(tmp_path / "cpu.pt", map_location="cuda", mmap=mmap)
        assert_same(ours, theirs)
        assert_same_sharing(ours, theirs)
    torch.save({k: v.cuda() for k, v in state.items()}, tmp_path / "gpu.pt")
    kept = load_torch_file(tmp_path / "gpu.pt", map_location=None)  # stays where it was saved
    assert {t.device.type for t in kept.values()} == {"cuda"}
    assert_same(kept, torch.load(tmp_path / "gpu.pt", weights_only=True))
    on_cpu = torchkeep.load_weights(tmp_path / "gpu.pt")  # the default map_location is "cpu"
    assert {t.device.type for t in on_cpu.values()} == {"cpu"}


@given(st.binary(max_size=4096), st.binary(max_size=4096), st.integers(0, 2**32 - 1))
def test_the_fast_crc_is_zlibs_crc(a: bytes, b: bytes, start: int) -> None:
    from torchkeep.safety.crc import crc32

    assert crc32(a, start) == zlib.crc32(a, start)
    assert crc32(b, crc32(a)) == zlib.crc32(a + b)  # chained over chunks, as the readers do


def _zip_of(names: list[str]) -> bytes:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in names:
            archive.writestr(name, b"x")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("archive/data.pkl", "archive/DATA.PKL"),
        ("archive/data/0", "ARCHIVE/data/0"),
        ("archive/data/k", "archive/data/\u212a"),  # KELVIN SIGN folds to k
        ("archive/straße", "archive/STRASSE"),
    ],
)
def test_member_names_that_fold_together_are_refused_naming_both(
    tmp_path: Path, first: str, second: str
) -> None:
    from torchkeep.safety.ziparchive import ZipArchive

    path = tmp_path / "z.zip"
    path.write_bytes(_zip_of(["archive/version", first, second]))
    with path.open("rb") as f, pytest.raises(torchkeep.UnsafeFileError) as info:
        ZipArchive(path, f, path.stat().st_size, limits=Limits())
    assert first in str(info.value)
    assert second in str(info.value)
    assert torchkeep.scan(path).verdict == "UNSAFE"


def test_distinct_names_that_only_look_alike_are_fine(tmp_path: Path) -> None:
    from torchkeep.safety.ziparchive import ZipArchive

    path = tmp_path / "z.zip"
    path.write_bytes(
        _zip_of(["archive/data.pkl", "archive/data/0", "archive/data/00", "archive/.data/version"])
    )
    with path.open("rb") as f:
        assert len(ZipArchive(path, f, path.stat().st_size, limits=Limits()).members) == 4


def test_data_descriptors_must_agree_with_the_directory(tmp_path: Path) -> None:
    # the descriptor bytes are taken from the read of the next record's header: a forged one
    # (its CRC-32 changed) is still refused, and an intact file reads as torch.load reads it
    import zipfile

    from torchkeep.errors import UnsafeFileError

    state = {f"w{i}": torch.full((3,), float(i)) for i in range(4)}
    path = tmp_path / "d.pt"
    torch.save(state, path)
    assert_same(load_torch_file(path), torch.load(path, weights_only=True))
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        infos = sorted(archive.infolist(), key=lambda info: info.header_offset)
    assert all(info.flag_bits & 0x8 for info in infos)  # torch writes data descriptors
    following = infos[2].header_offset  # the descriptor of record 1 ends here
    signature = raw.rfind(b"PK\x07\x08", following - 24, following)
    assert signature > 0
    raw[signature + 4] ^= 0xFF  # the first byte of its CRC-32
    forged = tmp_path / "forged.pt"
    forged.write_bytes(bytes(raw))
    with pytest.raises(UnsafeFileError, match="data descriptor that disagrees"):
        load_torch_file(forged)
