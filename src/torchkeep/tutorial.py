"""The model and data of the "saving and loading models" walkthrough (``torchkeep demo``).

``TheModelClass`` has parameters *and* buffers (BatchNorm's running
statistics) and a Dropout, so it shows every trap of saving and inference.
The data is scikit-learn's handwritten digits (shipped inside the package, no
download), upscaled to 3x26x26; without scikit-learn a synthetic set of the
same shape stands in.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["TheModelClass", "digits_dataset"]

IMAGE_SIZE = 26


class TheModelClass(nn.Module):
    """Conv2d(3,16,3,stride 2) → BatchNorm2d → ReLU → MaxPool2d → Dropout → Linear(576,1000) → Linear(1000,1).

    Takes ``[N, 3, 26, 26]`` images and returns one logit per image.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, stride=2)
        self.bn = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.dropout = nn.Dropout(0.25)
        self.fc1 = nn.Linear(16 * 6 * 6, 1000)
        self.fc2 = nn.Linear(1000, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.bn(self.conv(x))))
        x = self.dropout(torch.flatten(x, 1))
        logits: torch.Tensor = self.fc2(self.relu(self.fc1(x)))
        return logits


def _to_images(pixels: torch.Tensor) -> torch.Tensor:
    """``[N, 8, 8]`` grey digits in 0..16 → ``[N, 3, 26, 26]`` in 0..1."""
    images = F.interpolate(pixels.unsqueeze(1) / 16.0, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear")
    return images.expand(-1, 3, -1, -1).contiguous()


def digits_dataset(*, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Images ``[N, 3, 26, 26]``, binary labels ``[N]`` (digit ≥ 5), and the data set's name.

    Uses scikit-learn's digits (1,797 real 8x8 scans) when scikit-learn is
    installed, else 1,800 synthetic images of the same shape.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        generator = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, 2, (1800,), generator=generator)
        pixels = torch.rand(1800, 8, 8, generator=generator) * 8
        pixels[labels == 1, :4, :4] += 8  # class 1 has a bright corner: learnable in a few steps
        return _to_images(pixels), labels.float(), "synthetic digits (scikit-learn not installed)"
    digits = load_digits()
    pixels = torch.tensor(digits.images, dtype=torch.float32)
    labels = (torch.tensor(digits.target) >= 5).float()
    return _to_images(pixels), labels, "scikit-learn digits"
