"""A digit classifier scoring generated images against their labels: the stand-in, on this tiny model,
for the CLIP / ImageReward scores of real text-to-image models. A support-vector machine fitted at use
time on the same dataset the model learnt (deterministic, about a second)."""
from __future__ import annotations

import numpy as np
import torch

from . import data


class DigitClassifier:
    """``accuracy(images, labels)``: the share of images classified as their label."""

    def __init__(self):
        from sklearn.svm import SVC

        images, labels = data.load_dataset()
        self._svm = SVC(gamma=0.001, C=10.0).fit(self._features(images), labels)

    @staticmethod
    def _features(images) -> np.ndarray:
        # the dataset's own scale: 64 pixel values in 0..16
        return ((np.asarray(images, dtype=np.float32).reshape(len(images), -1) + 1) * 8.0).clip(0, 16)

    def predict(self, images) -> np.ndarray:
        """Labels of ``images``: a pipeline's "pt" ``(B, 1, 8, 8)`` or "np" ``(B, 8, 8, 1)`` output in [0, 1]."""
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().float().numpy()
        images = np.asarray(images, dtype=np.float32)
        if images.size % (data.SIDE * data.SIDE) or images.ndim < 2:
            raise ValueError(f"images must be 8x8 digits ((B, 1, 8, 8) or (B, 8, 8, 1)), got shape {images.shape}")
        return self._svm.predict(self._features(images.reshape(-1, data.SIDE * data.SIDE) * 2 - 1))

    def accuracy(self, images, labels) -> float:
        labels = np.asarray(labels).reshape(-1)
        predicted = self.predict(images)
        if len(predicted) != len(labels):
            raise ValueError(f"accuracy: {len(predicted)} images for {len(labels)} labels")
        return float((predicted == labels).mean())
