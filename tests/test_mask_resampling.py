"""brain3d.data.nifti.resize_mask and its use in preprocess_volume: binary masks are resampled linearly then
thresholded (as brain3d.augment warps them) and no lesion is lost, where nearest-neighbour downsampling deletes
small ones. The cases are hand-computable: a 2x downsampling with ``align_corners=False`` samples output voxel
``j`` at input coordinate ``2j + 0.5``, i.e. it averages input voxels ``2j`` and ``2j + 1`` per axis, whereas
"nearest-exact" takes input voxel ``2j + 1`` only."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from brain3d.data import cache
from brain3d.data.nifti import resize_mask, resize_volume
from brain3d.data.preprocess import preprocess_volume

STRUCTURE = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity, as brain3d.evaluation counts lesions
NONE = {"normalization": "none"}


def components(mask: np.ndarray) -> int:
    return ndimage.label(mask, structure=STRUCTURE)[1]


def three_voxel_lesion() -> np.ndarray:
    """Voxels x = 20, 21, 22 at y = z = 10 (even y and z: the odd voxels nearest-exact samples miss it)."""
    mask = np.zeros((64, 64, 64), dtype=np.uint8)
    mask[20:23, 10, 10] = 1
    return mask


def sphere(n: int, radius: float, centre: float) -> np.ndarray:
    g = np.indices((n, n, n), dtype=np.float64) + 0.5 - centre  # voxel centres
    return (np.sqrt((g**2).sum(0)) <= radius).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------
# resize_mask
# ---------------------------------------------------------------------------------------------------------


def test_a_three_voxel_lesion_lost_by_nearest_survives_downsampling_as_one_component():
    mask = three_voxel_lesion()
    assert not resize_volume(mask, (32, 32, 32), "nearest").any()  # the old path deletes it
    # linear alone does too: output x = 10 averages x 20, 21 (1), y and z average 10 (1) and 11 (0): 1/4
    linear = resize_volume(mask, (32, 32, 32), "trilinear")
    assert linear.max() == pytest.approx(0.25) and linear[10, 5, 5] == pytest.approx(0.25)
    out = resize_mask(mask, (32, 32, 32))
    assert out.dtype == np.uint8 and out.shape == (32, 32, 32)
    assert components(out) == 1
    np.testing.assert_array_equal(np.argwhere(out), [[10, 5, 5]])  # its highest interpolated value


def test_a_single_voxel_survives_2x_and_4x_downsampling():
    mask = np.zeros((64, 64, 64), dtype=np.uint8)
    mask[20, 10, 10] = 1
    assert not resize_volume(mask, (32, 32, 32), "nearest").any()
    np.testing.assert_array_equal(np.argwhere(resize_mask(mask, (32, 32, 32))), [[10, 5, 5]])  # value 1/8
    # 4x: output j samples input 4j + 1.5, so voxel 20 = 4 * 5 gets no linear weight at all; the output voxel
    # whose extent [20, 24) holds it is taken instead
    assert not resize_volume(mask, (16, 16, 16), "trilinear").any()
    np.testing.assert_array_equal(np.argwhere(resize_mask(mask, (16, 16, 16))), [[5, 2, 2]])


def test_two_lesions_far_apart_stay_two_components():
    mask = three_voxel_lesion()
    mask[40:43, 50, 30] = 1
    out = resize_mask(mask, (32, 32, 32))
    assert components(mask) == 2 and components(out) == 2
    np.testing.assert_array_equal(np.argwhere(out), [[10, 5, 5], [20, 25, 15]])


def test_hundreds_of_small_lesions_are_all_kept():
    mask = np.zeros((64, 64, 64), dtype=np.uint8)
    mask[::8, ::8, ::8] = 1  # 512 isolated voxels at even coordinates: nearest keeps none of them
    assert not resize_volume(mask, (32, 32, 32), "nearest").any()
    out = resize_mask(mask, (32, 32, 32))
    assert components(out) == 512
    expected = np.zeros((32, 32, 32), dtype=np.uint8)
    expected[::4, ::4, ::4] = 1
    np.testing.assert_array_equal(out, expected)


def test_a_large_sphere_keeps_its_volume_and_needs_no_rescue():
    radius = 16.0
    mask = sphere(96, radius, 48.0)  # 1 mm voxels
    out = resize_mask(mask, (48, 48, 48))  # 2 mm voxels
    assert out.dtype == np.uint8 and set(np.unique(out)) == {0, 1}
    volume_mm3 = out.sum() * 2.0**3
    assert volume_mm3 == pytest.approx(4 / 3 * np.pi * radius**3, rel=0.04)
    assert components(out) == 1
    # nothing vanished: exactly the image's interpolation thresholded at 0.5, as brain3d.augment does
    np.testing.assert_array_equal(out, resize_volume(mask, (48, 48, 48), "trilinear") >= 0.5)


def test_identity_returns_the_mask_unchanged_and_empty_stays_empty():
    rng = np.random.default_rng(0)
    mask = (rng.random((17, 12, 9)) > 0.7).astype(np.uint8)
    same = resize_mask(mask, (17, 12, 9))
    assert same.dtype == np.uint8 and same is not mask
    np.testing.assert_array_equal(same, mask)
    np.testing.assert_array_equal(resize_mask(mask.astype(bool), mask.shape), mask)
    for shape in [(8, 6, 4), (34, 24, 18), (9, 24, 4), (17, 12, 9)]:
        empty = resize_mask(np.zeros((17, 12, 9), dtype=np.uint8), shape)
        assert empty.shape == shape and empty.dtype == np.uint8 and not empty.any()


def test_upsampling_is_nearest_neighbour_and_loses_nothing():
    rng = np.random.default_rng(1)
    mask = (rng.random((9, 11, 7)) > 0.6).astype(np.uint8)
    np.testing.assert_array_equal(resize_mask(mask, (18, 22, 14)), mask.repeat(2, 0).repeat(2, 1).repeat(2, 2))
    np.testing.assert_array_equal(resize_mask(mask, (13, 30, 8)), resize_volume(mask, (13, 30, 8), "nearest"))
    single = np.zeros((4, 4, 4), dtype=np.uint8)
    single[1, 2, 3] = 1
    up = resize_mask(single, (8, 8, 8))  # a lone voxel becomes its 2x2x2 block (linear + threshold: nothing)
    np.testing.assert_array_equal(np.argwhere(up), np.argwhere(np.ones((2, 2, 2))) + [2, 4, 6])


def test_mixed_axes_downsample_linearly_and_upsample_by_nearest():
    mask = np.zeros((64, 64, 32), dtype=np.uint8)
    mask[20, 10, 10] = 1
    out = resize_mask(mask, (32, 32, 64))  # x, y halved (value 1/4: vanishes, put back), z doubled (replicated)
    np.testing.assert_array_equal(np.argwhere(out), [[10, 5, 20], [10, 5, 21]])
    assert components(out) == 1


def test_label_maps_are_refused():
    labels = np.zeros((8, 8, 8), dtype=np.uint8)
    labels[2:4, 2:4, 2:4] = 2
    with pytest.raises(ValueError, match="binary 0/1 mask"):
        resize_mask(labels, (4, 4, 4))
    with pytest.raises(ValueError, match="binary 0/1 mask"):
        resize_mask(labels.astype(np.float32) / 4, (4, 4, 4))
    with pytest.raises(ValueError, match="3 positive ints"):
        resize_mask(labels > 0, (4, 4))


# ---------------------------------------------------------------------------------------------------------
# preprocess_volume
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings", [
    {"mode": "resize", "shape": [32, 32, 32], **NONE},
    {"mode": "spacing", "spacing": [2.0, 2.0, 2.0], **NONE},
])
def test_preprocess_keeps_a_three_voxel_lesion(settings):
    mask = three_voxel_lesion()
    image = np.ones(mask.shape, dtype=np.float32)
    _, mask_out, info = preprocess_volume(image, (1.0, 1.0, 1.0), settings, mask)
    assert info.output_shape == (32, 32, 32) and mask_out.dtype == np.uint8
    assert components(mask_out) == 1
    np.testing.assert_array_equal(np.argwhere(mask_out), [[10, 5, 5]])


def test_preprocess_keeps_a_lesion_at_a_coarse_non_integer_spacing():
    mask = three_voxel_lesion()
    image = np.ones(mask.shape, dtype=np.float32)
    _, mask_out, info = preprocess_volume(image, (1.0, 1.0, 1.0), {"mode": "spacing", "spacing": [3.0] * 3, **NONE},
                                          mask)
    assert info.resampled_shape == (21, 21, 21)  # round(64 / 3)
    assert components(mask_out) == 1 and mask_out.sum() >= 1


def test_preprocess_sphere_volume_in_mm3_and_native_spacing_is_exact():
    radius = 16.0
    mask = sphere(96, radius, 48.0)
    image = np.ones(mask.shape, dtype=np.float32)
    _, mask_out, info = preprocess_volume(image, (1.0, 1.0, 1.0), {"mode": "resize", "shape": [64, 48, 40], **NONE},
                                          mask)
    assert mask_out.dtype == np.uint8 and set(np.unique(mask_out)) == {0, 1}
    volume_mm3 = mask_out.sum() * np.prod(info.output_spacing_mm)
    assert volume_mm3 == pytest.approx(4 / 3 * np.pi * radius**3, rel=0.04)
    _, same, _ = preprocess_volume(image, (1.0, 1.0, 1.0), {"mode": "spacing", **NONE}, mask)
    np.testing.assert_array_equal(same, mask)


def test_preprocess_resamples_label_maps_with_nearest():
    labels = np.zeros((16, 16, 16), dtype=np.uint8)
    labels[3:9, 3:9, 3:9] = 1
    labels[10:14, 9:15, 2:7] = 2
    image = np.ones(labels.shape, dtype=np.float32)
    _, out, _ = preprocess_volume(image, (1.0, 1.0, 1.0), {"mode": "resize", "shape": [8, 8, 8], **NONE}, labels)
    np.testing.assert_array_equal(out, resize_volume(labels, (8, 8, 8), "nearest"))


# ---------------------------------------------------------------------------------------------------------
# The disk cache
# ---------------------------------------------------------------------------------------------------------


def test_caches_of_nearest_neighbour_masks_are_not_reused(tmp_path, monkeypatch):
    """The key includes CACHE_VERSION, bumped to 3 for resize_mask: entries filled before get other keys."""
    image_path, mask_path = tmp_path / "img.nii.gz", tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), dtype=np.float32), np.eye(4)), str(image_path))
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), dtype=np.uint8), np.eye(4)), str(mask_path))
    settings = {"mode": "resize", "shape": [4, 4, 4]}
    assert cache.CACHE_VERSION >= 3
    key = cache.cache_key(image_path, mask_path, settings)
    monkeypatch.setattr(cache, "CACHE_VERSION", 2)
    assert cache.cache_key(image_path, mask_path, settings) != key
