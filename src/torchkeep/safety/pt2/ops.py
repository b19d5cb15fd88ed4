"""Which operators a ``.pt2`` graph may call: an allowlist, not a denylist.

The rule, in order:

1. Shape arithmetic in Python: the few ``_operator`` / ``math`` / ``torch.sym_*``
   functions in :data:`PYTHON_TARGETS` (their arguments and the size of the
   numbers they make are checked node by node in :mod:`.graph`).
2. An ``aten`` operator overload is allowed when it is tagged
   ``torch.Tag.core`` (the core ATen IR, what ``run_decompositions()``
   lowers every program to) **or** is in :data:`REVIEWED`, the non-core
   operators ``torch.export.export`` emits for ordinary models (found by
   exporting the benign models of ``tests/test_safety_pt2.py``: the tutorial
   CNN, resnet18, mobilenet_v3_small, a small ViT, LayerNorm / GELU /
   ``nn.MultiheadAttention`` / ``scaled_dot_product_attention``, LSTM / GRU,
   BatchNorm, dropout, embedding, interpolation and pooling variants, each
   static and with a dynamic batch, before and after ``run_decompositions``),
   plus their in-place and 1-d / 3-d siblings, each read before listing.
3. From that union every operator :func:`excluded` names is removed, whatever
   its tag: names with ``unsafe`` (no bounds checks: ``_sparse_coo_tensor_unsafe``
   writes out of bounds), ``_reshape_alias*`` (strides unchecked: reads out of
   bounds), constructors of sparse / nested / quantized / MKL-DNN tensors,
   process-state operators (``set_*``, ``_set_*``, ``seed``, ``manual_seed``,
   grad mode, ``_cufft_*``, ``_cudnn_*``, ``record_stream``), I/O
   (``from_file``, ``save``, ``_print``), uninitialised memory (``empty*``:
   it exposes stale heap contents), ``resize_`` / ``set_`` (re-point a tensor's
   storage), backward kernels (a forward program never calls them, and some
   trust their index inputs) and ``out=`` overloads.
4. Defence in depth: an operator whose schema takes a Storage, a Python
   object or a capsule is refused even if listed.

``prims`` operators, custom and higher-order operators and every other
Python callable are refused. Drawing random numbers (``rand``, dropout in
training mode) is allowed: it is what such a model does; *setting* the
generator's state is not.
"""

from __future__ import annotations

import re
from functools import lru_cache

__all__ = ["PYTHON_TARGETS", "REVIEWED", "allowed_operators", "excluded", "operator_problem"]

PYTHON_TARGETS = frozenset(
    {
        *(
            f"_operator.{name}"
            for name in (
                *("getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pos", "abs"),
                *("eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_", "pow"),
            )
        ),
        "math.ceil",
        "math.floor",
        "math.trunc",
        "math.sqrt",
        "torch.sym_float",
        "torch.sym_int",
        "torch.sym_max",
        "torch.sym_min",
        "torch.sym_not",
    }
)
# non-core overloads torch.export.export emits for ordinary models (name.overload)
_SEEN = (
    # seen in the benign exports
    "_assert_tensor_metadata.default adaptive_avg_pool2d.default adaptive_max_pool2d.default "
    "add_.Tensor arange.default batch_norm.default chunk.default clamp_min.default "
    "contiguous.default conv1d.default conv2d.default conv_transpose2d.input dropout.default "
    "dropout_.default einsum.default expand_as.default flatten.using_ints group_norm.default "
    "gru.input hardsigmoid.default hardswish.default hardswish_.default instance_norm.default "
    "layer_norm.default linalg_vector_norm.default linear.default log_softmax.int lstm.input "
    "masked_fill.Scalar matmul.default max_pool1d.default max_pool2d.default new_zeros.default "
    "ones.default pad.default relu6.default relu_.default reshape.default "
    "scaled_dot_product_attention.default silu.default softmax.int split.Tensor stack.default "
    "std.dim sum.default to.dtype transpose.int unflatten.int upsample_bicubic2d.vec "
    "where.ScalarOther zeros.default zeros_like.default "
)
# their siblings: other ranks, in-place forms, constructors and views ordinary models use
_SIBLINGS = (
    "conv3d.default conv_transpose1d.default conv_transpose3d.input max_pool3d.default "
    "upsample_nearest1d.vec upsample_nearest3d.vec upsample_linear1d.vec upsample_trilinear3d.vec "
    "adaptive_max_pool1d.default adaptive_avg_pool3d.default softplus.default mish.default "
    "sigmoid_.default tanh_.default silu_.default mul_.Tensor hardtanh_.default gelu_.default "
    "hardsigmoid_.default leaky_relu_.default elu_.default clamp_max.default clamp_.default "
    "view_as.default t.default type_as.default ones_like.default new_ones.default new_full.default "
    "lift_fresh_copy.default detach.default item.default _assert_scalar.default "
    "sym_constrain_range_for_size.default unbind.int narrow.default squeeze.default rms_norm.default "
    "rnn_tanh.input rnn_relu.input baddbmm.default tril.default triu.default logsumexp.default "
    "masked_fill.Tensor where.ScalarSelf where.Scalar rsub.Scalar pixel_shuffle.default "
    "prelu.default glu.default tensor_split.sections repeat_interleave.self_int roll.default "
    "alpha_dropout.default feature_dropout.default to.dtype_layout to.device max.default min.default "
    "arange.start std.correction var_mean.correction movedim.int"
)
REVIEWED = frozenset(_SEEN.split() + _SIBLINGS.split())
_OP_PART = re.compile(r"[a-z_][a-z0-9_]{0,127}")
_OVERLOAD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_EXCLUDED_NAME = (
    (re.compile(r"unsafe"), "it skips its bounds checks"),
    (re.compile(r"^_reshape_alias"), "it sets strides without checking them against the storage"),
    (
        re.compile(r"sparse|nested|quantiz|_make_per_|mkldnn|_coo|_csr|_csc|_bsr|_bsc|padded_dense"),
        "it builds sparse, nested or quantized tensors, whose kernels trust their index inputs",
    ),
    (
        re.compile(r"^_?set_|^_?seed$|manual_seed|grad_enabled|grad_mode|inference_mode|^_cufft|^_?cudnn"),
        "it changes the state of the process, not a tensor",
    ),
    (
        re.compile(r"^record_stream$|^_?print$|^from_file$|^save$|^_debug"),
        "it touches files, streams or the console",
    ),
    (re.compile(r"^(_?empty|new_empty)"), "it returns uninitialised memory (stale heap contents)"),
    (
        re.compile(r"^(set|resize|resize_as|_resize_output|set_data)_?$"),
        "it re-points or resizes a tensor's storage",
    ),
    (re.compile(r"_backward"), "it is a backward kernel, never part of a forward program"),
)
_RISKY_ARG_TYPES = ("Storage", "Any", "__torch__", "Capsule", "PyObject")


def excluded(name: str, overload: str) -> str | None:
    """Why the aten operator ``name.overload`` is refused whatever its tags, or None."""
    for pattern, why in _EXCLUDED_NAME:
        if pattern.search(name):
            return why
    if overload == "out" or overload.endswith("_out"):
        return "it is an out= overload, which writes into a tensor passed in"
    return None


@lru_cache(maxsize=4096)
def operator_problem(target: str) -> str | None:
    """Why the call target ``target`` is refused, or None when the allowlist admits it."""
    if target in PYTHON_TARGETS:
        return None
    parts = target.split(".")
    if len(parts) == 5 and parts[:3] == ["torch", "ops", "aten"]:
        name, overload = parts[3:]
        if not (_OP_PART.fullmatch(name) and _OVERLOAD.fullmatch(overload)):
            return f"the malformed operator name {target[:80]!r}"
        why = excluded(name, overload)
        if why is not None:
            return f"the operator {target} ({why})"
        return _listed(name, overload)
    if target.startswith("torch.ops.prims."):
        return f"the prims operator {target} (torch.export programs use aten operators)"
    if target.startswith("torch.ops.higher_order."):
        return f"the higher-order operator {target} (it runs subgraphs or Python; not in a plain model)"
    if target.startswith("torch.ops."):
        return f"the custom operator {target} (its code is not part of torch)"
    return f"the Python callable {target[:120]!r}"


def _listed(name: str, overload: str) -> str | None:
    import torch

    target = f"torch.ops.aten.{name}.{overload}"
    packet = getattr(torch.ops.aten, name, None)
    op = getattr(packet, overload, None) if packet is not None and overload in packet.overloads() else None
    if not isinstance(op, torch._ops.OpOverload):
        return f"the operator {target}, which this torch does not have"
    if torch.Tag.core not in op.tags and f"{name}.{overload}" not in REVIEWED:
        return (
            f"the operator {target}, which is neither core ATen IR nor one of the operators "
            "torch.export emits for ordinary models (torchkeep's allowlist)"
        )
    if any(risky in str(arg.type) for arg in op._schema.arguments for risky in _RISKY_ARG_TYPES):
        return f"the operator {target} (it takes storages or Python objects)"
    return None


def allowed_operators() -> frozenset[str]:
    """Every aten overload of this torch the allowlist admits, as ``torch.ops.aten.<name>.<overload>``."""
    import torch

    found = set()
    for qualified in torch._C._dispatch_get_all_op_names():
        namespace, _, rest = qualified.partition("::")
        if namespace != "aten":
            continue
        name, _, overload = rest.partition(".")
        target = f"torch.ops.aten.{name}.{overload or 'default'}"
        if operator_problem(target) is None:
            found.add(target)
    return frozenset(found)
