"""Reading model files without running code from them.

``ziparchive`` checks archives strictly, ``unpickler`` runs pickles on an
allowlist (``allowlist`` says what may be built and how; ``opcodes`` holds the
opcode tables it reads by, ``findings`` what its collect mode records, and
``opaque`` the inert placeholders of its opaque mode), ``structure`` checks
that what a pickle built is only data, ``torchfile`` reads ``torch.save``
files with both (``legacy`` the pre-1.6 format, ``records`` reads the data
records, ``storages`` builds the storages they fill), ``aliases`` checks the
tied-weights record of safetensors files, ``scan`` reports on any file without
loading it, and ``limits`` bounds everything before it is allocated (see
:class:`Limits` for how each bound covers time and memory).
"""

from torchkeep.safety.limits import DEFAULT_LIMITS, Limits
from torchkeep.safety.scan import ScanResult, scan
from torchkeep.safety.torchfile import load_torch_file

__all__ = ["DEFAULT_LIMITS", "Limits", "ScanResult", "load_torch_file", "scan"]
