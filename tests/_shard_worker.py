"""A process that saves shards and stops for good when it logs a given step (the crash tests kill it there).

Usage: python _shard_worker.py TARGET SEED COUNT STOP_AT

Writes ``state(SEED, COUNT)`` (see ``test_shards.state``) to TARGET with
``max_shard_size="50KB"``: one 40 KB tensor per shard. When a log record of
``torchkeep.shards`` contains STOP_AT, it prints ``reached`` and blocks reading
stdin, so the parent kills it at exactly that step, with no timing involved.
"""

from __future__ import annotations

import logging
import sys

import torch

import torchkeep


class StopAt(logging.Handler):
    def __init__(self, marker: str) -> None:
        super().__init__(logging.DEBUG)
        self.marker = marker

    def emit(self, record: logging.LogRecord) -> None:
        if self.marker in record.getMessage():
            sys.stdout.write("reached\n")
            sys.stdout.flush()
            sys.stdin.read()  # until killed


def state(seed: int, count: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(100, 100, generator=generator) for i in range(count)}


def main() -> None:
    target, seed, count, stop_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    logger = logging.getLogger("torchkeep.shards")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(StopAt(stop_at))
    torchkeep.save_weights(state(seed, count), target, max_shard_size="50KB")
    sys.stdout.write("done\n")


if __name__ == "__main__":
    main()
