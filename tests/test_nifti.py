"""Tests for brain3d.data.nifti: orientation, scaling, squeezing, errors, resize, z-score, save."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

from brain3d.data.nifti import (
    NiftiReadError,
    load_mask,
    load_nifti,
    read_header_shape,
    resize_volume,
    save_nifti,
    zscore_nonzero,
)

# Anisotropic shape and voxel sizes (exact in float32, since nibabel stores the sform as
# float32) so that a wrong permutation or flip cannot go unnoticed.
SHAPE = (5, 6, 7)
RAS_AFFINE = np.array(
    [[1.5, 0, 0, -3.0], [0, 2.0, 0, -5.0], [0, 0, 2.5, -7.5], [0, 0, 0, 1]], dtype=np.float64
)


def _ras_data() -> np.ndarray:
    return np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)  # every voxel distinct


def _write(path, data, affine, dtype=None):
    img = nib.Nifti1Image(data if dtype is None else data.astype(dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def _reorient(data, affine, codes):
    """The same volume stored in orientation ``codes`` (e.g. ("L", "A", "S"))."""
    xform = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(codes))
    return apply_orientation(data, xform), affine @ inv_ornt_aff(xform, data.shape)


@pytest.mark.parametrize("codes", [("L", "A", "S"), ("L", "P", "S"), ("P", "S", "R"), ("A", "S", "L"), ("S", "L", "P")])
def test_non_ras_loads_like_ras_twin(tmp_path, codes):
    data = _ras_data()
    other, other_aff = _reorient(data, RAS_AFFINE, codes)
    assert nib.aff2axcodes(other_aff) == codes
    ras_arr, ras_aff = load_nifti(_write(tmp_path / "ras.nii.gz", data, RAS_AFFINE))
    arr, aff = load_nifti(_write(tmp_path / "other.nii.gz", other, other_aff))
    assert arr.dtype == np.float32 and aff.dtype == np.float64
    np.testing.assert_array_equal(arr, ras_arr)
    np.testing.assert_array_equal(arr, data)
    np.testing.assert_allclose(aff, ras_aff, atol=1e-6)
    np.testing.assert_allclose(aff, RAS_AFFINE, atol=1e-6)
    assert read_header_shape(tmp_path / "other.nii.gz") == SHAPE  # RAS order, like load_nifti


def test_las_by_hand(tmp_path):
    data = _ras_data()
    las = data[::-1].copy()  # flip axis 0: voxel i' = n-1-i
    las_aff = RAS_AFFINE.copy()
    las_aff[:, 0] *= -1  # x decreases along axis 0 ...
    las_aff[0, 3] = RAS_AFFINE[0, 3] + RAS_AFFINE[0, 0] * (SHAPE[0] - 1)  # ... from the old last voxel
    arr, aff = load_nifti(_write(tmp_path / "las.nii", las, las_aff))
    np.testing.assert_array_equal(arr, data)
    np.testing.assert_allclose(aff, RAS_AFFINE, atol=1e-6)


def test_scaled_int16(tmp_path):
    raw = np.arange(60, dtype=np.int16).reshape(3, 4, 5) - 20
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_data_dtype(np.int16)
    img.header.set_slope_inter(2.0, 10.0)
    nib.save(img, str(tmp_path / "s.nii.gz"))
    assert nib.load(str(tmp_path / "s.nii.gz")).dataobj.slope == 2.0  # scaling really on disk
    arr, _ = load_nifti(tmp_path / "s.nii.gz")
    assert arr.dtype == np.float32
    np.testing.assert_array_equal(arr, raw.astype(np.float32) * 2 + 10)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_uint8_and_suffixes(tmp_path, suffix):
    raw = (np.arange(60).reshape(3, 4, 5) % 3).astype(np.uint8)
    path = _write(tmp_path / f"m{suffix}", raw, np.eye(4))
    arr, aff = load_nifti(path)
    np.testing.assert_array_equal(arr, raw.astype(np.float32))
    np.testing.assert_array_equal(aff, np.eye(4))
    mask, _ = load_mask(path)
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, (raw > 0).astype(np.uint8))


def test_singleton_4d_squeezed(tmp_path):
    data = _ras_data()
    path = _write(tmp_path / "v4.nii.gz", data[..., None], RAS_AFFINE)
    assert nib.load(str(path)).shape == SHAPE + (1,)
    assert read_header_shape(path) == SHAPE
    arr, _ = load_nifti(path)
    np.testing.assert_array_equal(arr, data)


def test_true_4d_and_2d_raise(tmp_path):
    path4 = _write(tmp_path / "v4.nii.gz", np.zeros(SHAPE + (2,), np.float32), RAS_AFFINE)
    with pytest.raises(ValueError, match="v4.nii.gz") as exc:
        load_nifti(path4)
    assert "(5, 6, 7, 2)" in str(exc.value)
    assert not isinstance(exc.value, NiftiReadError)
    with pytest.raises(ValueError, match="v4.nii.gz"):
        read_header_shape(path4)
    path2 = _write(tmp_path / "v2.nii", np.zeros((5, 6), np.float32), np.eye(4))
    with pytest.raises(ValueError, match="v2.nii"):
        load_nifti(path2)


def test_unreadable_files_raise_nifti_read_error(tmp_path):
    good = _write(tmp_path / "good.nii.gz", np.random.default_rng(0).random((16, 16, 16)).astype(np.float32), np.eye(4))
    blob = good.read_bytes()
    truncated = tmp_path / "trunc.nii.gz"
    truncated.write_bytes(blob[: len(blob) // 2])  # header intact, data cut
    text = tmp_path / "notes.nii.gz"
    text.write_text("this is not a nifti file\n" * 20)
    missing = tmp_path / "missing.nii.gz"
    for path in (truncated, text, missing):
        for fn in (load_nifti, load_mask):
            with pytest.raises(NiftiReadError) as exc:
                fn(path)
            msg = str(exc.value)
            assert str(path) in msg and "\n" not in msg
    assert issubclass(NiftiReadError, ValueError)
    with pytest.raises(NiftiReadError, match="missing.nii.gz"):
        read_header_shape(missing)


def _message(fn, path) -> str:
    with pytest.raises(NiftiReadError) as exc:
        fn(path)
    return str(exc.value)


def test_not_nifti_files_are_told_apart_from_damaged_ones(tmp_path):
    """A renamed non-image says "not a NIfTI file (what it is)"; a NIfTI (or gzip) file that fails is damaged."""
    good = _write(tmp_path / "good.nii.gz", np.random.default_rng(0).random((16, 16, 16)).astype(np.float32), np.eye(4))
    plain = _write(tmp_path / "plain.nii", np.ones((16, 16, 16), np.float32), np.eye(4))
    files = {
        "notes.nii.gz": (b"this is not a nifti file\n" * 20, "not a NIfTI file (text starting 'this is not a nifti "
                                                              "file this is not a n'): "),
        "notes.nii": (b"age,sex\n30,F\n", "not a NIfTI file (text starting 'age,sex 30,F'): "),
        "scan.nii.gz": (b"\x89PNG\r\n\x1a\n" + bytes(100), "not a NIfTI file (a PNG image): "),
        "random.nii": (bytes(range(256)) * 4, "not a NIfTI file (no NIfTI header; the first bytes are 00 01 02 03 "),
        "empty.nii.gz": (b"", "not a NIfTI file (the file is empty): "),
        "lfs.nii.gz": (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\n",
                       "not a NIfTI file (a Git LFS pointer; run git lfs pull): "),
        "trunc.nii.gz": (good.read_bytes()[: len(good.read_bytes()) // 2],
                         "truncated or damaged NIfTI file (EOFError: Compressed file ended before the end-of-stream "),
        "trunc_gzip.nii.gz": (good.read_bytes()[:30], "truncated or damaged gzip file (EOFError: "),
        "trunc.nii": (plain.read_bytes()[:100], "truncated or damaged NIfTI file (the NIfTI-1 header is cut short: "
                                                "100 of 348 bytes): "),
        "trunc_data.nii": (plain.read_bytes()[:2000], "truncated or damaged NIfTI file (OSError: Expected 16384 bytes"),
        "uncompressed.nii.gz": (plain.read_bytes(), "a NIfTI file that is not gzip-compressed although its name ends "
                                                    "in .gz (rename it .nii): "),
    }
    for name, (content, want) in files.items():
        path = tmp_path / name
        path.write_bytes(content)
        msg = _message(load_nifti, path)
        assert msg.startswith(want), (name, msg)
        assert msg.endswith(f"): {path}") and "\n" not in msg
        if not name.startswith("trunc"):
            assert _message(read_header_shape, path) == msg  # the header alone tells
    assert "not a gzip" not in _message(load_nifti, tmp_path / "notes.nii.gz")


def test_resize_volume():
    rng = np.random.default_rng(0)
    vol = rng.random((8, 9, 10)).astype(np.float32)
    same = resize_volume(vol, (8, 9, 10), "trilinear")
    np.testing.assert_array_equal(same, vol)
    assert same is not vol
    up = resize_volume(vol, (16, 12, 5), "trilinear")
    assert up.shape == (16, 12, 5) and up.dtype == np.float32
    assert vol.min() - 1e-6 <= up.min() and up.max() <= vol.max() + 1e-6  # convex combinations

    mask = (rng.random((8, 9, 10)) > 0.7).astype(np.uint8)
    for shape in [(16, 18, 20), (5, 7, 3), (8, 9, 10)]:
        out = resize_volume(mask, shape, "nearest")
        assert out.shape == shape and out.dtype == np.uint8
        assert set(np.unique(out)) <= {0, 1}
    np.testing.assert_array_equal(resize_volume(mask, (16, 18, 20), "nearest")[::2, ::2, ::2], mask)  # x2 = repeat
    with pytest.raises(ValueError):
        resize_volume(vol, (8, 9, 10), "cubic")
    with pytest.raises(ValueError):
        resize_volume(vol, (8, 9), "trilinear")


def test_zscore_nonzero():
    vol = np.zeros((3, 3, 3), np.float32)
    vol[0, 0, 0], vol[1, 1, 1], vol[2, 2, 2] = 1.0, 2.0, 3.0
    out = zscore_nonzero(vol)
    std = np.std([1.0, 2.0, 3.0])
    assert out.dtype == np.float32
    np.testing.assert_allclose([out[0, 0, 0], out[1, 1, 1], out[2, 2, 2]], [-1 / std, 0.0, 1 / std], rtol=1e-6)
    fg = vol != 0
    assert np.all(out[~fg] == 0)  # background stays 0

    const = np.full((4, 4, 4), 5.0, np.float32)
    z = zscore_nonzero(const)
    assert np.isfinite(z).all() and np.all(z == 0)
    assert np.all(zscore_nonzero(np.zeros((4, 4, 4))) == 0)
    one = np.zeros((4, 4, 4), np.float32)
    one[1, 1, 1] = 7.0  # < 2 nonzero voxels: whole-volume statistics
    z = zscore_nonzero(one)
    assert np.isfinite(z).all()
    np.testing.assert_allclose(z.mean(), 0.0, atol=1e-6)
    np.testing.assert_allclose(z.std(), 1.0, rtol=1e-5)


def test_save_round_trip(tmp_path):
    data = np.random.default_rng(1).random(SHAPE).astype(np.float32)
    path = tmp_path / "deep" / "er" / "vol.nii.gz"
    save_nifti(data, RAS_AFFINE, path)
    assert path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["vol.nii.gz"]  # no temp left
    img = nib.load(str(path))
    assert img.header.get_sform(coded=True)[1] == 1 and img.header.get_qform(coded=True)[1] == 1
    np.testing.assert_allclose(img.affine, RAS_AFFINE, atol=1e-6)
    arr, aff = load_nifti(path)
    np.testing.assert_array_equal(arr, data)
    np.testing.assert_allclose(aff, RAS_AFFINE, atol=1e-6)

    mask = (data > 0.5).astype(np.uint8)
    save_nifti(mask, RAS_AFFINE, tmp_path / "mask.nii", dtype=np.uint8)
    assert nib.load(str(tmp_path / "mask.nii")).get_data_dtype() == np.uint8
    m, _ = load_mask(tmp_path / "mask.nii")
    np.testing.assert_array_equal(m, mask)
    save_nifti(data * 2, RAS_AFFINE, path)  # overwrite in place
    np.testing.assert_allclose(load_nifti(path)[0], data * 2)
