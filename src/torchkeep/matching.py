"""Pairing a file's state-dict keys with a model's: the caller's renames, then what wrappers
(DataParallel/DDP ``module.``, ``torch.compile``'s ``_orig_mod.``, Lightning's attribute) change."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence

__all__ = ["Rename", "apply_rename", "match_keys"]

Rename = Mapping[str, str] | Sequence[tuple[str, str]] | Callable[[str], str]

# Path segments that wrappers insert: DataParallel/DDP and torch.compile.
_WRAPPER_SEGMENTS = frozenset({"module", "_orig_mod"})


def apply_rename(keys: Iterable[str], rename: Rename | None) -> dict[str, str]:
    """``original -> renamed`` for every key."""
    keys = list(keys)
    if rename is None:
        return {k: k for k in keys}
    if callable(rename):
        return {k: rename(k) for k in keys}
    if isinstance(rename, Mapping):
        return {k: rename.get(k, k) for k in keys}
    compiled = [(re.compile(pattern), repl) for pattern, repl in rename]

    def sub(key: str) -> str:
        for pattern, repl in compiled:
            key = pattern.sub(repl, key)
        return key

    return {k: sub(k) for k in keys}


def _without_wrappers(key: str) -> str:
    return ".".join(part for part in key.split(".") if part not in _WRAPPER_SEGMENTS)


def _first_segment(key: str) -> str | None:
    head, dot, _ = key.partition(".")
    return head if dot else None


def _unique_index(keys: Iterable[str], norm: Callable[[str], str]) -> dict[str, str]:
    """``norm(key) -> key`` for the normalized forms that only one key has."""
    counts = Counter(norm(k) for k in keys)
    return {norm(k): k for k in keys if counts[norm(k)] == 1}


def match_keys(source: Sequence[str], target: Sequence[str]) -> dict[str, str]:
    """Pair file keys with model keys: ``file key -> model key``.

    Keys equal on both sides pair first. The rest pair when they are equal
    after dropping the wrapper segments ``module.`` and ``_orig_mod.`` (in any
    number and on either side), and then when the remaining file keys all
    carry one extra leading segment (Lightning's ``model.``) or all lack one
    that the model has. A pairing is only made when it is unambiguous.
    """
    targets = set(target)
    pairs = {k: k for k in source if k in targets}

    def pair_by(norm: Callable[[str], str], norm_target: Callable[[str], str], *, minimum: int = 1) -> None:
        free_src = [k for k in source if k not in pairs]
        taken = set(pairs.values())
        free_dst = [k for k in target if k not in taken]
        index = _unique_index(free_dst, norm_target)
        src_index = _unique_index(free_src, norm)
        found = {s: index[n] for n, s in src_index.items() if n in index}
        if len(found) >= minimum:
            pairs.update(found)

    pair_by(_without_wrappers, _without_wrappers)
    free_src = [k for k in source if k not in pairs]
    if free_src:
        # one leading segment too many (file) or too few (file), judged by the common case
        heads = Counter(_first_segment(k) for k in free_src)
        head, count = heads.most_common(1)[0]
        if head is not None and head not in _WRAPPER_SEGMENTS:
            cut = len(head) + 1
            pair_by(
                lambda k: k[cut:] if k.startswith(head + ".") else "\0" + k,
                lambda k: k,
                minimum=max(1, count // 2),
            )
        taken = set(pairs.values())
        free_dst = [k for k in target if k not in taken]
        dst_heads = Counter(_first_segment(k) for k in free_dst)
        if dst_heads:
            dst_head, dst_count = dst_heads.most_common(1)[0]
            if dst_head is not None and dst_head not in _WRAPPER_SEGMENTS:
                pair_by(lambda k: f"{dst_head}.{k}", lambda k: k, minimum=max(1, dst_count // 2))
    return pairs
