"""Every error torchkeep raises.

Each error subclasses :class:`TorchkeepError` *and* the builtin that callers
already catch, carries its facts as attributes, and says in its message what
went wrong and what to do next::

    TorchkeepError
    ├── UnreadableFileError              the file cannot be used as asked
    │   ├── ModelFileNotFoundError       (FileNotFoundError)
    │   ├── PathIsDirectoryError         (IsADirectoryError)
    │   ├── WeightsUnavailableError      (FileNotFoundError)
    │   ├── CorruptFileError             (ValueError)
    │   ├── UnsupportedFormatError       (ValueError)
    │   │   └── UnknownFormatError
    │   ├── UnsupportedDtypeError        (TypeError)
    │   ├── NotAStateDictError           (TypeError)
    │   ├── NotAModelError               (TypeError)
    │   └── MissingClassError            (ImportError)
    ├── UnsafeError                      loading it would run code or exceed the limits
    │   ├── UnsafeFileError              (pickle.UnpicklingError; also UntrustedFileError)
    │   └── LimitExceededError           (ValueError)
    ├── DoesNotFitError                  it does not fit the model / objects given
    │   ├── KeyMismatchError             (RuntimeError)
    │   ├── BaseMismatchError            (ValueError)
    │   ├── CheckpointMismatchError      (ValueError)
    │   ├── IncompatibleSourcesError     (ValueError)
    │   └── NoMatchError                 (ValueError)
    ├── CheckpointError                  a checkpoint run's problem
    │   ├── NoValidCheckpointError       (FileNotFoundError)
    │   ├── NewerFormatError             (ValueError)
    │   ├── AsyncSaveError               (RuntimeError)
    │   ├── RunLockedError               (BlockingIOError)
    │   └── MissingMetricError           (KeyError)
    ├── DistributedError                 a rank of a distributed job failed
    │   └── DistributedSaveError         (RuntimeError)
    └── UsageError                       an argument or environment torchkeep cannot use
        ├── CallOrderError               (RuntimeError)
        ├── UnsupportedSuffixError       (ValueError)
        ├── InvalidArgumentError         (ValueError)
        ├── InvalidMetadataError         (TypeError)
        ├── UnserializableValueError     (TypeError)
        ├── MissingExtraError            (ImportError)
        ├── UnknownProtocolError         (ValueError)
        ├── InvalidShardSizeError        (ValueError)
        ├── SignalHandlerError           (ValueError)
        ├── OutputExistsError            (FileExistsError)
        └── ExportError                  (RuntimeError)

    TorchkeepWarning                (UserWarning)
    ├── RngRestoreWarning
    ├── NonFiniteCheckpointWarning
    ├── LowPrecisionWarning
    └── GracePeriodWarning

Each group of the tree lives in its own module (``_base`` holds the base, the six
group classes and the message helpers; ``unreadable``, ``unsafe``, ``fit``, ``run``,
``distributed``, ``usage`` and ``warning`` the rest); import every name from here.
"""

from torchkeep.errors._base import (
    CheckpointError,
    DistributedError,
    DoesNotFitError,
    TorchkeepError,
    UnreadableFileError,
    UnsafeError,
    UsageError,
    first_line,
)
from torchkeep.errors.distributed import DistributedSaveError
from torchkeep.errors.fit import (
    BaseMismatchError,
    CheckpointMismatchError,
    IncompatibleSourcesError,
    KeyMismatchError,
    NoMatchError,
    ShapeMismatch,
)
from torchkeep.errors.run import (
    AsyncSaveError,
    MissingMetricError,
    NewerFormatError,
    NoValidCheckpointError,
    RunLockedError,
)
from torchkeep.errors.unreadable import (
    CorruptFileError,
    MissingClassError,
    ModelFileNotFoundError,
    NotAModelError,
    NotAStateDictError,
    PathIsDirectoryError,
    UnknownFormatError,
    UnsupportedDtypeError,
    UnsupportedFormatError,
    WeightsUnavailableError,
)
from torchkeep.errors.unsafe import (
    LimitExceededError,
    UnsafeFileError,
    UntrustedFileError,
)
from torchkeep.errors.usage import (
    CallOrderError,
    ExportError,
    InvalidArgumentError,
    InvalidMetadataError,
    InvalidShardSizeError,
    MissingExtraError,
    OutputExistsError,
    SignalHandlerError,
    UnknownProtocolError,
    UnserializableValueError,
    UnsupportedSuffixError,
)
from torchkeep.errors.warning import (
    GracePeriodWarning,
    LowPrecisionWarning,
    NonFiniteCheckpointWarning,
    RngRestoreWarning,
    TorchkeepWarning,
)

__all__ = [
    "AsyncSaveError",
    "BaseMismatchError",
    "CallOrderError",
    "CheckpointError",
    "CheckpointMismatchError",
    "CorruptFileError",
    "DistributedError",
    "DistributedSaveError",
    "DoesNotFitError",
    "ExportError",
    "GracePeriodWarning",
    "IncompatibleSourcesError",
    "InvalidArgumentError",
    "InvalidMetadataError",
    "InvalidShardSizeError",
    "KeyMismatchError",
    "LimitExceededError",
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
    "OutputExistsError",
    "PathIsDirectoryError",
    "RngRestoreWarning",
    "RunLockedError",
    "ShapeMismatch",
    "SignalHandlerError",
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
    "WeightsUnavailableError",
    "first_line",
]
