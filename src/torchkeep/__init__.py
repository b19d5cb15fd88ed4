"""torchkeep: save, load, inspect, resume and reuse PyTorch models.

Safe by default (no file runs code on load), crash-safe (a file is either
whole or absent), and compatible with plain ``torch.save`` / ``torch.load``
and safetensors.

Example:
    >>> import torchkeep
    >>> torchkeep.save_weights(model, "model.safetensors")
    >>> report = torchkeep.load_into(model, "model.safetensors")
"""

from torchkeep.checkpoint import CheckpointInfo, Stateful, load_checkpoint, save_checkpoint
from torchkeep.consolidate import consolidate
from torchkeep.data import ResumableSampler
from torchkeep.diff import TensorChange, WeightsDiff, diff
from torchkeep.errors import (
    AsyncSaveError,
    CheckpointMismatchError,
    CorruptFileError,
    DistributedSaveError,
    ExportError,
    InvalidMetadataError,
    InvalidShardSizeError,
    KeyMismatchError,
    LimitExceededError,
    MissingClassError,
    MissingExtraError,
    MissingMetricError,
    ModelFileNotFoundError,
    NewerFormatError,
    NoMatchError,
    NotAModelError,
    NotAStateDictError,
    NoValidCheckpointError,
    PathIsDirectoryError,
    RngRestoreWarning,
    ShapeMismatch,
    TorchkeepError,
    TorchkeepWarning,
    UnknownFormatError,
    UnknownProtocolError,
    UnsafeFileError,
    UnserializableValueError,
    UnsupportedDtypeError,
    UnsupportedFormatError,
    UnsupportedSuffixError,
    UntrustedFileError,
    WeightsUnavailableError,
)
from torchkeep.formats import FileFormat, detect_format
from torchkeep.heads import head_names, preprocessing, pretrained, replace_head
from torchkeep.loading import LoadReport, load_into
from torchkeep.manager import CheckpointEntry, Checkpointer
from torchkeep.models import load_model, save_model
from torchkeep.modes import evaluating
from torchkeep.safety import Limits, ScanResult, scan
from torchkeep.stopping import EarlyStopping
from torchkeep.summary import Summary, SummaryRow, summarize
from torchkeep.transfer import FreezeReport, freeze, param_groups, refresh_optimizer, trainable, unfreeze
from torchkeep.weights import load_weights, read_metadata, save_weights

__version__ = "0.1.0"

__all__ = [
    "AsyncSaveError",
    "CheckpointEntry",
    "CheckpointInfo",
    "CheckpointMismatchError",
    "Checkpointer",
    "CorruptFileError",
    "DistributedSaveError",
    "EarlyStopping",
    "ExportError",
    "FileFormat",
    "FreezeReport",
    "InvalidMetadataError",
    "InvalidShardSizeError",
    "KeyMismatchError",
    "LimitExceededError",
    "Limits",
    "LoadReport",
    "MissingClassError",
    "MissingExtraError",
    "MissingMetricError",
    "ModelFileNotFoundError",
    "NewerFormatError",
    "NoMatchError",
    "NoValidCheckpointError",
    "NotAModelError",
    "NotAStateDictError",
    "PathIsDirectoryError",
    "ResumableSampler",
    "RngRestoreWarning",
    "ScanResult",
    "ShapeMismatch",
    "Stateful",
    "Summary",
    "SummaryRow",
    "TensorChange",
    "TorchkeepError",
    "TorchkeepWarning",
    "UnknownFormatError",
    "UnknownProtocolError",
    "UnsafeFileError",
    "UnserializableValueError",
    "UnsupportedDtypeError",
    "UnsupportedFormatError",
    "UnsupportedSuffixError",
    "UntrustedFileError",
    "WeightsDiff",
    "WeightsUnavailableError",
    "__version__",
    "consolidate",
    "detect_format",
    "diff",
    "evaluating",
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
