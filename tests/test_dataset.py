"""The dataset: the same array from any stored orientation, flips shared by image and mask, seeded."""

from __future__ import annotations

import numpy as np
import torch

from brain3d.data.dataset import VolumeDataset
from brain3d.data.manifest import Subject
from brain3d.data.nifti import save_nifti


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
    a = VolumeDataset([ras], (16, 16, 16), "segmentation")[0]
    b = VolumeDataset([las], (16, 16, 16), "segmentation")[0]
    torch.testing.assert_close(a["image"], b["image"])
    torch.testing.assert_close(a["target"], b["target"])
    assert a["image"].shape == (1, 16, 16, 16) and a["target"].shape == (1, 16, 16, 16)


def test_flips_are_shared_by_image_and_mask_and_seeded(tmp_path):
    subject = make_subject(tmp_path, "s")
    plain = VolumeDataset([subject], (16, 16, 16), "segmentation")[0]
    flipping = VolumeDataset([subject], (16, 16, 16), "segmentation", flip_prob=1.0)
    item = flipping[0]
    torch.testing.assert_close(item["image"], plain["image"].flip(1, 2, 3))
    torch.testing.assert_close(item["target"], plain["target"].flip(1, 2, 3))

    half = VolumeDataset([subject] * 8, (16, 16, 16), "segmentation", flip_prob=0.5, seed=1)
    epoch0 = [half[i]["image"] for i in range(8)]
    assert [torch.equal(x, y) for x, y in zip(epoch0, [half[i]["image"] for i in range(8)])] == [True] * 8
    half.set_epoch(1)
    assert not all(torch.equal(x, half[i]["image"]) for i, x in enumerate(epoch0))


def test_resampling_to_data_shape_and_zscore(tmp_path):
    subject = make_subject(tmp_path, "s")
    item = VolumeDataset([subject], (32, 32, 32), "segmentation")[0]
    assert item["image"].shape == (1, 32, 32, 32)
    assert set(torch.unique(item["target"]).tolist()) <= {0.0, 1.0}
    inside = item["image"][item["image"] != 0]
    assert abs(inside.mean().item()) < 0.05 and abs(inside.std().item() - 1) < 0.05
