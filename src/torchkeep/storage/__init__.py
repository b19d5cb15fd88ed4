"""Writing files so that a crash never leaves a half-written one behind."""

from torchkeep.storage.atomic import atomic_target, fsync_dir

__all__ = ["atomic_target", "fsync_dir"]
