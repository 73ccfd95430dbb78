"""A tiny class-conditioned Flux DiT trained on scikit-learn's 8x8 digits (shipped, a few MB), its
pipeline and a digit classifier: a real model to cache, and a quality score to judge the result."""
from __future__ import annotations

import os

import torch

MODEL_DIR = os.path.join(os.path.dirname(__file__), "model")


def load_digits_pipeline(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """The shipped pipeline (:class:`~cachedit_fx.digits.pipeline.DigitsPipeline`) in ``dtype``
    (the weights are stored in fp16), progress bar off."""
    from .pipeline import DigitsPipeline

    pipe = DigitsPipeline.from_pretrained(MODEL_DIR, dtype=dtype).to(device)
    pipe.transformer.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe
