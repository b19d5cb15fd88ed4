"""File formats: one module per format, one sniffer that decides which a file is.

The suffix of a file in the wild says little (``.bin`` may be anything), so
every reader asks :func:`detect_format` (or :func:`sniff` for a stream), which
tries each format's structural check in turn (``detect.py``). Each format
module owns its layout's bytes:

- ``safetensors``: the sniff and the strict header checks;
- ``pickles``: the legacy ``torch.save`` prefix, raw pickles, and the probe
  that refuses files which also run as a pickle;
- ``numpy``: ``.npy`` headers, parsed by pattern;
- ``hf``: Hugging Face model folders and sharded checkpoints (which files
  hold the weights, the strict shard-index check; each shard is then read
  as a single file is);
- zip archives are classified by their members in ``detect.zip_kind``
  (``torch.save`` zip, ``torch.export`` program, ``.npz``).

A new format is one module plus a line in ``detect._SNIFFERS``.
"""

from torchkeep.formats.base import WEIGHT_SUFFIXES, FileFormat, TensorInfo, require_file, suffix_format
from torchkeep.formats.detect import LOADABLE, detect_format, sniff
from torchkeep.formats.safetensors import (
    SAFETENSORS_DTYPES,
    SafetensorsHeader,
    check_safetensors_header,
    read_safetensors_header,
)

__all__ = [
    "LOADABLE",
    "SAFETENSORS_DTYPES",
    "WEIGHT_SUFFIXES",
    "FileFormat",
    "SafetensorsHeader",
    "TensorInfo",
    "check_safetensors_header",
    "detect_format",
    "read_safetensors_header",
    "require_file",
    "sniff",
    "suffix_format",
]
