"""The dataset: the same array from any stored orientation, cache or not, seeded patches."""

from __future__ import annotations

import numpy as np
import torch

from brain3d.data.dataset import VolumeDataset
from brain3d.data.manifest import Subject
from brain3d.data.nifti import save_nifti

RESIZE = {"mode": "resize", "shape": [16, 16, 16]}


def make_subject(tmp_path, name, flip_x=False):
    rng = np.random.default_rng(0)
    image = rng.random((16, 16, 16)).astype(np.float32) + 1.0
    mask = (image > 1.8).astype(np.uint8)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    if flip_x:  # the same scan stored left-to-right (LAS): flip the array and the affine's x axis
        image, mask = image[::-1].copy(), mask[::-1].copy()
        affine = affine.copy()
        affine[0, 0], affine[0, 3] = -2.0, 30.0
    save_nifti(image, affine, tmp_path / f"{name}.nii.gz")
    save_nifti(mask, affine, tmp_path / f"{name}_mask.nii.gz")
    return Subject(name, tmp_path / f"{name}.nii.gz", 1, None, tmp_path / f"{name}_mask.nii.gz")


def test_las_copy_gives_the_same_item_as_ras(tmp_path):
    ras, las = make_subject(tmp_path, "ras"), make_subject(tmp_path, "las", flip_x=True)
    a = VolumeDataset([ras], "segmentation", RESIZE)[0]
    b = VolumeDataset([las], "segmentation", RESIZE)[0]
    torch.testing.assert_close(a["image"], b["image"])
    torch.testing.assert_close(a["target"], b["target"])
    assert a["image"].shape == (1, 16, 16, 16) and a["target"].shape == (1, 16, 16, 16)


def test_cached_items_equal_fresh_ones(tmp_path):
    subject = make_subject(tmp_path, "s")
    fresh = VolumeDataset([subject], "segmentation", RESIZE)[0]
    cached = VolumeDataset([subject], "segmentation", RESIZE, cache_dir=tmp_path / "cache")
    first, second = cached[0], cached[0]  # a miss that fills the cache, then a hit
    for item in (first, second):
        torch.testing.assert_close(item["image"], fresh["image"])
        torch.testing.assert_close(item["target"], fresh["target"])
    assert list((tmp_path / "cache").rglob("*.npy"))
    second["image"] += 1  # items are writable copies, not views of the read-only cache
    torch.testing.assert_close(cached[0]["image"], fresh["image"])


def test_patches_are_seeded_per_epoch_and_index(tmp_path):
    subject = make_subject(tmp_path, "s")
    data = VolumeDataset([subject] * 4, "segmentation", RESIZE, patch_size=(8, 8, 8), foreground_fraction=0.5, seed=1)
    epoch0 = [data[i]["image"] for i in range(4)]
    assert all(x.shape == (1, 8, 8, 8) for x in epoch0)
    assert all(torch.equal(x, data[i]["image"]) for i, x in enumerate(epoch0))
    data.set_epoch(1)
    assert not all(torch.equal(x, data[i]["image"]) for i, x in enumerate(epoch0))


def test_resampling_to_data_shape_and_zscore(tmp_path):
    subject = make_subject(tmp_path, "s")
    item = VolumeDataset([subject], "segmentation", {"mode": "resize", "shape": [32, 32, 32]})[0]
    assert item["image"].shape == (1, 32, 32, 32)
    assert set(torch.unique(item["target"]).tolist()) <= {0.0, 1.0}
    inside = item["image"][item["image"] != 0]
    assert abs(inside.mean().item()) < 0.05 and abs(inside.std().item() - 1) < 0.05
