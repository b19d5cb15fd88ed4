"""torchkeep: save, load, inspect, resume and reuse PyTorch models.

Safe by default (no file runs code on load), crash-safe (a file is either
whole or absent), and compatible with plain ``torch.save`` / ``torch.load``
and safetensors.

Where each job lives (one owner per on-disk layout and per decision):

- ``weights.py`` / ``loading.py`` (+ ``matching``, ``load_report``, ``_adapters``): state dicts
  in and out of files and models; ``shards.py`` writes Hugging Face shards;
- ``models.py``: whole models (``.pt2``); ``checkpoint.py`` + ``layouts/`` + ``restoring.py``:
  single-file checkpoints and the layouts other libraries write;
- ``formats/``: the one sniffer (``detect``) and one module per format (safetensors, pickles,
  numpy, Hugging Face folders and indexes);
- ``safety/``: the readers that decide "safe" (strict zip, allowlist unpickler, ``.pt2``
  vetting, limits) and ``scan``, which reuses them;
- ``storage/``: the ``Store`` protocol (local, fsspec), atomic writes, manifests, content
  digests of tensors, the tensor file writer; ``run/``: everything about a Checkpointer run
  folder (layout, reader, retention, snapshot, commit, restore, checkpointer, preemption, the
  packs that store each distinct tensor once, export of one checkpoint as a standalone folder);
- ``trainable_only.py``: adapter-style weight files (what trains, plus the digest of the frozen
  base they belong to);
- ``ema.py``: ``EMA``, a moving average of a model's weights that checkpoints as a Stateful;
  ``averaging.py``: ``average``, weighted averages of weights files (soups, SWA), one source at a time;
- ``stats.py``: per-tensor statistics read a chunk at a time; ``plots.py``: pictures of a run's
  metrics and of the change per layer between two weights files (matplotlib, the ``plot`` extra);
- ``errors/``: the error tree, one module per group; ``cli/``: one module per command.

Example:
    >>> import torchkeep
    >>> torchkeep.save_weights(model, "model.safetensors")
    >>> report = torchkeep.load_into(model, "model.safetensors")
"""

from torchkeep.averaging import average
from torchkeep.checkpoint import CheckpointInfo, Stateful, load_checkpoint, save_checkpoint
from torchkeep.consolidate import consolidate
from torchkeep.data import ResumableSampler
from torchkeep.diff import TensorChange, WeightsDiff, diff
from torchkeep.ema import EMA
from torchkeep.errors import (
    AsyncSaveError,
    BaseMismatchError,
    CallOrderError,
    CheckpointError,
    CheckpointMismatchError,
    CorruptFileError,
    DistributedError,
    DistributedSaveError,
    DoesNotFitError,
    ExportError,
    GracePeriodWarning,
    IncompatibleSourcesError,
    InvalidArgumentError,
    InvalidMetadataError,
    InvalidShardSizeError,
    KeyMismatchError,
    LimitExceededError,
    LowPrecisionWarning,
    MissingClassError,
    MissingExtraError,
    MissingMetricError,
    ModelFileNotFoundError,
    NewerFormatError,
    NoMatchError,
    NonFiniteCheckpointWarning,
    NotAModelError,
    NotAStateDictError,
    NoValidCheckpointError,
    OutputExistsError,
    PathIsDirectoryError,
    RngRestoreWarning,
    RunLockedError,
    ShapeMismatch,
    SignalHandlerError,
    TorchkeepError,
    TorchkeepWarning,
    UnknownFormatError,
    UnknownProtocolError,
    UnreadableFileError,
    UnsafeError,
    UnsafeFileError,
    UnserializableValueError,
    UnsupportedDtypeError,
    UnsupportedFormatError,
    UnsupportedSuffixError,
    UntrustedFileError,
    UsageError,
    WeightsUnavailableError,
)
from torchkeep.formats import FileFormat, detect_format
from torchkeep.heads import head_names, preprocessing, pretrained, replace_head
from torchkeep.load_report import LoadReport
from torchkeep.loading import load_into
from torchkeep.models import load_model, save_model
from torchkeep.modes import evaluating
from torchkeep.run import CheckpointEntry, Checkpointer, export_step
from torchkeep.safety import Limits, ScanResult, scan
from torchkeep.safety.opaque import Opaque
from torchkeep.stopping import EarlyStopping
from torchkeep.summary import Summary, SummaryRow, summarize
from torchkeep.transfer import FreezeReport, freeze, param_groups, refresh_optimizer, trainable, unfreeze
from torchkeep.weights import load_weights, read_metadata, save_weights

__version__ = "0.1.0"

__all__ = [
    "EMA",
    "AsyncSaveError",
    "BaseMismatchError",
    "CallOrderError",
    "CheckpointEntry",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointMismatchError",
    "Checkpointer",
    "CorruptFileError",
    "DistributedError",
    "DistributedSaveError",
    "DoesNotFitError",
    "EarlyStopping",
    "ExportError",
    "FileFormat",
    "FreezeReport",
    "GracePeriodWarning",
    "IncompatibleSourcesError",
    "InvalidArgumentError",
    "InvalidMetadataError",
    "InvalidShardSizeError",
    "KeyMismatchError",
    "LimitExceededError",
    "Limits",
    "LoadReport",
    "LowPrecisionWarning",
    "MissingClassError",
    "MissingExtraError",
    "MissingMetricError",
    "ModelFileNotFoundError",
    "NewerFormatError",
    "NoMatchError",
    "NoValidCheckpointError",
    "NonFiniteCheckpointWarning",
    "NotAModelError",
    "NotAStateDictError",
    "Opaque",
    "OutputExistsError",
    "PathIsDirectoryError",
    "ResumableSampler",
    "RngRestoreWarning",
    "RunLockedError",
    "ScanResult",
    "ShapeMismatch",
    "SignalHandlerError",
    "Stateful",
    "Summary",
    "SummaryRow",
    "TensorChange",
    "TorchkeepError",
    "TorchkeepWarning",
    "UnknownFormatError",
    "UnknownProtocolError",
    "UnreadableFileError",
    "UnsafeError",
    "UnsafeFileError",
    "UnserializableValueError",
    "UnsupportedDtypeError",
    "UnsupportedFormatError",
    "UnsupportedSuffixError",
    "UntrustedFileError",
    "UsageError",
    "WeightsDiff",
    "WeightsUnavailableError",
    "__version__",
    "average",
    "consolidate",
    "detect_format",
    "diff",
    "evaluating",
    "export_step",
    "freeze",
    "head_names",
    "load_checkpoint",
    "load_into",
    "load_model",
    "load_weights",
    "param_groups",
    "preprocessing",
    "pretrained",
    "read_metadata",
    "refresh_optimizer",
    "replace_head",
    "save_checkpoint",
    "save_model",
    "save_weights",
    "scan",
    "summarize",
    "trainable",
    "unfreeze",
]
