"""Loading a state dict into a model, matching names and saying what happened.

Other people's state dicts rarely match a model name for name: DataParallel
and DDP add ``module.``, ``torch.compile`` adds ``_orig_mod.``, Lightning adds
the attribute that held the model, and a new head has another shape.
``load_into`` matches what can be matched, loads it, and returns a
:class:`LoadReport`; with ``strict=True`` any difference raises
:class:`KeyMismatchError` before the model is touched.

Two things look like differences and are not. A model with tied weights
(GPT-2's ``lm_head.weight`` *is* ``transformer.wte.weight``) is saved by
``transformers`` with one name only; the other is filled through its twin.
A PEFT adapter file holds the adapter's tensors and none of the base model's;
only the adapter's keys are expected from it. So does a trainable-only file
(``save_weights(model, path, trainable_only=True)``), which also records the
base it was trained on: the model's base is checked against it first.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from torchkeep._adapters import ADAPTER_CONFIG, adapter_file_keys, find_adapter
from torchkeep.errors import KeyMismatchError, ShapeMismatch
from torchkeep.load_report import LoadReport
from torchkeep.matching import Rename, apply_rename, match_keys
from torchkeep.safety import DEFAULT_LIMITS, Limits
from torchkeep.storage import file_store
from torchkeep.storage.remote import StorageOptions
from torchkeep.trainable_only import BaseRecord, compare_base, read_base_record
from torchkeep.weights import load_weights, to_state_dict

__all__ = ["load_into", "tied_keys"]

logger = logging.getLogger(__name__)


def _hint(
    *,
    matched: int,
    missing: list[str],
    unexpected: list[str],
    mismatched: list[ShapeMismatch],
    skip_mismatched: bool,
    source_keys: list[str],
    target_keys: list[str],
) -> str:
    if matched == 0:
        src = ", ".join(source_keys[:3]) or "(none)"
        dst = ", ".join(target_keys[:3]) or "(none)"
        return (
            f"no key matched, so nothing was loaded. File keys look like {src}; model keys like "
            f"{dst}. If only the names differ, pass rename=[(r'^old_prefix\\.', 'new_prefix.')] "
            "(regex pairs) or rename={'old.key': 'new.key'}; otherwise this file is for another model"
        )
    fixes = []
    if mismatched and not skip_mismatched:
        keys = ", ".join(m.key for m in mismatched[:3])
        fixes.append(f"pass skip_mismatched=True to keep the model's {keys} and load the rest")
    if missing or unexpected:
        fixes.append(
            f"pass strict=False to load the {matched} matching tensors and keep the model's own "
            "values for the rest (the returned LoadReport lists them)"
        )
    return "; or ".join(fixes)


def _memory_identity(tensor: torch.Tensor) -> tuple[Any, ...]:
    """Equal for two state-dict entries that are one tensor in memory (tied weights)."""
    if tensor.device.type == "meta" or tensor.numel() == 0:  # no memory to compare: same object only
        return ("object", id(tensor))
    return (
        "memory",
        tensor.device,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tensor.stride(),
        tensor.dtype,
    )


def tied_keys(model_state: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """Groups of two or more keys that name one tensor (tied weights), in state-dict order.

    Args:
        model_state (Mapping[str, Tensor]): ``model.state_dict()`` (its entries
            keep the parameters' memory, so tied ones share it).

    Returns:
        e.g. ``[["transformer.wte.weight", "lm_head.weight"]]`` for GPT-2.
    """
    groups: dict[tuple[Any, ...], list[str]] = {}
    for key, tensor in model_state.items():
        groups.setdefault(_memory_identity(tensor), []).append(key)
    return [keys for keys in groups.values() if len(keys) > 1]


def _fill_tied(
    model_state: Mapping[str, torch.Tensor],
    loadable: Mapping[str, torch.Tensor],
    unpaired: set[str],
) -> dict[str, str]:
    """``alias -> loaded key`` for each unpaired model key whose tied twin receives a tensor."""
    tied: dict[str, str] = {}
    for keys in tied_keys(model_state):
        sources = [k for k in keys if k in loadable]
        if not sources:
            continue
        tied.update({k: sources[0] for k in keys if k in unpaired})
        first = loadable[sources[0]]
        for other in sources[1:]:
            if loadable[other] is not first and not torch.equal(loadable[other], first):
                logger.warning(
                    "the file holds different tensors for %s and %s, which are one tensor in the model; "
                    "it keeps %s's (loaded last)",
                    sources[0],
                    other,
                    sources[-1],
                )
    return tied


def _adapter_hint(model: nn.Module, adapter_name: str) -> str:
    adapters = getattr(model, "peft_config", None)
    if not isinstance(adapters, Mapping):
        return (
            f"this is a PEFT adapter file and {type(model).__name__} has no adapters; wrap the base "
            "model first, e.g. peft.get_peft_model(model, LoraConfig(...)) with the adapter's config "
            f"({ADAPTER_CONFIG}), and load into that"
        )
    return (
        f"the model has no adapter named {adapter_name!r} (its adapters: {sorted(adapters)}); "
        "pass adapter_name= with one of them"
    )


def _read_source(
    source: str | os.PathLike[str], *, trust: bool, limits: Limits, storage_options: StorageOptions | None
) -> tuple[dict[str, torch.Tensor], BaseRecord | None]:
    """The file's tensors and, for a trainable-only file, its base record (a URL is downloaded once)."""
    store = file_store(source, storage_options)
    with store.fetch("", allow_folder=True) as local:
        # a downloaded copy is read, not mapped: it is deleted when this block ends
        state = load_weights(local, trust=trust, limits=limits, mmap=None if store.in_place else False)
        return state, read_base_record(local, limits=limits)


def _pair_base(
    record: BaseRecord, rename: Rename | None, free_targets: list[str]
) -> tuple[dict[str, str], list[str]]:
    """``file name -> model key`` for the base names the model has, and the base names it lacks."""
    renamed = apply_rename(record.index, rename)
    pairs = match_keys([renamed[name] for name in record.index], free_targets)
    found = {name: pairs[renamed[name]] for name in record.index if renamed[name] in pairs}
    return found, [name for name in record.index if name not in found]


def load_into(
    model: nn.Module,
    path_or_state_dict: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    rename: Rename | None = None,
    skip_mismatched: bool = False,
    adapter_name: str | None = None,
    check_base: bool = True,
    trust: bool = False,
    limits: Limits = DEFAULT_LIMITS,
    storage_options: StorageOptions | None = None,
) -> LoadReport:
    """Load weights into ``model`` and report what matched.

    Keys the file lacks but the model ties to a loaded key (the same tensor,
    as GPT-2's ``lm_head.weight`` and ``transformer.wte.weight``) are filled
    through it and listed in ``LoadReport.tied``, not as missing.

    A PEFT adapter (a folder with ``adapter_config.json``, or a file beside
    one, as PEFT's ``save_pretrained`` writes them) loads into a PEFT model:
    the adapter's name, which adapter files leave out, is put back into the
    keys, and only the adapter's keys are expected (``strict`` applies to
    them); the base model's weights are not in such a file and are kept.

    A trainable-only file (``save_weights(model, path, trainable_only=True)``)
    holds what was fine-tuned and records the frozen base it was trained on
    (each base tensor's name and digest). Only the file's keys are expected
    from it (``strict`` applies to them, and to model keys outside the base);
    the base keys are not missing. When the model has every base key, their
    tensors are compared with the record before the model is changed, so a
    head is never put on a base it was not trained with. A model without
    every base key is another architecture: the base cannot be checked, and
    its keys count as missing as for any file.

    Args:
        model (nn.Module): the model to fill; its tensors are updated in place,
            so tied weights stay tied and the optimizer keeps its references.
        path_or_state_dict (str | PathLike | Mapping[str, Tensor]): any file
            :func:`load_weights` reads, a PEFT adapter folder, or a state dict.
        strict (bool, default True): raise when any key is missing, unexpected
            or of another shape. With ``False``, load what matches.
        rename (Mapping[str, str] | Sequence[tuple[str, str]] | Callable | None,
            default None): rename file keys first: a mapping of exact keys,
            ``(regex, replacement)`` pairs applied in order, or a function.
        skip_mismatched (bool, default False): keep the model's tensor where
            the shapes differ (e.g. a new head) instead of failing.
        adapter_name (str | None, default None): the PEFT adapter of ``model``
            to fill. None: ``"default"`` (PEFT's own default) when the source
            is an adapter, else a plain load. Given, the source is read as an
            adapter file even without ``adapter_config.json`` (e.g. a state dict).
        check_base (bool, default True): for a trainable-only file, compare the
            model's base tensors with the ones it was trained on and raise on
            any difference. False loads anyway (the report says it was not checked).
        trust (bool, default False): passed to :func:`load_weights` for files
            that are pickles of arbitrary objects. Only for files you trust.
        limits (Limits, default Limits()): passed to :func:`load_weights`.
        storage_options (Mapping | None, default None): passed to
            :func:`load_weights` for a URL.

    Returns:
        A :class:`LoadReport`; ``print(report)`` shows a table.

    Raises:
        KeyMismatchError: ``strict`` and any difference, a shape mismatch
            without ``skip_mismatched``, or no key matched at all (always).
            The model is not modified when this is raised.
        BaseMismatchError: ``check_base`` and the model's base tensors
            differ from the ones a trainable-only file was trained on (load
            the base weights first). The model is not modified.
        ModelFileNotFoundError: an adapter folder holds no adapter file.
        CorruptFileError: a trainable-only file's base record is damaged.

    Example:
        >>> report = torchkeep.load_into(model, "resnet50-imagenet.pt",
        ...                              skip_mismatched=True, strict=False)
        >>> print(report)
        >>> torchkeep.load_into(peft_model, "my-lora/")  # adapter_config.json + adapter_model.safetensors
        >>> torchkeep.load_into(model, "head.safetensors")  # save_weights(..., trainable_only=True)
    """
    record: BaseRecord | None = None
    if isinstance(path_or_state_dict, Mapping):
        source_name = "state dict"
        state = to_state_dict(path_or_state_dict)
    else:
        adapter = find_adapter(path_or_state_dict)
        if adapter is not None and adapter_name is None:
            adapter_name = "default"
        source = path_or_state_dict if adapter is None else adapter.weights
        source_name = os.fspath(source)
        state, record = _read_source(source, trust=trust, limits=limits, storage_options=storage_options)
        if adapter_name is not None:  # a PEFT adapter expects its own keys only already
            record = None
    renamed_by_user = apply_rename(state, rename)
    original_name = {renamed_by_user[k]: k for k in state}

    model_state = model.state_dict()
    target_keys = list(model_state)
    # an adapter file names the model's adapter tensors without the adapter's name: put it back
    in_adapter = {} if adapter_name is None else adapter_file_keys(target_keys, adapter_name)
    expected = target_keys if adapter_name is None else list(in_adapter.values())
    by_new_name = {in_adapter.get(renamed_by_user[k], renamed_by_user[k]): v for k, v in state.items()}
    original_name = {in_adapter.get(k, k): v for k, v in original_name.items()}
    file_form = {v: k for k, v in in_adapter.items()}
    pairs = match_keys(list(by_new_name), target_keys)

    loadable: dict[str, torch.Tensor] = {}
    mismatched: list[ShapeMismatch] = []
    cast: list[str] = []
    renamed: dict[str, str] = {}
    for src_key, dst_key in pairs.items():
        tensor, current = by_new_name[src_key], model_state[dst_key]
        if tuple(tensor.shape) != tuple(current.shape):
            mismatched.append(ShapeMismatch(dst_key, tuple(tensor.shape), tuple(current.shape)))
            continue
        loadable[dst_key] = tensor
        if tensor.dtype != current.dtype:
            cast.append(dst_key)
        if original_name[src_key] not in (dst_key, file_form.get(dst_key)):
            renamed[original_name[src_key]] = dst_key
    paired_targets = set(pairs.values())
    # the model's own tensors (keep_vars): tied ones are one object, also on the meta device
    tied = _fill_tied(
        model.state_dict(keep_vars=True), loadable, {k for k in target_keys if k not in paired_targets}
    )
    base_pairs: dict[str, str] = {}
    base_lacking: list[str] = []
    if record is not None:
        free = [k for k in target_keys if k not in paired_targets and k not in tied]
        base_pairs, base_lacking = _pair_base(record, rename, free)
        if not base_lacking:  # the model has the whole base: the file is not expected to hold it
            base_model_keys = set(base_pairs.values())
            expected = [k for k in target_keys if k not in base_model_keys]
    expected_set = set(expected)
    missing = [k for k in expected if k not in paired_targets and k not in tied]
    base_kept = [k for k in target_keys if k not in expected_set and k not in paired_targets]
    unexpected = [original_name[k] for k in by_new_name if k not in pairs]

    model_name = type(model).__name__
    no_adapter = adapter_name is not None and not in_adapter
    fails = (
        no_adapter
        or (not loadable and expected)
        or (mismatched and not skip_mismatched)
        or (strict and (missing or unexpected))
    )
    if fails:
        hint = (
            _adapter_hint(model, adapter_name or "")
            if no_adapter
            else _hint(
                matched=len(loadable),
                missing=missing,
                unexpected=unexpected,
                mismatched=mismatched,
                skip_mismatched=skip_mismatched,
                source_keys=list(state),
                target_keys=expected,
            )
        )
        if record is not None and base_lacking:
            hint = (
                f"this trainable-only file was saved on a base of {record.tensors} tensors and "
                f"{model_name} lacks {len(base_lacking)} of them (e.g. {base_lacking[0]}), so it is "
                f"another architecture and the base keys count as missing; {hint}"
            )
        raise KeyMismatchError(
            model_name=model_name,
            missing=missing,
            unexpected=unexpected,
            mismatched=mismatched,
            loaded=len(loadable),
            hint=hint,
        )
    base_checked = record is not None and not base_lacking and check_base
    if record is not None and base_checked:
        compare_base(record, model_state, base_pairs, path=source_name)  # before the model changes
    elif record is not None and base_lacking:
        logger.warning(
            "%s lacks %d of the %d base tensors %s was trained on; loaded without checking the base",
            model_name,
            len(base_lacking),
            record.tensors,
            source_name,
        )
    with torch.no_grad():
        model.load_state_dict(loadable, strict=False)
    report = LoadReport(
        loaded=tuple(k for k in target_keys if k in loadable),
        missing=tuple(missing),
        unexpected=tuple(unexpected),
        mismatched=tuple(mismatched),
        renamed=renamed,
        cast=tuple(cast),
        source=source_name,
        tied=tied,
        adapter=adapter_name,
        base_kept=tuple(base_kept),
        trainable_only=record is not None,
        base_checked=base_checked,
    )
    logger.info("%s into %s", report.headline(), model_name)
    return report
