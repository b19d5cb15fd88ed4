"""New classifier heads and pretrained torchvision models.

``replace_head`` knows where the classifier lives in every torchvision
classification family, asks timm models their own (``get_classifier`` /
``reset_classifier``, every head of a distilled model), and finds the
``classifier`` / ``score`` of Hugging Face ``*For...Classification`` models
(whose ``config.num_labels`` it updates). ``pretrained`` builds a torchvision
model by name with its weights (downloaded into torch's cache, found there,
or read from a local file), then optionally gives it a new head and freezes
the backbone.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlparse

import torch
from torch import nn

from torchkeep.errors import MissingExtraError, NoMatchError, WeightsUnavailableError
from torchkeep.loading import load_into
from torchkeep.transfer import freeze, unfreeze
from torchkeep.weights import load_weights

__all__ = ["head_names", "preprocessing", "pretrained", "replace_head"]

logger = logging.getLogger(__name__)

# where torchvision keeps the classifier, most common first; aux heads come along
_HEAD_ATTRS = ("fc", "classifier", "heads", "head")
_AUX_HEADS = ("AuxLogits.fc", "aux1.fc2", "aux2.fc2")
# where transformers' classification models keep theirs (DeiT with a teacher has two)
_HF_HEAD_ATTRS = ("classifier", "score", "cls_classifier", "distillation_classifier")


def _last_layer(module: nn.Module, qualified: str) -> str | None:
    """The name of the layer that produces the logits inside ``module`` (a Linear or 1x1 Conv2d)."""
    if isinstance(module, nn.Linear | nn.Conv2d):
        return qualified
    if isinstance(module, nn.Sequential):
        for child_name, child in reversed(list(module.named_children())):
            found = _last_layer(child, f"{qualified}.{child_name}")
            if found is not None:
                return found
    return None


def head_names(model: nn.Module, *, attr: str | None = None) -> list[str]:
    """Qualified names of the layers that produce class logits (main head first, then aux heads).

    Args:
        model (nn.Module): a classifier.
        attr (str | None, default None): the submodule holding the classifier,
            when it is not one of torchvision's usual places.

    Returns:
        e.g. ``["fc"]``, ``["classifier.6"]``, ``["fc", "AuxLogits.fc"]``,
        ``["head", "head_dist"]`` (timm's distilled DeiT), ``["head.fc"]`` (timm's convnext).

    Raises:
        NoMatchError: no classifier is found (pass ``attr``).

    Example:
        >>> torchkeep.unfreeze(model, *torchkeep.head_names(model))
    """
    if attr is None:
        own = _timm_heads(model) or _hf_heads(model)
        if own:
            return own
    modules = dict(model.named_modules())
    candidates = [attr] if attr is not None else [a for a in _HEAD_ATTRS if a in modules]
    for candidate in candidates:
        if candidate not in modules:
            raise NoMatchError(candidate, "the model has no such submodule")
        found = _last_layer(modules[candidate], candidate)
        if found is not None:
            aux = [name for name in _AUX_HEADS if isinstance(modules.get(name), nn.Linear)]
            return [found, *aux]
    raise NoMatchError(
        attr or "/".join(_HEAD_ATTRS),
        f"no Linear or 1x1 Conv2d classifier found in {type(model).__name__}; pass attr='name.of.layer'",
    )


def _timm_heads(model: nn.Module) -> list[str]:
    """The logit layers timm's ``get_classifier()`` names (a distilled model has two); [] for other models."""
    get_classifier = getattr(model, "get_classifier", None)
    if not callable(get_classifier) or not callable(getattr(model, "reset_classifier", None)):
        return []
    classifier = get_classifier()
    wanted = classifier if isinstance(classifier, tuple | list) else (classifier,)
    names = {id(module): name for name, module in model.named_modules()}
    found = []
    for module in wanted:
        name = names.get(id(module)) if isinstance(module, nn.Module) else None
        layer = None if name is None else _last_layer(module, name)
        if layer is not None:
            found.append(layer)
    return found


def _hf_num_labels(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    num_labels = getattr(config, "num_labels", None)
    return num_labels if isinstance(num_labels, int) and not isinstance(num_labels, bool) else None


def _hf_heads(model: nn.Module) -> list[str]:
    """The Linear layers of a transformers classification head that give ``config.num_labels`` logits."""
    num_labels = _hf_num_labels(model)
    if num_labels is None:
        return []
    found = []
    for attr in _HF_HEAD_ATTRS:
        head = getattr(model, attr, None)
        if not isinstance(head, nn.Module):
            continue
        layers = [
            f"{attr}.{name}" if name else attr
            for name, module in head.named_modules()
            if isinstance(module, nn.Linear) and module.out_features == num_labels
        ]
        found += layers[-1:]  # the last one gives the logits (RoBERTa's head: dense, then out_proj)
    return found


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.Sequential) and child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)


def _reset_timm(model: nn.Module, num_classes: int, dropout: float | None) -> list[str]:
    """Let a timm model rebuild its own heads (pooling and norm layers stay as they are)."""
    old = {name: model.get_submodule(name) for name in _timm_heads(model)}
    reference = cast(torch.Tensor, next(iter(old.values())).weight)
    model.reset_classifier(num_classes)  # type: ignore[operator]
    names = _timm_heads(model)
    for name in names:
        layer = model.get_submodule(name)
        layer.to(device=reference.device, dtype=reference.dtype)  # not every timm model does this
        layer.train(model.training)
        if dropout is not None:
            _swap(model, name, nn.Sequential(nn.Dropout(dropout), layer).train(model.training))
    names = _timm_heads(model) if dropout is not None else names
    for name in names:
        was = old.get(name)
        logger.info(
            "replaced %s (%s) with %d outputs (timm reset_classifier)",
            name,
            "new" if was is None else type(was).__name__,
            num_classes,
        )
    return names


def _new_layer(old: nn.Module, num_classes: int, dropout: float | None) -> nn.Module:
    weight = cast(torch.Tensor, old.weight)  # Linear and Conv2d always have one
    factory: dict[str, Any] = {"device": weight.device, "dtype": weight.dtype}
    layer: nn.Module
    if isinstance(old, nn.Conv2d):  # squeezenet: a 1x1 convolution gives the logits
        shape: dict[str, Any] = {"kernel_size": old.kernel_size, "stride": old.stride}
        layer = nn.Conv2d(old.in_channels, num_classes, **shape, **factory)
    else:
        linear = cast(nn.Linear, old)
        layer = nn.Linear(linear.in_features, num_classes, bias=linear.bias is not None, **factory)
    return layer if dropout is None else nn.Sequential(nn.Dropout(dropout), layer)


def replace_head(
    model: nn.Module, num_classes: int, *, dropout: float | None = None, attr: str | None = None
) -> nn.Module:
    """Give a classifier a new last layer with ``num_classes`` outputs (in place).

    Works on every torchvision classification family (``fc`` of
    resnet/resnext/wide_resnet/regnet/shufflenet/googlenet/inception,
    ``classifier`` of vgg/alexnet/mobilenet/efficientnet/mnasnet/convnext/
    densenet/maxvit, squeezenet's final 1x1 conv, ``heads`` of vit, ``head``
    of swin; inception and googlenet aux heads too), on timm models through
    their own ``reset_classifier`` (every head: a distilled DeiT's ``head``
    and ``head_dist``), on transformers ``*ForImageClassification`` /
    ``*ForSequenceClassification`` models (``classifier`` or ``score``; their
    ``config.num_labels`` is updated), and on any model through ``attr``.
    The new layers take the old ones' input size, dtype, device and
    train/eval mode, and are trainable; nothing else in the model changes.
    Each replaced layer is logged (``torchkeep.heads``, INFO);
    :func:`head_names` lists them afterwards.

    Args:
        model (nn.Module): the model to change.
        num_classes (int): outputs of the new head.
        dropout (float | None, default None): put a Dropout of this rate before the new layer.
        attr (str | None, default None): the submodule holding the classifier,
            e.g. ``"classifier"`` or ``"head.proj"``.

    Returns:
        The model itself.

    Raises:
        NoMatchError: no classifier is found.
        ValueError: ``num_classes`` is not a positive int.

    Example:
        >>> model = torchvision.models.resnet50(weights="DEFAULT")
        >>> torchkeep.replace_head(model, 10)
        >>> model = timm.create_model("convnext_atto")  # head.fc
        >>> torchkeep.replace_head(model, 10)
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if attr is None and _timm_heads(model):
        _reset_timm(model, num_classes, dropout)
        return model
    hf_heads = _hf_heads(model) if attr is None else []
    names = hf_heads or head_names(model, attr=attr)
    for name in names:
        old = model.get_submodule(name)
        new = _new_layer(old, num_classes, dropout if name not in _AUX_HEADS else None)
        new.train(old.training)
        _swap(model, name, new)
        logger.info("replaced %s (%s) with %d outputs", name, type(old).__name__, num_classes)
    if hf_heads:
        config = getattr(model, "config")  # noqa: B009  (checked by _hf_heads)
        config.num_labels = num_classes  # also renames id2label / label2id to LABEL_0...
    for counter in ("num_classes", "num_labels"):
        if isinstance(getattr(model, counter, None), int):
            setattr(model, counter, num_classes)
    return model


def _torchvision() -> Any:
    try:
        import torchvision
    except ImportError as err:
        raise MissingExtraError("torchvision", "vision") from err
    return torchvision


def _weights_enum(name: str, weights: str) -> Any:
    models = _torchvision().models
    known = models.list_models(module=models)
    if name not in known:
        close = [n for n in known if name.split("_")[0] in n][:8]
        raise NoMatchError(name, f"torchvision has no classification model of that name (similar: {close})")
    enum = models.get_model_weights(name)
    if weights == "DEFAULT":
        return enum.DEFAULT
    try:
        return enum[weights.split(".")[-1]]
    except KeyError:
        raise NoMatchError(weights, f"{name} has weights {[w.name for w in enum]}") from None


def _cached_weights(weights: Any) -> Path:
    """The weights file in torch's hub cache, downloaded there first when missing."""
    filename = os.path.basename(urlparse(weights.url).path)
    cached: Path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if cached.is_file():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(weights.url, str(cached), progress=True)
    except OSError as err:  # URLError, socket errors, HTTP errors are all OSErrors
        raise WeightsUnavailableError(weights.url, cached, err) from err
    return cached


def pretrained(
    name: str,
    *,
    weights: str | None = "DEFAULT",
    num_classes: int | None = None,
    freeze_backbone: bool = False,
    weights_path: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """Build a torchvision classification model with pretrained weights, ready to fine-tune.

    Weights come from ``weights_path`` (any file :func:`load_weights` reads)
    or from torchvision's weights (``"DEFAULT"`` or a name like
    ``"IMAGENET1K_V2"``), found in torch's cache (``$TORCH_HOME/hub/checkpoints``)
    or downloaded there. They are read with torchkeep's safe loader.

    Args:
        name (str): a torchvision model name, e.g. ``"resnet50"``.
        weights (str | None, default "DEFAULT"): torchvision weights to use;
            ``None`` for random initialization.
        num_classes (int | None, default None): replace the head with this
            many outputs (the pretrained head is then not loaded).
        freeze_backbone (bool, default False): freeze everything but the head
            (BatchNorm layers held in eval mode, see :func:`freeze`).
        weights_path (str | PathLike | None, default None): load these
            weights instead of torchvision's.

    Returns:
        The model, in train mode.

    Raises:
        MissingExtraError: torchvision is not installed.
        NoMatchError: unknown model or weights name.
        WeightsUnavailableError: the weights are not cached and cannot be downloaded.
        KeyMismatchError: ``weights_path`` does not fit the model.

    Example:
        >>> model = torchkeep.pretrained("resnet18", num_classes=10, freeze_backbone=True)
    """
    models = _torchvision().models
    source: Path | None = Path(weights_path) if weights_path is not None else None
    if source is None and weights is not None:
        source = _cached_weights(_weights_enum(name, weights))
    elif source is None:
        _weights_enum(name, "DEFAULT")  # checks the name
    model: nn.Module = models.get_model(name, weights=None)
    if num_classes is not None:
        replace_head(model, num_classes)
    if source is not None:
        state = load_weights(source)
        report = load_into(model, state, skip_mismatched=num_classes is not None)
        logger.info("%s: %s", name, report.headline())
    if freeze_backbone:
        freeze(model)
        unfreeze(model, *head_names(model))
    return model.train()


def preprocessing(name: str, *, weights: str = "DEFAULT") -> Any:
    """The input transform that matches a torchvision model's pretrained weights.

    Args:
        name (str): a torchvision model name.
        weights (str, default "DEFAULT"): which weights.

    Returns:
        A callable transform (resize, crop, normalize) from torchvision.

    Example:
        >>> transform = torchkeep.preprocessing("resnet50")
        >>> batch = transform(image).unsqueeze(0)
    """
    return _weights_enum(name, weights).transforms()
