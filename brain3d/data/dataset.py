"""Torch dataset over checked manifest subjects: read NIfTI (RAS), fit to ``data.shape``, z-score, flip."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from brain3d.data.manifest import Subject
from brain3d.data.nifti import load_mask, load_nifti, resize_volume, zscore_nonzero


def preprocess_image(image_ras: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """The image preprocessing shared by training and prediction.

    Resample the whole RAS volume to ``shape`` (trilinear, :func:`resize_volume`), then
    z-score with the nonzero voxels' statistics (:func:`zscore_nonzero`).

    Args:
        image_ras: 3-D array as :func:`load_nifti` returns it (RAS order).
        shape: target (D, H, W).

    Returns:
        float32 array of shape ``shape``.
    """
    return zscore_nonzero(resize_volume(image_ras, shape, "trilinear"))


class VolumeDataset(Dataset):
    """Yields ``{"image": (1, D, H, W) float32, "target": (1,) float32 or mask (1, D, H, W) float32,
    "subject_id": str}``.

    Args:
        subjects: checked manifest rows.
        shape: (D, H, W) every volume is resampled to (trilinear for images, nearest for masks).
        task: "classification", "regression" or "segmentation" (segmentation returns the mask as target).
        flip_prob: probability of flipping each spatial axis (image and mask together). 0 for validation.
        seed: base of the flip randomness. Each item's flips come from ``(seed, epoch, index)``, so they are
            the same whatever the number of workers and after a resume (call :meth:`set_epoch` each epoch).
    """

    def __init__(self, subjects: Sequence[Subject], shape: Sequence[int], task: str, flip_prob: float = 0.0, seed: int = 0):
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"data.flip_prob must be in [0, 1], got {flip_prob}")
        self.subjects = list(subjects)
        self.shape = tuple(int(s) for s in shape)
        self.task = task
        self.flip_prob = flip_prob
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.subjects)

    def __getitem__(self, index: int) -> dict:
        subject = self.subjects[index]
        image, _ = load_nifti(subject.image)  # (X, Y, Z) in RAS order
        image = preprocess_image(image, self.shape)
        mask = None
        if self.task == "segmentation":
            mask, _ = load_mask(subject.mask)
            mask = resize_volume(mask.astype(np.float32), self.shape, "nearest")
        if self.flip_prob > 0:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            axes = tuple(a for a in range(3) if rng.random() < self.flip_prob)
            if axes:
                image = np.flip(image, axes)
                mask = np.flip(mask, axes) if mask is not None else None
        item = {"image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None], "subject_id": subject.subject_id}
        if mask is not None:
            item["target"] = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None]
        else:
            item["target"] = torch.tensor([subject.target], dtype=torch.float32)
        return item
