"""brain3d.data.preprocess: every step against hand-made volumes, inversion, settings, and the file
formats / headers / orientations that must all preprocess to the same thing."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from brain3d.data.nifti import load_mask, load_nifti_with_grid, resize_volume, zscore_nonzero
from brain3d.data.preprocess import (
    PreprocessInfo,
    centre_crop_or_pad,
    foreground_bbox,
    invert_geometry,
    output_affine,
    percentile_nonzero,
    preprocess_volume,
    settings_hash,
    validate_settings,
)

NATIVE = {"mode": "spacing", "spacing": None, "normalization": "none"}  # geometry only, values kept


def spacing(**kw) -> dict:
    return {**NATIVE, **kw}


# ---------------------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------------------


def test_resample_2mm_to_1mm_doubles_shape_and_mask_stays_binary():
    rng = np.random.default_rng(0)
    image = np.broadcast_to(np.arange(10, dtype=np.float32)[:, None, None] + 1, (10, 12, 8)).copy()  # ramp on x
    mask = (rng.random((10, 12, 8)) > 0.6).astype(np.uint8)
    out, mask_out, info = preprocess_volume(image, (2.0, 2.0, 2.0), spacing(spacing=[1, 1, 1]), mask)
    assert out.shape == mask_out.shape == info.output_shape == info.resampled_shape == (20, 24, 16)
    assert info.output_spacing_mm == (1.0, 1.0, 1.0)
    assert out.dtype == np.float32 and mask_out.dtype == np.uint8
    # nearest: output voxel i takes input voxel i // 2 (no new values, exactly the upsampled mask)
    assert set(np.unique(mask_out)) <= {0, 1}
    np.testing.assert_array_equal(mask_out, mask.repeat(2, 0).repeat(2, 1).repeat(2, 2))
    # trilinear, align_corners=False: output i samples input (i + 0.5) / 2 - 0.5 (clamped at the borders)
    src = np.clip((np.arange(20) + 0.5) / 2 - 0.5, 0, 9)
    np.testing.assert_allclose(out[:, 5, 5], src + 1, rtol=0, atol=1e-5)


def test_resample_keeps_field_of_view_and_records_effective_spacing():
    image = np.ones((182, 4, 5), dtype=np.float32)
    _, _, info = preprocess_volume(image, (1.0, 1.0, 1.0), spacing(spacing=[1.5, 0.5, 1.0]))
    assert info.resampled_shape == (121, 8, 5)  # round(182 / 1.5) = 121
    assert info.output_spacing_mm == pytest.approx((182 / 121, 0.5, 1.0))


def test_foreground_crop_bbox_plus_margin_exact_indices():
    image = np.zeros((20, 20, 20), dtype=np.float32)
    image[5:9, 3:12, 10] = 1.0
    image[7, 7, 7] = 2.0  # widens axis 2 to 7..10
    assert foreground_bbox(image, 0) == ((5, 3, 7), (9, 12, 11))
    out, _, info = preprocess_volume(image, (1, 1, 1), spacing(crop_foreground=True, foreground_margin=2))
    assert info.crop_start == (3, 1, 5) and info.crop_stop == (11, 14, 13)
    assert info.pad_before == (0, 0, 0) and info.output_shape == (8, 13, 8)
    np.testing.assert_array_equal(out, image[3:11, 1:14, 5:13])
    # the margin is clipped to the volume
    edge = np.zeros((10, 10, 10), dtype=np.float32)
    edge[0:2, 8:10, 4:6] = 1.0
    _, _, info = preprocess_volume(edge, (1, 1, 1), spacing(crop_foreground=True, foreground_margin=3))
    assert info.crop_start == (0, 5, 1) and info.crop_stop == (5, 10, 9)
    # an all-zero image is not cropped
    assert foreground_bbox(np.zeros((4, 5, 6)), 1) == ((0, 0, 0), (4, 5, 6))


def test_centre_crop_and_pad_exact_placement():
    image = np.arange(1, 1001, dtype=np.float32).reshape(10, 10, 10)
    out, _, info = preprocess_volume(image, (1, 1, 1), spacing(shape=[6, 14, 10]))
    expected = np.zeros((6, 14, 10), dtype=np.float32)
    expected[:, 2:12, :] = image[2:8]  # axis 0: (10-6)//2 = 2 cut before; axis 1: (14-10)//2 = 2 zeros before
    np.testing.assert_array_equal(out, expected)
    assert info.crop_start == (2, 0, 0) and info.crop_stop == (8, 10, 10) and info.pad_before == (0, 2, 0)
    assert info.pad_after == (0, 2, 0)
    # odd differences: the extra voxel is cut / padded at the end
    out, _, info = preprocess_volume(image, (1, 1, 1), spacing(shape=[7, 13, 10]))
    expected = np.zeros((7, 13, 10), dtype=np.float32)
    expected[:, 1:11, :] = image[1:8]
    np.testing.assert_array_equal(out, expected)
    assert info.pad_before == (0, 1, 0) and info.pad_after == (0, 2, 0)
    assert centre_crop_or_pad((3, 0, 0), (8, 4, 4), None) == ((3, 0, 0), (8, 4, 4), (0, 0, 0), (5, 4, 4))


def test_centre_crop_is_centred_on_the_foreground_box():
    image = np.zeros((30, 30, 30), dtype=np.float32)
    image[2:12, 10:20, 20:30] = 1.0  # box 10 voxels wide on each axis, off-centre
    out, _, info = preprocess_volume(image, (1, 1, 1), spacing(crop_foreground=True, shape=[6, 14, 10]))
    assert info.crop_start == (4, 10, 20) and info.crop_stop == (10, 20, 30) and info.pad_before == (0, 2, 0)
    assert out.shape == (6, 14, 10) and out[:, 2:12].all() and not out[:, :2].any() and not out[:, 12:].any()


def test_zscore_by_hand_background_stays_zero():
    image = np.zeros((4, 4, 4), dtype=np.float32)
    image[0, 0, :4] = [1, 2, 3, 4]
    out, _, _ = preprocess_volume(image, (1, 1, 1), spacing(normalization="zscore"))
    std = np.sqrt(np.mean((np.array([1, 2, 3, 4]) - 2.5) ** 2))  # population std = 1.1180
    np.testing.assert_allclose(out[0, 0], (np.array([1, 2, 3, 4]) - 2.5) / std, rtol=1e-6)
    assert np.count_nonzero(out) == 4


def test_percentile_by_hand_background_stays_zero():
    image = np.zeros((10, 10, 2), dtype=np.float32)
    image[:, :, 0] = np.arange(1, 101).reshape(10, 10)  # nonzero values 1..100
    out, _, _ = preprocess_volume(image, (1, 1, 1), spacing(normalization="percentile", percentiles=[10, 90]))
    lo, hi = 1 + 99 * 0.10, 1 + 99 * 0.90  # numpy's linear percentile of 1..100: 10.9, 90.1
    expected = (np.clip(np.arange(1, 101), lo, hi) - lo) / (hi - lo)
    np.testing.assert_allclose(out[:, :, 0].ravel(), expected, rtol=1e-6, atol=1e-7)
    assert out[:, :, 0].min() == 0.0 and out[:, :, 0].max() == 1.0
    assert not out[:, :, 1].any()  # background
    # degenerate inputs never divide by zero
    assert not percentile_nonzero(np.zeros((3, 3, 3))).any()
    assert not percentile_nonzero(np.full((3, 3, 3), 5.0)).any()


def test_resize_mode_is_the_historical_preprocessing():
    rng = np.random.default_rng(1)
    image = rng.random((30, 36, 28)).astype(np.float32)
    image[:4] = 0
    mask = (image > 0.9).astype(np.uint8)
    out, mask_out, info = preprocess_volume(image, (1.0, 1.0, 1.5), {"mode": "resize", "shape": [16, 16, 16]}, mask)
    np.testing.assert_array_equal(out, zscore_nonzero(resize_volume(image, (16, 16, 16), "trilinear")))
    assert mask_out.shape == (16, 16, 16) and set(np.unique(mask_out)) <= {0, 1}
    assert info.output_spacing_mm == pytest.approx((30 / 16, 36 / 16, 28 * 1.5 / 16))


# ---------------------------------------------------------------------------------------------------------
# Inversion
# ---------------------------------------------------------------------------------------------------------


def test_invert_round_trip_native_spacing_with_crop_is_exact():
    rng = np.random.default_rng(2)
    image = np.zeros((24, 20, 18), dtype=np.float32)
    image[4:19, 3:15, 6:16] = rng.random((15, 12, 10)).astype(np.float32) + 0.1
    mask = (image > 0.8).astype(np.uint8)
    out, mask_out, info = preprocess_volume(image, (1, 1, 1), spacing(crop_foreground=True, foreground_margin=1), mask)
    assert out.shape == (17, 14, 12)
    back = invert_geometry(out, info, "trilinear")
    assert back.shape == image.shape and back.dtype == np.float32
    np.testing.assert_array_equal(back, image)  # the crop region is exact and outside it the image was 0
    back_mask = invert_geometry(mask_out, info, "nearest")
    assert back_mask.dtype == np.uint8
    np.testing.assert_array_equal(back_mask, mask)


def test_invert_crop_and_pad_places_the_region_exactly():
    image = np.arange(1, 1 + 12 * 10 * 8, dtype=np.float32).reshape(12, 10, 8)
    out, _, info = preprocess_volume(image, (1, 1, 1), spacing(shape=[8, 14, 8]))
    back = invert_geometry(out, info, "trilinear")
    expected = np.zeros_like(image)
    expected[2:10] = image[2:10]  # axis 0 lost 2 voxels on each side; the padding of axis 1 is dropped
    np.testing.assert_array_equal(back, expected)
    with pytest.raises(ValueError, match="expected an array of shape"):
        invert_geometry(out[:-1], info, "trilinear")
    with pytest.raises(ValueError, match="mode"):
        invert_geometry(out, info, "cubic")


def test_invert_resampling_2mm_round_trip_of_a_mask_is_exact():
    rng = np.random.default_rng(3)
    mask = (rng.random((9, 11, 7)) > 0.5).astype(np.uint8)
    image = mask.astype(np.float32) + 1.0
    # pads only
    _, mask_out, info = preprocess_volume(image, (2, 2, 2), spacing(spacing=[1, 1, 1], shape=[20, 24, 16]), mask)
    back = invert_geometry(mask_out, info, "nearest")
    assert back.shape == (9, 11, 7)
    np.testing.assert_array_equal(back, mask)


def test_output_affine_maps_output_voxels_to_the_same_world_points():
    ras_affine = np.diag([2.0, 2.0, 3.0, 1.0])
    ras_affine[:3, 3] = [-10, 5, 7]
    image = np.ones((10, 10, 10), dtype=np.float32)
    _, _, info = preprocess_volume(image, (2, 2, 3), spacing(spacing=[1, 1, 1], shape=[16, 24, 30]))
    aff = output_affine(ras_affine, info)
    np.testing.assert_allclose(np.sqrt((aff[:3, :3] ** 2).sum(0)), info.output_spacing_mm)
    # output voxel (pad_before) is resampled voxel crop_start = input position (crop_start + .5) * scale - .5
    o = np.array([*info.pad_before, 1.0])
    scale = np.array(info.ras_shape) / np.array(info.resampled_shape)
    src = (np.array(info.crop_start) + 0.5) * scale - 0.5
    np.testing.assert_allclose(aff @ o, ras_affine @ np.array([*src, 1.0]))


def test_info_round_trips_through_json_and_torch(tmp_path):
    image = np.ones((10, 12, 14), dtype=np.float32)
    _, _, info = preprocess_volume(image, (1.2, 1.2, 1.5), spacing(spacing=[1, 1, 1], shape=[8, 20, 20]))
    d = info.to_dict()
    assert all(isinstance(v, list) and all(type(x) in (int, float) for x in v) for v in d.values())
    assert PreprocessInfo.from_dict(json.loads(json.dumps(d))) == info
    torch.save({"preprocess_info": d}, tmp_path / "c.pt")
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)["preprocess_info"]
    assert PreprocessInfo.from_dict(loaded) == info


# ---------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings,match",
    [
        ({"mode": "crop"}, r"preprocess\.mode='crop'.*resize, spacing"),
        ({"mode": "spacing", "normalization": "minmax"}, r"preprocess\.normalization='minmax'.*zscore, percentile"),
        ({"mode": "spacing", "spacing": [1, 1]}, r"preprocess\.spacing=\[1, 1\].*3 positive numbers"),
        ({"mode": "spacing", "spacing": [1, -1, 1]}, r"preprocess\.spacing.*3 positive numbers"),
        ({"mode": "spacing", "shape": [64, 64, 0]}, r"preprocess\.shape=\[64, 64, 0\].*3 positive ints"),
        ({"mode": "spacing", "shape": [64, 64, 6.5]}, r"preprocess\.shape.*3 positive ints"),
        ({"mode": "resize"}, r"preprocess\.shape=None.*mode=resize"),
        ({"mode": "resize", "shape": [8, 8, 8], "spacing": [1, 1, 1]}, r"preprocess\.spacing.*null with mode=resize"),
        ({"mode": "spacing", "percentiles": [99, 1]}, r"preprocess\.percentiles=\[99, 1\].*0 <= lo < hi <= 100"),
        ({"mode": "spacing", "percentiles": [0, 101]}, r"preprocess\.percentiles"),
        ({"mode": "spacing", "crop_foreground": "yes"}, r"preprocess\.crop_foreground='yes'.*true or false"),
        ({"mode": "spacing", "foreground_margin": -1}, r"preprocess\.foreground_margin=-1"),
        ({"mode": "spacing", "spacng": [1, 1, 1]}, r"unknown key.*spacng.*allowed keys: mode, spacing"),
    ],
)
def test_validate_settings_names_key_value_and_allowed(settings, match):
    with pytest.raises(ValueError, match=match):
        validate_settings(settings)


def test_settings_hash_is_canonical():
    a = {"mode": "spacing", "spacing": [1, 1, 1], "shape": [64, 64, 64]}
    b = OmegaConf.create({"shape": [64, 64, 64], "spacing": [1.0, 1.0, 1.0], "mode": "spacing", "name": "mine",
                          "crop_foreground": False, "foreground_margin": 7, "normalization": "zscore",
                          "percentiles": [2, 98]})  # margin / percentiles unused here
    assert settings_hash(a) == settings_hash(b) and len(settings_hash(a)) == 40
    assert settings_hash(a) != settings_hash({**a, "spacing": [1, 1, 1.5]})
    assert settings_hash(a) != settings_hash({**a, "normalization": "percentile"})
    assert settings_hash(a) != settings_hash(a, extra={"v": 2})
    assert validate_settings(b)["spacing"] == [1.0, 1.0, 1.0]


# ---------------------------------------------------------------------------------------------------------
# Files: dtypes, headers, orientations
# ---------------------------------------------------------------------------------------------------------


def _head(shape=(20, 22, 16), seed=0) -> np.ndarray:
    """A smooth blob with an exactly-zero background, integer-valued (exact in any dtype)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    r = np.sqrt((grid**2).sum(0))
    vol = np.where(r < 0.8, np.round(100 * (1.2 - r) + rng.integers(0, 20, shape)), 0)
    return vol.astype(np.float32)


def _ras_affine(vox=(1.0, 1.0, 1.0), shape=(20, 22, 16)) -> np.ndarray:
    aff = np.diag([*vox, 1.0])
    aff[:3, 3] = [-(n - 1) / 2 * v for n, v in zip(shape, vox)]
    return aff


def _reorient(ras: np.ndarray, ras_affine: np.ndarray, axcodes: str) -> tuple[np.ndarray, np.ndarray]:
    """The same image stored in another on-disk orientation (same world positions)."""
    t = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                        nib.orientations.axcodes2ornt(tuple(axcodes)))
    data = nib.orientations.apply_orientation(ras, t)
    return np.ascontiguousarray(data), ras_affine @ nib.orientations.inv_ornt_aff(t, ras.shape)


def _write(path: Path, data: np.ndarray, affine: np.ndarray, dtype=np.float32, qform_code=1, sform_code=1,
           slope_inter=None) -> Path:
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(data.shape)
    junk = np.diag([7.0, 7.0, 7.0, 1.0])  # a code-0 matrix must be ignored
    hdr.set_qform(affine if qform_code else junk, code=qform_code)
    hdr.set_sform(affine if sform_code else junk, code=sform_code)
    img = nib.Nifti1Image(data.astype(dtype), None, header=hdr)
    if slope_inter is not None:
        img.header.set_slope_inter(*slope_inter)
    nib.save(img, str(path))
    return path


SPACING_SETTINGS = {"mode": "spacing", "spacing": [1.0, 1.0, 1.0], "crop_foreground": True, "foreground_margin": 2,
                    "shape": [24, 24, 24], "normalization": "zscore"}


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
@pytest.mark.parametrize("kind", ["int16_scaled", "uint8", "float64", "float32_4d"])
def test_dtypes_and_containers_load_and_preprocess(tmp_path, kind, ext):
    vol = _head()
    aff = _ras_affine()
    path = tmp_path / f"img{ext}"
    if kind == "int16_scaled":  # stored raw r, read back 2 r + 10; raw -5 is the zero background
        raw = np.where(vol > 0, (vol - 10) / 2, -5).astype(np.int16)
        vol = (raw.astype(np.float32) * 2 + 10)
        _write(path, raw, aff, np.int16, slope_inter=(2.0, 10.0))
        with open(path, "rb") if ext == ".nii" else __import__("gzip").open(path, "rb") as f:
            hdr = nib.Nifti1Header.from_fileobj(f)
        assert (hdr["scl_slope"], hdr["scl_inter"]) == (2.0, 10.0)
    elif kind == "float32_4d":
        _write(path, vol[..., None], aff, np.float32)
    else:
        _write(path, vol, aff, {"uint8": np.uint8, "float64": np.float64}[kind])
    data, _, grid = load_nifti_with_grid(path)
    assert data.dtype == np.float32 and data.shape == (20, 22, 16)
    np.testing.assert_array_equal(data, vol)
    mask, _ = load_mask(path)
    assert mask.dtype == np.uint8
    out, mask_out, info = preprocess_volume(data, grid.voxel_size_mm, SPACING_SETTINGS, mask)
    assert out.shape == mask_out.shape == (24, 24, 24) and out.dtype == np.float32
    expected, _, _ = preprocess_volume(vol, (1, 1, 1), SPACING_SETTINGS)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


def test_anisotropic_voxels_are_resampled_to_isotropic(tmp_path):
    vol = _head((20, 20, 16))
    path = _write(tmp_path / "aniso.nii.gz", vol, _ras_affine((1.2, 1.2, 1.5), (20, 20, 16)))
    data, _, grid = load_nifti_with_grid(path)
    assert grid.voxel_size_mm == pytest.approx((1.2, 1.2, 1.5))
    out, _, info = preprocess_volume(data, grid.voxel_size_mm, {"mode": "spacing", "spacing": [1, 1, 1]})
    assert info.resampled_shape == (24, 24, 24) and out.shape == (24, 24, 24)
    assert info.output_spacing_mm == pytest.approx((1.0, 1.0, 1.0))


def test_orientations_and_header_codes_give_the_same_preprocessed_array(tmp_path):
    """RAS, LAS, LPS, an axis-permuted layout, a qform-only and an sform-only header: one result."""
    vox, shape = (1.2, 1.2, 1.5), (20, 22, 16)
    ras, ras_aff = _head(shape, seed=4), _ras_affine(vox, shape)
    mask = (ras > 90).astype(np.uint8)
    cases = {}
    for codes in ("RAS", "LAS", "LPS", "SLA"):
        data, aff = _reorient(ras, ras_aff, codes)
        mdata, _ = _reorient(mask, ras_aff, codes)
        cases[codes] = (_write(tmp_path / f"{codes}.nii.gz", data, aff),
                        _write(tmp_path / f"{codes}_m.nii.gz", mdata, aff, np.uint8))
    data, aff = _reorient(ras, ras_aff, "LPS")
    mdata, _ = _reorient(mask, ras_aff, "LPS")
    cases["qform_only"] = (_write(tmp_path / "q.nii", data, aff, sform_code=0),
                           _write(tmp_path / "q_m.nii", mdata, aff, np.uint8, sform_code=0))
    data, aff = _reorient(ras, ras_aff, "PLI")
    mdata, _ = _reorient(mask, ras_aff, "PLI")
    cases["sform_only"] = (_write(tmp_path / "s.nii", data, aff, qform_code=0, sform_code=2),
                           _write(tmp_path / "s_m.nii", mdata, aff, np.uint8, qform_code=0, sform_code=2))
    assert nib.load(tmp_path / "q.nii").header["sform_code"] == 0
    assert nib.load(tmp_path / "s.nii").header["qform_code"] == 0

    results = {}
    for name, (ipath, mpath) in cases.items():
        data, ras_affine, grid = load_nifti_with_grid(ipath)
        assert data.shape == shape, name
        assert grid.voxel_size_mm == pytest.approx(vox, abs=1e-5), name
        np.testing.assert_allclose(ras_affine, ras_aff, atol=1e-4, err_msg=name)
        results[name] = preprocess_volume(data, grid.voxel_size_mm, SPACING_SETTINGS, load_mask(mpath)[0])
    ref_image, ref_mask, ref_info = results["RAS"]
    assert ref_mask.any()
    for name, (image, m, info) in results.items():
        np.testing.assert_array_equal(image, ref_image, err_msg=name)
        np.testing.assert_array_equal(m, ref_mask, err_msg=name)
        assert info.to_dict()["crop_start"] == ref_info.to_dict()["crop_start"], name


def test_shipped_preprocess_configs_validate():
    """Every configs/preprocess/*.yaml, placed in the training config, gives valid settings."""
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONFIG_DIR

    files = sorted((CONFIG_DIR / "preprocess").glob("*.yaml"))
    if not files:
        pytest.skip("no configs/preprocess/ yet")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["data.shape=[32,32,32]"])
    OmegaConf.set_struct(cfg, False)
    for path in files:
        cfg.preprocess = OmegaConf.load(path)  # ${data.shape} resolves against the training config
        settings = validate_settings(cfg.preprocess)
        out, _, info = preprocess_volume(_head(), (1.0, 1.0, 1.0), cfg.preprocess)
        assert out.shape == info.output_shape, path.name
        if settings["shape"] is not None:
            assert list(out.shape) == settings["shape"], path.name
