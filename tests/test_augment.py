"""brain3d.augment.BatchAugment: configs, identity, flips, seeding, image/mask agreement, geometry, intensity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from brain3d.augment import BatchAugment, affine_grid, affine_theta, shift_zero_filled, warp

from tests.conftest import CONFIG_DIR

AUGMENT_CONFIGS = sorted(p.stem for p in (CONFIG_DIR / "augment").glob("*.yaml"))
SIZE = 32


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def grid(n: int = SIZE) -> torch.Tensor:
    """(3, n, n, n) voxel coordinates along D, H, W."""
    r = torch.arange(n, dtype=torch.float32)
    return torch.stack(torch.meshgrid(r, r, r, indexing="ij"))


def brain(batch: int = 2, n: int = SIZE, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A z-scored-like image (ellipsoid foreground, background exactly 0) and an off-centre lesion mask."""
    g = grid(n)
    c = (n - 1) / 2
    inside = (((g[0] - c) / (0.40 * n)) ** 2 + ((g[1] - c) / (0.35 * n)) ** 2 + ((g[2] - c) / (0.30 * n)) ** 2) <= 1
    noise = torch.randn((batch, 1, n, n, n), generator=gen(seed))
    image = torch.where(inside, noise + 0.5 * (g[0] - c) / n, torch.zeros(())).float()
    lesion = ((g[0] - c - 4) ** 2 + (g[1] - c + 3) ** 2 + (g[2] - c - 2) ** 2) <= 16
    mask = lesion.expand(batch, 1, n, n, n).float().contiguous()
    return image, mask


def blob(n: int = SIZE, centre=(15.5, 14.0, 17.0), radii=(7.0, 5.0, 9.0)) -> torch.Tensor:
    """(1, 1, n, n, n) float32 ellipsoid of ones (an asymmetric one, so a rotation moves it)."""
    g = grid(n)
    r = sum(((g[a] - centre[a]) / radii[a]) ** 2 for a in range(3))
    return (r <= 1).float()[None, None]


def centre_of_mass(v: torch.Tensor) -> torch.Tensor:
    """(3,) centre of mass of a (1, 1, D, H, W) volume along D, H, W."""
    w = v[0, 0].double()
    g = grid(v.shape[-1]).double()
    return (g * w).sum(dim=(1, 2, 3)) / w.sum()


@pytest.mark.parametrize("name", AUGMENT_CONFIGS)
def test_every_config_runs_and_keeps_shapes_inputs_and_binary_masks(name):
    aug = instantiate(OmegaConf.load(CONFIG_DIR / "augment" / f"{name}.yaml"))
    assert isinstance(aug, BatchAugment) and not list(aug.parameters())
    image, mask = brain()
    image_before, mask_before = image.clone(), mask.clone()
    for seed in range(4):
        out, out_mask = aug(image, mask, generator=gen(seed))
        assert out.shape == image.shape and out.dtype == image.dtype and out.device == image.device
        assert out_mask.shape == mask.shape and out_mask.dtype == mask.dtype
        assert out is not image and out_mask is not mask
        assert torch.isfinite(out).all()
        assert set(out_mask.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(image, image_before) and torch.equal(mask, mask_before)
    out, none_mask = aug(image, generator=gen(0))  # mask is optional
    assert none_mask is None and out.shape == image.shape


def test_configs_cover_the_presets():
    assert {"none", "flip", "light", "heavy"} <= set(AUGMENT_CONFIGS)
    assert instantiate(OmegaConf.load(CONFIG_DIR / "augment" / "none.yaml")).is_identity
    heavy = instantiate(OmegaConf.load(CONFIG_DIR / "augment" / "heavy.yaml"))
    assert heavy.scale_range == (0.8, 1.2) and heavy.contrast_range == (0.75, 1.25)


def test_none_is_exact_identity():
    image, mask = brain()
    out, out_mask = BatchAugment()(image, mask, generator=gen(0))
    assert torch.equal(out, image) and torch.equal(out_mask, mask)
    assert out.data_ptr() != image.data_ptr()  # a new tensor, not the input


def test_flip_prob_one_flips_all_axes():
    image, mask = brain()
    out, out_mask = BatchAugment(flip_prob=1.0)(image, mask, generator=gen(0))
    assert torch.equal(out, torch.flip(image, (2, 3, 4)))
    assert torch.equal(out_mask, torch.flip(mask, (2, 3, 4)))


def test_flips_folded_into_the_affine_match_torch_flip():
    image, mask = brain()
    # a sample with the affine gets its flips inside theta: flips alone in theta must equal torch.flip
    theta = affine_theta((SIZE,) * 3, flips=torch.tensor([[True, False, True], [False, True, False]]))
    out, out_mask = warp(image, mask, theta)
    torch.testing.assert_close(out[0:1], torch.flip(image[0:1], (2, 4)), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1:2], torch.flip(image[1:2], (3,)), atol=1e-5, rtol=0)
    assert torch.equal(out_mask[0:1], torch.flip(mask[0:1], (2, 4)))


def test_same_seed_same_output_different_seed_differs():
    aug = instantiate(OmegaConf.load(CONFIG_DIR / "augment" / "heavy.yaml"))
    image, mask = brain(batch=4)
    a = aug(image, mask, generator=gen(7))
    b = aug(image, mask, generator=gen(7))
    c = aug(image, mask, generator=gen(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    # the default generator (None) is torch's global CPU generator, reseedable with torch.manual_seed
    torch.manual_seed(3)
    d = aug(image, mask)
    torch.manual_seed(3)
    e = aug(image, mask)
    assert torch.equal(d[0], e[0]) and torch.equal(d[1], e[1])


def test_image_and_mask_move_together():
    shape = blob().expand(2, 1, SIZE, SIZE, SIZE).contiguous()
    aug = BatchAugment(affine_prob=1.0, rotation_deg=20, scale_range=(0.9, 1.1), translation_frac=0.05, flip_prob=0.5)
    for seed in range(3):
        out, out_mask = aug(shape, shape.clone(), generator=gen(seed))
        agree = ((out > 0.5).float() == out_mask).float().mean().item()
        assert agree > 0.97, agree
        assert not torch.equal(out_mask, shape)  # the blob moved
        assert out_mask.sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_affine_grid_equals_torch_affine_grid(dtype):
    # flips, rotation, scale and shift together, on a non-cubic volume (D, H, W all different)
    size = (3, 1, 7, 9, 11)
    theta = affine_theta(size[2:], flips=torch.tensor([[True, False, False], [False, True, True], [False] * 3]),
                         angles=torch.tensor([[0.3, -0.2, 0.1], [0.0, 0.5, 0.0], [-0.1, 0.0, 0.2]]),
                         scales=torch.tensor([0.9, 1.1, 1.0]), shifts=torch.tensor([[1.0, -2.0, 0.5]] * 3)).to(dtype)
    ours = affine_grid(theta, size)
    reference = F.affine_grid(theta, list(size), align_corners=False)
    assert ours.shape == reference.shape == (3, 7, 9, 11, 3) and ours.dtype == dtype
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-12)


def test_rotation_by_20_degrees_moves_the_blob_and_keeps_its_volume():
    b = blob()
    theta = affine_theta((SIZE,) * 3, angles=torch.tensor([[math.radians(20), 0.0, 0.0]]))
    out, out_mask = warp(b, b.clone(), theta)
    assert ((out > 0.5).float() == out_mask).float().mean() > 0.97
    assert (out_mask != b).sum() > 50  # rotated
    assert abs(out_mask.sum().item() / b.sum().item() - 1) < 0.1  # a rotation keeps the volume


def test_rotation_by_90_degrees_is_rot90():
    x = torch.randn(1, 1, 9, 9, 9, generator=gen(0))
    theta = affine_theta((9, 9, 9), angles=torch.tensor([[math.pi / 2, 0.0, 0.0]]))
    out, _ = warp(x, None, theta)
    torch.testing.assert_close(out, torch.rot90(x, 1, dims=(3, 4)), atol=1e-4, rtol=0)


@pytest.mark.parametrize("shift", [(3.0, -2.0, 1.5), (-4.25, 0.0, 2.75)])
def test_known_translation_moves_the_centre_of_mass(shift):
    b = blob()
    frac = torch.tensor([shift], dtype=torch.float64) / SIZE  # as a fraction of the size, as BatchAugment draws it
    theta = affine_theta((SIZE,) * 3, shifts=frac * SIZE)
    out, out_mask = warp(b, b.clone(), theta)
    moved = centre_of_mass(out) - centre_of_mass(b)
    assert torch.allclose(moved, torch.tensor(shift, dtype=torch.float64), atol=0.5), moved
    moved_mask = centre_of_mass(out_mask) - centre_of_mass(b)
    assert torch.allclose(moved_mask, torch.tensor(shift, dtype=torch.float64), atol=0.5), moved_mask


def test_scale_changes_the_volume_by_the_cube():
    b = blob()
    out, out_mask = warp(b, b.clone(), affine_theta((SIZE,) * 3, scales=torch.tensor([1.2])))
    assert abs(out.sum().item() / b.sum().item() - 1.2**3) < 0.08


def test_translation_through_forward_stays_within_bounds():
    b = blob()
    aug = BatchAugment(affine_prob=1.0, translation_frac=0.1)
    for seed in range(5):
        out, _ = aug(b, generator=gen(seed))
        moved = (centre_of_mass(out) - centre_of_mass(b)).abs()
        assert (moved <= 0.1 * SIZE + 0.5).all() and moved.max() > 0.05


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(gamma_range=(0.7, 1.5), gamma_prob=1.0),
        dict(noise_std=0.1, noise_prob=1.0),
        dict(contrast_range=(0.75, 1.25), contrast_prob=1.0),
        dict(bias_field_std=0.3, bias_prob=1.0),
    ],
    ids=["gamma", "noise", "contrast", "bias"],
)
def test_intensity_changes_only_the_foreground(kwargs):
    image, mask = brain()
    fg = image != 0
    out, out_mask = BatchAugment(**kwargs)(image, mask, generator=gen(1))
    assert torch.equal(out_mask, mask)  # intensity transforms leave the mask (and geometry) alone
    assert (out[~fg] == 0).all()  # background stays exactly 0
    changed = out != image
    assert changed[fg].float().mean() > 0.5  # most foreground voxels changed
    assert not changed[~fg].any()


def test_intensity_probability_zero_and_one():
    image, _ = brain()
    out, _ = BatchAugment(noise_std=0.1, noise_prob=0.0)(image, generator=gen(0))
    assert torch.equal(out, image)
    out, _ = BatchAugment(noise_std=0.1, noise_prob=1.0)(image, generator=gen(0))
    fg = image != 0
    assert abs((out - image)[fg].std().item() - 0.1) < 0.01


def test_gamma_keeps_the_foreground_range():
    image, _ = brain()
    out, _ = BatchAugment(gamma_range=(0.7, 1.5), gamma_prob=1.0)(image, generator=gen(0))
    for i in range(image.shape[0]):
        fg = image[i] != 0
        torch.testing.assert_close(out[i][fg].min(), image[i][fg].min())
        torch.testing.assert_close(out[i][fg].max(), image[i][fg].max())


def test_contrast_keeps_the_foreground_mean():
    image, _ = brain()
    out, _ = BatchAugment(contrast_range=(0.75, 1.25), contrast_prob=1.0)(image, generator=gen(0))
    for i in range(image.shape[0]):
        fg = image[i] != 0
        torch.testing.assert_close(out[i][fg].mean(), image[i][fg].mean(), atol=1e-4, rtol=0)
        assert not torch.allclose(out[i][fg].std(), image[i][fg].std())


def test_bias_field_is_smooth_and_positive():
    # all foreground, 2 everywhere but one voxel at 1 (the foreground min), so out - 1 == field (except there)
    image = torch.full((2, 1, SIZE, SIZE, SIZE), 2.0)
    image[:, :, 0, 0, 0] = 1.0
    out, _ = BatchAugment(bias_field_std=0.3, bias_prob=1.0)(image, generator=gen(5))
    field = (out - 1.0)[:, 0, 1:, 1:, 1:]
    assert (field > 0).all()
    log = field.log()
    assert log.std() > 0.05  # not constant
    span = (log.max() - log.min()).item()
    for axis in (1, 2, 3):
        step = log.diff(dim=axis).abs().max().item()
        curvature = log.diff(n=2, dim=axis).abs().max().item()
        # smooth: a neighbour step is a small part of the field's range, and the step itself changes slowly
        # (white noise would give curvature ~ 2 * step)
        assert step < 0.15 * span and curvature < 0.25 * step, (step, curvature, span)
    assert not torch.allclose(field[0], field[1])  # a field per sample


def test_half_and_mask_dtypes():
    image, mask = brain()
    aug = BatchAugment(flip_prob=0.5, affine_prob=1.0, rotation_deg=10, noise_std=0.1, noise_prob=1.0)
    out, out_mask = aug(image.double(), mask.bool(), generator=gen(0))
    assert out.dtype == torch.float64 and out_mask.dtype == torch.bool
    out, out_mask = aug(image.bfloat16(), mask.to(torch.uint8), generator=gen(0))
    assert out.dtype == torch.bfloat16 and out_mask.dtype == torch.uint8
    assert set(out_mask.unique().tolist()) <= {0, 1}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(flip_prob=1.5), "flip_prob"),
        (dict(flip_prob=-0.1), "flip_prob"),
        (dict(affine_prob=2), "affine_prob"),
        (dict(rotation_deg=-5), "rotation_deg"),
        (dict(rotation_deg=200), "rotation_deg"),
        (dict(scale_range=(1.2, 0.8)), "scale_range"),
        (dict(scale_range=(0.0, 1.0)), "scale_range"),
        (dict(scale_range=(1.0,)), "scale_range"),
        (dict(scale_range=None), "scale_range"),
        (dict(translation_frac=1.5), "translation_frac"),
        (dict(gamma_range=(-1.0, 1.5)), "gamma_range"),
        (dict(gamma_prob=0.5), "gamma_range"),
        (dict(gamma_prob=True, gamma_range=(0.8, 1.2)), "gamma_prob"),
        (dict(noise_std=-0.1), "noise_std"),
        (dict(noise_prob=float("nan")), "noise_prob"),
        (dict(bias_field_std=float("inf")), "bias_field_std"),
        (dict(bias_prob=1.01), "bias_prob"),
        (dict(contrast_range=(1.25, 0.75)), "contrast_range"),
        (dict(contrast_prob=0.3), "contrast_range"),
        (dict(contrast_prob="0.3", contrast_range=(0.75, 1.25)), "contrast_prob"),
    ],
)
def test_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BatchAugment(**kwargs)


def test_bad_inputs_raise():
    aug = BatchAugment(flip_prob=0.5)
    with pytest.raises(ValueError, match="5-D"):
        aug(torch.zeros(1, 8, 8, 8))
    with pytest.raises(ValueError, match="floating-point"):
        aug(torch.zeros(1, 1, 8, 8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="mask"):
        aug(torch.zeros(1, 1, 8, 8, 8), torch.zeros(1, 1, 8, 8, 4))


def test_flip_axes_limits_flips_to_left_right():
    x = torch.arange(4 * 1 * 4 * 5 * 6, dtype=torch.float32).reshape(4, 1, 4, 5, 6)
    left_right = BatchAugment(flip_prob=1.0, flip_axes=[0])
    out, _ = left_right(x, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, torch.flip(x, [2]))  # every sample mirrored along x (RAS axis 0) only
    every_axis, _ = BatchAugment(flip_prob=1.0)(x, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(every_axis, torch.flip(x, [2, 3, 4]))  # the default: all three axes
    assert BatchAugment(flip_prob=1.0, flip_axes=[]).is_identity
    with pytest.raises(ValueError, match="flip_axes must be a list of the axes 0, 1, 2"):
        BatchAugment(flip_prob=0.5, flip_axes=[3])


def test_shift_zero_filled_matches_a_hand_shift():
    x = torch.arange(2 * 4 * 5 * 6, dtype=torch.float32).view(2, 4, 5, 6) + 1
    out = shift_zero_filled(x, (1, -2, 0))
    expected = torch.zeros_like(x)
    expected[:, 1:, :3, :] = x[:, :3, 2:, :]  # by hand: +1 along D, -2 along H
    assert torch.equal(out, expected)
    assert torch.equal(shift_zero_filled(x, (0, 0, 0)), x)
    assert not shift_zero_filled(x, (0, 5, 0)).any()  # a whole axis: nothing left


def test_whole_voxel_shifts_are_exact_and_move_image_and_mask_together():
    image = torch.zeros(6, 1, 16, 16, 16)
    image[:, :, 6:10, 5:9, 7:11] = torch.rand(6, 1, 4, 4, 4) + 0.5  # a blob away from the borders
    mask = (image > 0).float()
    aug = BatchAugment(shift_voxels=3)
    out, out_mask = aug(image, mask, generator=gen(0))
    seen = set()
    for i in range(6):
        # the output is the input moved by whole voxels: the same values, each shift in [-3, 3]
        nz = torch.nonzero(out_mask[i, 0])
        shift = (nz.min(0).values - torch.tensor([6, 5, 7])).tolist()
        assert all(-3 <= s <= 3 for s in shift)
        seen.add(tuple(shift))
        assert torch.equal(out[i], shift_zero_filled(image[i], shift))
        assert torch.equal(out_mask[i], shift_zero_filled(mask[i], shift))
    assert len(seen) > 1  # drawn per sample


def test_shifts_leave_the_other_draws_of_a_seed_unchanged():
    image = torch.randn(4, 1, 12, 12, 12)
    flips = BatchAugment(flip_prob=0.5)(image, generator=gen(3))[0]
    both = BatchAugment(flip_prob=0.5, shift_voxels=2)(image, generator=gen(3))[0]
    for i in range(4):  # the same flips as without shifts: each output is a whole-voxel shift of the flip-only one
        assert any(torch.equal(both[i], shift_zero_filled(flips[i], (a, b, c)))
                   for a in range(-2, 3) for b in range(-2, 3) for c in range(-2, 3))


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_shift_voxels_must_be_a_whole_number(value):
    with pytest.raises(ValueError, match="shift_voxels"):
        BatchAugment(shift_voxels=value)
