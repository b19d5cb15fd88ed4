"""Checkpoint folders other libraries write: HF Trainer's ``checkpoint-N/`` and accelerate's ``save_state``.

=============  ==============================================================
``hf-trainer`` ``trainer_state.json``, ``model.safetensors`` (or ``pytorch_model.bin``,
               sharded or not), ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``,
               ``rng_state.pth``, ``training_args.bin``
``accelerate`` ``model.safetensors`` (or ``pytorch_model.bin``), ``optimizer.bin``,
               ``optimizer_1.bin``…, ``scheduler.bin``…, ``scaler.pt``, ``random_states_0.pkl``
``weights``    a folder holding only model weights (``save_pretrained``)
=============  ==============================================================

Only the files of the parts asked for are read. ``training_args.bin`` and
accelerate's ``random_states_*.pkl`` are pickles of arbitrary objects: they
are read by the allowlist interpreter in opaque mode (the objects come back
as inert placeholders, the RNG states are taken apart by
:mod:`torchkeep.layouts.rngstate`); what cannot be read that way is skipped
and noted, never unpickled.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

from torchkeep.errors import CorruptFileError, NotAStateDictError, TorchkeepError, UnsafeFileError
from torchkeep.layouts.rngstate import from_accelerate, from_hf_trainer
from torchkeep.layouts.saved import Reading, Saved, allow_placeholders, read_file

__all__ = ["folder_layout", "read_folder"]

_MODEL_FILES = ("model.safetensors", "pytorch_model.bin")
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_MAX_JSON = 256 << 20


def folder_layout(folder: Path) -> str | None:
    """``"hf-trainer"``, ``"accelerate"`` or ``"weights"`` for a folder of that layout, else None."""
    if (folder / "trainer_state.json").is_file():
        return "hf-trainer"
    if any(folder.glob("random_states_*.pkl")) or (folder / "optimizer.bin").is_file():
        return "accelerate"
    if any((folder / name).is_file() for name in (*_MODEL_FILES, *_INDEXES)):
        return "weights"
    return None


def _json(path: Path) -> Any:
    if path.stat().st_size > _MAX_JSON:
        raise CorruptFileError(path, f"a JSON file over {_MAX_JSON >> 20} MiB")
    try:
        return json.loads(path.read_bytes())
    except (ValueError, RecursionError) as err:
        raise CorruptFileError(path, f"not valid JSON ({type(err).__name__})") from None


def _plain(path: Path, reading: Reading, saved: Saved) -> Any:
    """A state file (optimizer, scheduler): placeholders are refused anywhere in it."""
    return allow_placeholders(path, read_file(path, reading), saved, reading, allowed=frozenset())


def _model(folder: Path, reading: Reading) -> dict[str, Any] | None:
    for name in _MODEL_FILES:
        if (folder / name).is_file():
            content = read_file(folder / name, reading)
            return dict(content)
    for name in _INDEXES:
        if (folder / name).is_file():
            index = _json(folder / name)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CorruptFileError(folder / name, "a shard index without a weight_map of file names")
            merged: dict[str, Any] = {}
            for shard in sorted(set(weight_map.values())):
                if Path(shard).name != shard:
                    raise CorruptFileError(folder / name, f"a shard name {shard!r} outside the folder")
                merged.update(read_file(folder / shard, reading))
            return merged
    return None


def _numbered(folder: Path, stem: str, suffix: str) -> list[Path]:
    """``optimizer.bin``, ``optimizer_1.bin``, …: the files accelerate numbers per object, in order."""
    found = {0: folder / f"{stem}{suffix}"} if (folder / f"{stem}{suffix}").is_file() else {}
    pattern = re.compile(rf"{re.escape(stem)}_([0-9]{{1,4}}){re.escape(suffix)}")
    for path in folder.iterdir():
        match = pattern.fullmatch(path.name)
        if match and int(match.group(1)) > 0:
            found[int(match.group(1))] = path
    return [found[i] for i in sorted(found)]


def _training_args(path: Path, reading: Reading, saved: Saved) -> None:
    try:
        content = read_file(path, reading)
    except UnsafeFileError as err:
        saved.skip(
            f"{path.name} was not read: it needs code to load ({err.reason}); pass opaque='placeholder'"
        )
        return
    content = allow_placeholders(path, content, saved, reading, allowed=None)
    saved.hyper_parameters["training_args"] = content


def _rng(path: Path, reading: Reading, saved: Saved, convert: Any) -> dict[str, Any] | None:
    try:
        # the NumPy state in it is a pickled array: opaque mode lets rngstate read its bytes
        content = read_file(path, Reading(reading.map_location, False, reading.limits, True, ()))
    except TorchkeepError as err:
        saved.skip(
            f"{path.name} was not read ({type(err).__name__}); random states were not restored from it"
        )
        return None
    rng: dict[str, Any] | None = convert(content, saved.skipped, path.name)
    if isinstance(content, dict) and type(content.get("step")) is int:
        saved.step = content["step"]
    return rng


def read_folder(folder: Path, layout: str, reading: Reading, wanted: Collection[str]) -> Saved:
    """The parts of a checkpoint folder of ``layout``, reading only the files of the ``wanted`` parts.

    Raises:
        UnsafeFileError: an optimizer or scheduler file that needs code to load.
        CorruptFileError: a damaged ``trainer_state.json`` or shard index.
    """
    saved = Saved(layout, entries=sorted(p.name for p in folder.iterdir()))
    if "model" in wanted:
        saved.model = _model(folder, reading)
    if layout == "weights":
        return saved
    hf = layout == "hf-trainer"
    if "optimizer" in wanted:
        files = [folder / "optimizer.pt"] if hf and (folder / "optimizer.pt").is_file() else []
        saved.optimizers = [
            _plain(p, reading, saved) for p in files or _numbered(folder, "optimizer", ".bin")
        ]
    if "scheduler" in wanted:
        files = [folder / "scheduler.pt"] if hf and (folder / "scheduler.pt").is_file() else []
        saved.schedulers = [
            _plain(p, reading, saved) for p in files or _numbered(folder, "scheduler", ".bin")
        ]
    if "scaler" in wanted and (folder / "scaler.pt").is_file():
        saved.scaler = _plain(folder / "scaler.pt", reading, saved)
    if hf:
        _trainer_state(folder, saved)
        if (folder / "training_args.bin").is_file():
            _training_args(folder / "training_args.bin", reading, saved)
        rng_files = [p for p in (folder / "rng_state.pth", folder / "rng_state_0.pth") if p.is_file()]
        convert = from_hf_trainer
    else:
        rng_files = _numbered(folder, "random_states", ".pkl") or sorted(folder.glob("random_states_*.pkl"))
        convert = from_accelerate
        models = _numbered(folder, "model", ".safetensors")[1:]
        if models:
            saved.skip(
                f"{len(models)} more model file(s) ({models[0].name}, …): only the first model is restored"
            )
        custom = sorted(p.name for p in folder.glob("custom_checkpoint_*.pkl"))
        if custom:
            saved.skip(f"registered objects' states ({', '.join(custom)}) were not read")
    if rng_files:
        saved.rng = _rng(rng_files[0], reading, saved, convert)
    return saved


def _trainer_state(folder: Path, saved: Saved) -> None:
    state = _json(folder / "trainer_state.json")
    if not isinstance(state, dict):
        raise NotAStateDictError(folder / "trainer_state.json", f"a JSON {type(state).__name__}", hint="")
    step, epoch = state.get("global_step"), state.get("epoch")
    saved.step = step if type(step) is int else saved.step
    if isinstance(epoch, int | float) and not isinstance(epoch, bool):
        saved.epoch = int(epoch) if float(epoch).is_integer() else float(epoch)
    best = state.get("best_metric")
    saved.best_metric = float(best) if isinstance(best, int | float) and not isinstance(best, bool) else None
    path = state.get("best_model_checkpoint")
    saved.best_checkpoint = path if isinstance(path, str) else None
    history = state.get("log_history")
    saved.log_history = list(history) if isinstance(history, list) else []
    last = next((e for e in reversed(saved.log_history) if isinstance(e, dict) and "loss" in e), None)
    if last is not None and isinstance(last["loss"], int | float):
        saved.loss = float(last["loss"])
    saved.extra["trainer_state"] = state
