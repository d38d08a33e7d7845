"""Patch sampling (brain3d.data.patches) and sliding-window inference (brain3d.sliding_window)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from brain3d.data.patches import extract_patch, foreground_coordinates, sample_patch_start, sample_training_patch
from brain3d.models.model import build_model
from brain3d.sliding_window import gaussian_importance_map, sliding_window_inference, window_starts


def _arange(shape) -> np.ndarray:
    return np.arange(math.prod(shape), dtype=np.float32).reshape(shape)


def _contains(start, patch, voxel) -> bool:
    return all(s <= v < s + p for s, p, v in zip(start, patch, voxel))


# ----------------------------------------------------------------------------- extract_patch


def test_extract_patch_exact_values():
    vol = _arange((5, 6, 7))
    out = extract_patch(vol, (1, 2, 3), (2, 3, 4))
    np.testing.assert_array_equal(out, vol[1:3, 2:5, 3:7])
    assert out.dtype == vol.dtype and out.shape == (2, 3, 4)
    out[...] = -1  # a copy, not a view
    assert vol.min() == 0
    # the full volume, and one int for all axes
    np.testing.assert_array_equal(extract_patch(vol, (0, 0, 0), (5, 6, 7)), vol)
    np.testing.assert_array_equal(extract_patch(vol, (1, 1, 1), 4), vol[1:5, 1:5, 1:5])
    np.testing.assert_array_equal(extract_patch(vol, (1, 1, 1), np.int64(4)), vol[1:5, 1:5, 1:5])


def test_extract_patch_channel_first():
    vol = _arange((2, 5, 6, 7))
    np.testing.assert_array_equal(extract_patch(vol, (1, 2, 3), (2, 3, 4)), vol[:, 1:3, 2:5, 3:7])


def test_extract_patch_pads_after_when_volume_is_smaller():
    vol = _arange((3, 4, 5)) + 1  # no zeros inside, so padding is recognisable
    out = extract_patch(vol, (0, 0, 0), (4, 6, 5))
    assert out.shape == (4, 6, 5)
    np.testing.assert_array_equal(out[:3, :4, :5], vol)
    assert (out[3] == 0).all() and (out[:, 4:] == 0).all()
    # partial overlap at the end, custom pad value
    out = extract_patch(vol, (2, 1, 3), (2, 4, 3), pad_value=-7)
    np.testing.assert_array_equal(out[:1, :3, :2], vol[2:, 1:, 3:])
    assert (out[1:] == -7).all() and (out[:, 3:] == -7).all() and (out[:, :, 2:] == -7).all()
    # channel-first padding keeps the channels
    out = extract_patch(np.stack([vol, -vol]), (0, 0, 0), (4, 4, 5))
    assert out.shape == (2, 4, 4, 5)
    np.testing.assert_array_equal(out[1, :3], -vol)


def test_extract_patch_memmap(tmp_path):
    vol = _arange((9, 10, 11))
    path = tmp_path / "vol.dat"
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=vol.shape)
    mm[:] = vol
    mm.flush()
    del mm
    ro = np.memmap(path, dtype=np.float32, mode="r", shape=vol.shape)
    out = extract_patch(ro, (4, 5, 6), (8, 8, 8))  # runs past the end in every axis
    assert type(out) is np.ndarray and out.flags.writeable
    np.testing.assert_array_equal(out[:5, :5, :5], vol[4:, 5:, 6:])
    assert (out[5:] == 0).all()
    inner = extract_patch(ro, (1, 2, 3), (4, 4, 4))
    assert type(inner) is np.ndarray
    np.testing.assert_array_equal(inner, vol[1:5, 2:6, 3:7])


def test_extract_patch_rejects_negative_start():
    with pytest.raises(ValueError, match=">= 0"):
        extract_patch(_arange((4, 4, 4)), (-1, 0, 0), (2, 2, 2))
    with pytest.raises(ValueError, match="positive"):
        extract_patch(_arange((4, 4, 4)), (0, 0, 0), (2, 0, 2))


# ----------------------------------------------------------------------------- sample_patch_start


@pytest.mark.parametrize("shape,patch", [((40, 50, 60), (32, 32, 32)), ((20, 50, 32), (32, 16, 32)),
                                         ((8, 8, 8), (16, 16, 16))])
def test_sample_patch_start_in_range(shape, patch):
    rng = np.random.default_rng(0)
    coords = np.argwhere(np.ones(shape, bool))[::37]
    for i in range(300):
        start = sample_patch_start(shape, patch, rng, coords, foreground=bool(i % 2))
        assert len(start) == 3 and all(isinstance(s, int) for s in start)
        for s, n, p in zip(start, shape, patch):
            assert (s == 0) if n <= p else (0 <= s <= n - p)


def test_sample_patch_start_foreground_contains_voxel():
    shape, patch = (40, 50, 60), (16, 24, 32)
    rng = np.random.default_rng(1)
    corners = [tuple(c) for c in itertools.product(*[(0, n - 1) for n in shape])]
    for voxel in corners + [(20, 25, 30), (3, 48, 31), (39, 1, 59)]:
        coords = np.array([voxel])
        for _ in range(50):
            start = sample_patch_start(shape, patch, rng, coords, foreground=True)
            assert _contains(start, patch, voxel), (voxel, start)
    # an interior voxel is centred exactly
    assert sample_patch_start(shape, patch, rng, np.array([[20, 25, 30]]), foreground=True) == (12, 13, 14)
    # several voxels: the chosen one varies, and it is always one of them
    coords = np.array([[2, 2, 2], [37, 47, 57]])
    starts = [sample_patch_start(shape, patch, rng, coords, True) for _ in range(200)]
    hits = [tuple(_contains(s, patch, c) for c in coords) for s in starts]
    assert all(any(h) for h in hits) and 40 < sum(h[0] for h in hits) < 160


def test_sample_patch_start_uniform_when_not_foreground():
    rng = np.random.default_rng(2)
    coords = np.array([[0, 0, 0]])
    starts = np.array([sample_patch_start((40, 20, 16), (32, 16, 16), rng, coords, foreground=False)
                       for _ in range(4500)])
    assert (starts[:, 2] == 0).all()
    for axis, n_values in ((0, 9), (1, 5)):
        counts = np.bincount(starts[:, axis], minlength=n_values)
        assert len(counts) == n_values
        expected = len(starts) / n_values
        assert np.all(np.abs(counts - expected) < 0.2 * expected), counts
    # foreground=True without coordinates (or with none) falls back to uniform
    for c in (None, np.zeros((0, 3), int)):
        s = [sample_patch_start((40, 20, 16), (32, 16, 16), rng, c, foreground=True)[0] for _ in range(300)]
        assert len(set(s)) == 9


def test_sample_patch_start_seeded():
    coords = np.array([[5, 6, 7], [30, 40, 50]])
    draw = lambda seed: [sample_patch_start((40, 50, 60), (16, 16, 16), rng, coords, i % 2 == 0)  # noqa: E731
                         for rng in [np.random.default_rng(seed)] for i in range(20)]
    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


# ----------------------------------------------------------------------------- foreground_coordinates


def test_foreground_coordinates():
    mask = np.zeros((10, 12, 14), np.uint8)
    mask[2, 3, 4] = mask[9, 11, 13] = 1
    mask[5, 5, 5] = 2
    coords = foreground_coordinates(mask)
    assert coords.dtype == np.int64
    np.testing.assert_array_equal(coords, [[2, 3, 4], [5, 5, 5], [9, 11, 13]])
    np.testing.assert_array_equal(foreground_coordinates(mask[None]), coords)  # (1, D, H, W)
    assert foreground_coordinates(np.zeros((4, 4, 4))).shape == (0, 3)

    big = np.zeros((20, 20, 20), np.float32)
    big[5:15, 5:15, 5:15] = 1.0  # 1000 voxels
    sub = foreground_coordinates(big, max_points=100, rng=np.random.default_rng(0))
    assert sub.shape == (100, 3) and len({tuple(c) for c in sub}) == 100
    assert (big[tuple(sub.T)] > 0).all()
    np.testing.assert_array_equal(sub, foreground_coordinates(big, max_points=100, rng=np.random.default_rng(0)))
    # rng=None: seeded
    np.testing.assert_array_equal(foreground_coordinates(big, 100), foreground_coordinates(big, 100))
    assert len(foreground_coordinates(big, max_points=5000)) == 1000
    with pytest.raises(ValueError):
        foreground_coordinates(big, max_points=0)


# ----------------------------------------------------------------------------- sample_training_patch


def _corner_case():
    """An arange image (so a patch reveals its start) and a mask with one foreground voxel in a corner."""
    image = _arange((48, 40, 36))
    mask = np.zeros(image.shape, np.uint8)
    mask[1, 2, 3] = 1
    return image, mask, (16, 16, 16)


def _start_of(image_patch, image):
    return np.unravel_index(int(image_patch[0, 0, 0]), image.shape)


def test_sample_training_patch_same_window_and_shapes():
    image, mask, patch = _corner_case()
    mask = (image % 7 == 0).astype(np.uint8)
    rng = np.random.default_rng(0)
    for _ in range(50):
        img_p, mask_p = sample_training_patch(image, mask, patch, rng, foreground_fraction=0.5)
        assert img_p.shape == mask_p.shape == patch and img_p.dtype == image.dtype and mask_p.dtype == mask.dtype
        np.testing.assert_array_equal(mask_p, (img_p % 7 == 0).astype(np.uint8))
    # channel-first image, (1, D, H, W) mask, and a volume smaller than the patch (padded)
    img_p, mask_p = sample_training_patch(image[None], mask[None], (64, 32, 32), rng, 1.0)
    assert img_p.shape == (1, 64, 32, 32) and mask_p.shape == (1, 64, 32, 32)
    assert (img_p[0, 48:] == 0).all() and (mask_p[0, 48:] == 0).all()


def test_sample_training_patch_foreground_fraction_one_always_has_foreground():
    image, mask, patch = _corner_case()
    rng = np.random.default_rng(0)
    for _ in range(200):
        _, mask_p = sample_training_patch(image, mask, patch, rng, foreground_fraction=1.0)
        assert mask_p.sum() == 1
    # precomputed coordinates give the same draws as finding them in the mask
    coords = foreground_coordinates(mask)
    a = [sample_training_patch(image, mask, patch, np.random.default_rng(5), 1.0)[0] for _ in range(3)]
    b = [sample_training_patch(image, mask, patch, np.random.default_rng(5), 1.0, foreground_coords=coords)[0]
         for _ in range(3)]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_sample_training_patch_foreground_fraction_zero_is_uniform():
    image, mask, patch = _corner_case()
    rng = np.random.default_rng(1)
    n, hits, starts = 3000, 0, []
    for _ in range(n):
        img_p, mask_p = sample_training_patch(image, mask, patch, rng, foreground_fraction=0.0)
        hits += int(mask_p.sum() > 0)
        starts.append(_start_of(img_p, image))
    starts = np.array(starts)
    # P(uniform patch contains voxel (1, 2, 3)) = 2/33 * 3/25 * 4/21
    p = (2 / 33) * (3 / 25) * (4 / 21)
    assert hits < n * p + 4 * math.sqrt(n * p) + 2
    for axis, n_values in enumerate((33, 25, 21)):
        counts = np.bincount(starts[:, axis], minlength=n_values)
        assert len(counts) == n_values and counts.min() > 0.5 * n / n_values and counts.max() < 1.5 * n / n_values


def test_sample_training_patch_fraction_is_respected():
    image, mask, patch = _corner_case()
    rng = np.random.default_rng(2)
    n = 3000
    hits = sum(int(sample_training_patch(image, mask, patch, rng, 0.33)[1].sum() > 0) for _ in range(n))
    p = 0.33 + 0.67 * (2 / 33) * (3 / 25) * (4 / 21)
    assert abs(hits / n - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_sample_training_patch_empty_mask_falls_back_to_uniform():
    image, mask, patch = _corner_case()
    img_p, mask_p = sample_training_patch(image, np.zeros_like(mask), patch, np.random.default_rng(0), 1.0)
    assert img_p.shape == patch and mask_p.sum() == 0
    # no mask at all (classification/regression): a uniform patch, the same draws as an empty mask
    img_n, mask_n = sample_training_patch(image, None, patch, np.random.default_rng(0), 1.0)
    assert mask_n is None
    np.testing.assert_array_equal(img_n, img_p)


def test_sample_training_patch_seeded_and_memmap(tmp_path):
    image, mask, patch = _corner_case()
    path = tmp_path / "img.npy"
    np.save(path, image)
    ro = np.load(path, mmap_mode="r")

    def draws(seed, img):
        rng = np.random.default_rng(seed)
        return [sample_training_patch(img, mask, patch, rng, 0.5) for _ in range(10)]

    a, b, c = draws(7, image), draws(7, ro), draws(8, image)
    for (ia, ma), (ib, mb) in zip(a, b):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(ma, mb)
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a, c))


def test_sample_training_patch_validation():
    image, mask, patch = _corner_case()
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="foreground_fraction"):
        sample_training_patch(image, mask, patch, rng, 1.5)
    with pytest.raises(ValueError, match="spatial shape"):
        sample_training_patch(image, mask[:-1], patch, rng)


# ----------------------------------------------------------------------------- window_starts


@pytest.mark.parametrize(
    "size,patch,overlap,expected",
    [
        (100, 64, 0.5, [0, 32, 36]),
        (128, 64, 0.5, [0, 32, 64]),
        (100, 64, 0.0, [0, 36]),
        (128, 64, 0.0, [0, 64]),
        (64, 64, 0.5, [0]),
        (50, 64, 0.5, [0]),
        (10, 4, 0.75, [0, 1, 2, 3, 4, 5, 6]),
        (70, 32, 0.25, [0, 24, 38]),
        (20, 10, 0.9, list(range(11))),  # 10 * 0.1 = 0.999...: the step is still 1
        (100, 10, 0.7, [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 36, 39, 42, 45, 48, 51, 54, 57, 60, 63, 66, 69,
                        72, 75, 78, 81, 84, 87, 90]),
    ],
)
def test_window_starts_exact(size, patch, overlap, expected):
    assert window_starts(size, patch, overlap) == expected


@pytest.mark.parametrize("size", [1, 15, 16, 17, 31, 32, 33, 53, 70, 81, 100, 193])
@pytest.mark.parametrize("patch", [1, 16, 32, 48])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.6, 0.99])
def test_window_starts_cover(size, patch, overlap):
    starts = window_starts(size, patch, overlap)
    assert starts[0] == 0 and starts == sorted(set(starts))
    if size <= patch:
        assert starts == [0]
        return
    assert starts[-1] == size - patch  # flush with the end
    covered = np.zeros(size, bool)
    for s in starts:
        covered[s : s + patch] = True
    assert covered.all()
    step = max(1, int(patch * (1 - overlap) + 1e-9))
    assert all(b - a == step for a, b in zip(starts[:-2], starts[1:-1]))
    assert 0 < starts[-1] - starts[-2] <= step


def test_window_starts_validation():
    for args in [(0, 4, 0.5), (4, 0, 0.5), (10, 4, 1.0), (10, 4, -0.1)]:
        with pytest.raises(ValueError):
            window_starts(*args)


# ----------------------------------------------------------------------------- gaussian_importance_map


def test_gaussian_importance_map():
    g = gaussian_importance_map((32, 24, 17))
    assert g.shape == (32, 24, 17) and g.dtype == torch.float32
    assert g.max().item() == pytest.approx(1.0) and g.min().item() > 0
    for axis in range(3):
        torch.testing.assert_close(g, torch.flip(g, (axis,)))  # symmetric about the centre
    assert g[16, 12, 8] == g.max() and g[0, 0, 0] == g.min()
    # sigma = size / 8: one sigma from the centre along an axis is exp(-1/2) of the peak (odd size: exact centre)
    h = gaussian_importance_map((33, 33, 33))
    assert h[16, 16, 16].item() == pytest.approx(1.0)
    assert h[16 + 4, 16, 16].item() == pytest.approx(math.exp(-0.5 * (4 / (33 / 8)) ** 2), rel=1e-5)
    # a tiny sigma underflows in float32: the floor keeps every weight positive
    t = gaussian_importance_map(16, sigma_scale=0.01)
    assert t.min().item() > 0 and t.max().item() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        gaussian_importance_map((8, 8, 8), sigma_scale=0)


# ----------------------------------------------------------------------------- sliding_window_inference


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
@pytest.mark.parametrize("shape", [(1, 1, 70, 81, 53), (1, 2, 40, 33, 64), (1, 1, 20, 30, 10), (1, 1, 20, 50, 9)])
def test_identity_predictor_is_exact(mode, shape):
    image = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    out = sliding_window_inference(image, _identity, (32, 32, 32), overlap=0.5, batch_size=4, mode=mode)
    assert out.shape == image.shape and out.dtype == torch.float32
    assert torch.equal(out, image)


def test_ones_predictor_gives_ones_and_calls_are_batched():
    image = torch.randn(1, 1, 70, 81, 53)
    calls = []

    def ones(x):
        calls.append((tuple(x.shape), x.device))
        return torch.ones(x.shape[0], 3, *x.shape[2:], dtype=torch.float16)

    out = sliding_window_inference(image, ones, (32, 32, 32), overlap=0.5, batch_size=7)
    assert out.shape == (1, 3, 70, 81, 53) and out.dtype == torch.float32
    assert torch.equal(out, torch.ones_like(out))
    # starts: [0, 16, 32, 38] x [0, 16, 32, 48, 49] x [0, 16, 21] = 60 windows = 8 batches of 7 + 4
    assert [c[0][0] for c in calls] == [7] * 8 + [4]
    assert all(c[0][1:] == (1, 32, 32, 32) and c[1] == image.device for c in calls)


def _conv_predictor():
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(1, 2, 3, padding=1).eval()  # zero padding: window borders differ from the inside
    return lambda x: torch.sigmoid(conv(x))


def test_batch_size_does_not_change_the_result():
    image = torch.randn(1, 1, 45, 40, 50, generator=torch.Generator().manual_seed(3))
    predictor = _conv_predictor()
    a = sliding_window_inference(image, predictor, (16, 32, 16), batch_size=1)
    b = sliding_window_inference(image, predictor, (16, 32, 16), batch_size=5)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # windows overlap with different borders, so the two modes weight them differently
    c = sliding_window_inference(image, predictor, (16, 32, 16), batch_size=5, mode="constant")
    assert not torch.allclose(b, c, atol=1e-4)


def test_accumulate_and_compute_device_cpu():
    image = torch.randn(1, 1, 40, 40, 40, generator=torch.Generator().manual_seed(4))
    predictor = _conv_predictor()
    ref = sliding_window_inference(image, predictor, 32)
    torch.testing.assert_close(sliding_window_inference(image, predictor, np.int64(32)), ref, rtol=0, atol=0)
    torch.testing.assert_close(sliding_window_inference(image, predictor, torch.Size([32, 32, 32])), ref,
                               rtol=0, atol=0)
    out = sliding_window_inference(image, predictor, 32, accumulate_device="cpu", compute_device=torch.device("cpu"))
    assert out.device.type == "cpu"
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    f32 = sliding_window_inference(image, predictor, 32, accumulate_device="cpu", accumulate_dtype=torch.float32)
    torch.testing.assert_close(f32, ref, rtol=1e-5, atol=1e-6)
    assert sliding_window_inference(image, predictor, 32, progress=True).shape == (1, 2, 40, 40, 40)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compute_on_cuda_accumulate_on_cpu():
    image = torch.randn(1, 1, 70, 81, 53, generator=torch.Generator().manual_seed(0))
    seen = []

    def identity(x):
        seen.append(x.device.type)
        return x

    out = sliding_window_inference(image, identity, (32, 32, 32), compute_device="cuda", accumulate_device="cpu")
    assert set(seen) == {"cuda"} and out.device.type == "cpu" and torch.equal(out, image)
    out = sliding_window_inference(image.cuda(), identity, (32, 32, 32))
    assert out.device.type == "cuda" and torch.equal(out.cpu(), image)


def test_tiny_segmentation_model():
    torch.manual_seed(0)
    model = build_model(
        {"_target_": "brain3d.models.backbones.PlainBackbone", "width": 0.125},
        {"_target_": "brain3d.models.heads.SegmentationHead"},
        "lesion",
    ).eval()
    image = torch.randn(1, 1, 48, 64, 40, generator=torch.Generator().manual_seed(1))
    out = sliding_window_inference(image, lambda x: torch.sigmoid(model(x)["lesion"]), (32, 32, 32), overlap=0.5,
                                   batch_size=4)
    assert out.shape == (1, 1, 48, 64, 40) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_sliding_window_validation():
    image = torch.zeros(1, 1, 40, 40, 40)
    bad = [
        dict(image=torch.zeros(1, 40, 40, 40)),
        dict(image=torch.zeros(2, 1, 40, 40, 40)),
        dict(overlap=1.0),
        dict(overlap=-0.5),
        dict(patch_size=(32, 0, 32)),
        dict(patch_size=(32, 32)),
        dict(batch_size=0),
        dict(mode="median"),
        dict(predictor=lambda x: x[:, :, :16]),  # wrong spatial shape
        dict(predictor=lambda x: x[0]),  # 4-D
    ]
    for override in bad:
        kwargs = dict(image=image, predictor=_identity, patch_size=(32, 32, 32)) | override
        with pytest.raises(ValueError):
            sliding_window_inference(**kwargs)
