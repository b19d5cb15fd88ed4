"""Reading model files without running code from them."""

from torchkeep.safety.globals import imported_names

__all__ = ["imported_names"]
