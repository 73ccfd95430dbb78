"""scikit-learn's bundled 8x8 digits as the trained model sees them: pixels in [-1, 1] packed into 2x2
patches (16 tokens of 4 channels, Flux's latent packing), labels as one-hot conditions with a null class.

The model, its training script and the classifier share these conversions, so an image means the same
thing everywhere."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import MissingDependency

SIDE = 8  # the dataset's images are SIDE x SIDE, values 0..16
PATCH = 2
TOKENS = (SIDE // PATCH) ** 2
CHANNELS = PATCH * PATCH
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # the unconditional branch of classifier-free guidance
CONDITION_DIM = NUM_CLASSES + 1


def load_dataset() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 digits as ``(N, 8, 8)`` float images in [-1, 1] and their labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise MissingDependency("the digits dataset and classifier come from scikit-learn: "
                                "pip install 'cachedit-fx[cli]' (or scikit-learn)") from None
    digits = load_digits()
    return digits.images.astype(np.float32) / 8.0 - 1.0, digits.target.astype(np.int64)


def pack(images: torch.Tensor) -> torch.Tensor:
    """``(B, 8, 8)`` images -> ``(B, 16, 4)`` tokens."""
    b = images.shape[0]
    grid = SIDE // PATCH
    return images.reshape(b, grid, PATCH, grid, PATCH).permute(0, 1, 3, 2, 4).reshape(b, TOKENS, CHANNELS)


def unpack(tokens: torch.Tensor) -> torch.Tensor:
    """``(B, 16, 4)`` tokens -> ``(B, 8, 8)`` images."""
    b = tokens.shape[0]
    grid = SIDE // PATCH
    return tokens.reshape(b, grid, grid, PATCH, PATCH).permute(0, 1, 3, 2, 4).reshape(b, SIDE, SIDE)


def condition(labels: torch.Tensor) -> torch.Tensor:
    """One-hot ``(B, 11)`` conditions of labels 0..9 or NULL_CLASS."""
    return torch.nn.functional.one_hot(labels.long(), CONDITION_DIM).float()


def image_ids() -> torch.Tensor:
    """Flux's positional ids of the token grid: ``(16, 3)`` rows of ``(0, row, col)``."""
    grid = torch.arange(SIDE // PATCH).float()
    return torch.stack(torch.meshgrid(torch.zeros(1), grid, grid, indexing="ij"), -1).reshape(-1, 3)


def text_ids() -> torch.Tensor:
    """The single condition token's ids."""
    return torch.zeros(1, 3)
