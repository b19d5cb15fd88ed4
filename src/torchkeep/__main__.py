"""``python -m torchkeep``."""

from torchkeep.cli import main

main()
