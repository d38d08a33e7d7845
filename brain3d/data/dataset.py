"""Torch dataset over checked manifest subjects: preprocess (or read the cache), then optionally a patch.

Augmentation is not done here: it runs on the training device on whole batches (brain3d.augment), so
DataLoader workers only read (memory-mapped) preprocessed volumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from brain3d.data.cache import cached_volume
from brain3d.data.channels import load_channels
from brain3d.data.manifest import Subject
from brain3d.data.nifti import load_mask_or_labels
from brain3d.data.patches import sample_training_patch
from brain3d.data.preprocess import PreprocessInfo, preprocess_volume
from brain3d.tasks import KINDS


def load_preprocessed(
    subject: Subject, settings: Mapping, with_mask: bool, cache_dir: Path | None = None, num_classes: int = 1
) -> tuple[np.ndarray, np.ndarray | None, PreprocessInfo]:
    """A subject's preprocessed image (and mask): from the disk cache when ``cache_dir`` is set (filled on
    a miss, returned memory-mapped), else decoded and preprocessed now. The image is (D, H, W), or (C, D, H, W)
    for a subject with several channels (``Subject.images``: each on the first one's grid). ``num_classes``
    K >= 2: the mask is a multi-class label map (labels 0..K, resampled per label)."""
    mask_path = subject.mask if with_mask else None
    paths = subject.image_paths
    if cache_dir is not None:
        return cached_volume(paths if len(paths) > 1 else paths[0], mask_path, settings, cache_dir, num_classes)
    image_ras, _, grid = load_channels(paths)
    mask_ras = load_mask_or_labels(mask_path, num_classes)
    return preprocess_volume(image_ras, grid.voxel_size_mm, settings, mask_ras, num_classes)


class VolumeDataset(Dataset):
    """Yields ``{"image": (C, D, H, W) float32, "target": (1,) float32 or mask (1, D, H, W) float32,
    "subject_id": str}``; C is the number of channels (``data.image_col``'s columns; 1 for one column).

    Args:
        subjects: checked manifest rows.
        task: "classification", "regression" or "segmentation" (segmentation returns the mask as target).
        settings: preprocessing settings (the ``preprocess`` config group; see brain3d.data.preprocess).
        cache_dir: folder of the preprocessed-volume cache, or None to preprocess on every read.
        patch_size: (D, H, W) of random training patches (segmentation), or None for whole volumes.
        foreground_fraction: share of patches centred on a foreground (lesion) voxel. Default 0.33 (nnU-Net).
        heads: task="multitask": ``(head name, kind)`` per head; items then hold ``"target"`` and ``"labelled"``
            as ``{head: tensor}`` (the mask (1, D, H, W) for the segmentation head, else (1,); an unlabelled
            head gets zeros and ``labelled`` 0.0).
        seed: base of the patch randomness. Each item's patch comes from ``(seed, epoch, index)``, so it is the
            same whatever the number of workers and after a resume (call :meth:`set_epoch` each epoch).
        num_classes: the segmentation head's labels (task.num_classes): 1 (default) binary masks; K >= 2 integer
            label maps 0..K (the target then holds the labels, as float32).
    """

    def __init__(
        self,
        subjects: Sequence[Subject],
        task: str,
        settings: Mapping,
        cache_dir: Path | None = None,
        patch_size: Sequence[int] | None = None,
        foreground_fraction: float = 0.33,
        seed: int = 0,
        heads: Sequence[tuple[str, str]] | None = None,
        num_classes: int = 1,
    ):
        if not 0.0 <= foreground_fraction <= 1.0:
            raise ValueError(f"data.foreground_fraction must be in [0, 1], got {foreground_fraction}")
        self.subjects = list(subjects)
        self.task = task
        self.settings = dict(settings)
        self.cache_dir = cache_dir
        self.patch_size = tuple(int(p) for p in patch_size) if patch_size else None
        self.foreground_fraction = foreground_fraction
        self.seed = seed
        self.epoch = 0
        self.heads = [tuple(h) for h in heads] if heads else None
        self.num_classes = int(num_classes)  # the segmentation head's labels: 1 binary masks, K >= 2 label maps

    @property
    def with_mask(self) -> bool:
        """Items carry a mask (segmentation, or a multi-task run with a segmentation head)."""
        if self.task in KINDS:
            return KINDS[self.task].reads_mask
        return any(KINDS[kind].reads_mask for _, kind in self.heads or ())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.subjects)

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        epoch = self.epoch
        if isinstance(index, tuple):  # (index, epoch) from a ResumableBatchSampler with set_epoch (persistent workers)
            index, epoch = index
        sample, index = index, index % len(self.subjects)  # data.samples_per_volume: sample s is volume s % N
        subject = self.subjects[index]
        image, mask, _ = load_preprocessed(subject, self.settings, self.with_mask and subject.mask is not None,
                                           self.cache_dir, self.num_classes)
        if self.patch_size is not None:
            rng = np.random.default_rng([self.seed, epoch, sample])  # each sample of a volume its own patch
            image, mask = sample_training_patch(image, mask, self.patch_size, rng, self.foreground_fraction)
        # np.array copies: memory-mapped cache entries are read-only and must not be shared with torch
        item = {"image": channels_first(torch.from_numpy(np.array(image, dtype=np.float32))),
                "subject_id": subject.subject_id}
        if self.heads:
            item["target"], item["labelled"] = head_targets(self.heads, subject, mask, image.shape[-3:])
        elif mask is not None:
            item["target"] = torch.from_numpy(np.array(mask, dtype=np.float32))[None]
        else:
            item["target"] = torch.tensor([subject.target], dtype=torch.float32)
        return item


def channels_first(image: torch.Tensor) -> torch.Tensor:
    """A preprocessed image as (C, D, H, W): one channel's (D, H, W) gets its channel axis."""
    return image[None] if image.dim() == 3 else image


def head_targets(heads: Sequence[tuple[str, str]], subject: Subject, mask: np.ndarray | None,
                 spatial_shape: Sequence[int]) -> tuple[dict, dict]:
    """task=multitask: ``({head: target tensor}, {head: (1,) float 1.0 labelled / 0.0 not})`` of one subject.
    A segmentation head's target is the mask (1, D, H, W) (zeros without one); the others' (1,)."""
    targets, labelled = {}, {}
    for name, kind in heads:
        if KINDS[kind].reads_mask:
            has = mask is not None
            targets[name] = (torch.from_numpy(np.array(mask, dtype=np.float32))[None] if has
                             else torch.zeros((1, *spatial_shape), dtype=torch.float32))
        else:
            value = subject.labels.get(name)
            has = value is not None
            targets[name] = torch.tensor([value if has else 0.0], dtype=torch.float32)
        labelled[name] = torch.tensor([1.0 if has else 0.0])
    return targets, labelled
