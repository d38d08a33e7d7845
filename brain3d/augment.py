"""Batch data augmentation on the training device (flips, random affine, intensity transforms).

:class:`BatchAugment` runs on whole batches AFTER they were moved to the training device, so the CPU
DataLoader workers only read data. It takes an image batch ``(B, C, D, H, W)`` (brain3d: z-scored, background
exactly 0) and optionally a binary mask batch ``(B, Cm, D, H, W)`` and returns new tensors of the same
shape, dtype and device; its inputs are never modified.

Choices (fixed, not options):

* **Spatial** transforms (flips, rotation, isotropic scale, translation) move image and mask together.
  A sample that gets the random affine is resampled once with :func:`affine_grid` / ``F.grid_sample``
  (``align_corners=False``, zero padding), its flips folded into the same matrix; a sample that only gets
  flips is flipped with ``torch.flip`` (exact, no resampling). The image is interpolated trilinearly.
  The **mask is interpolated trilinearly too, then thresholded at >= 0.5** (as nnU-Net/batchgenerators
  do per label), so it stays binary and follows the image's boundary exactly: with ``image == mask`` the
  two give the same voxels, and a thin lesion shifted by half a voxel is kept rather than lost. A
  multi-class label map (``num_classes`` K >= 2, labels 0..K) is warped per label in the same way: each
  label's one-hot channel (the background's included) is interpolated and every voxel takes the label of
  highest value, so no label value is invented or merged away.
  Rotations and scales are defined in voxel units about the volume's centre (voxels taken as
  isotropic), so a non-cubic volume is rotated, not sheared.
* **Intensity** transforms change the image only inside the **foreground**: the voxels that are nonzero
  after the spatial transform (brain3d z-scores the nonzero voxels and leaves the background at exactly 0,
  which :func:`brain3d.data.nifti.zscore_nonzero` and the zero padding keep). The background stays
  exactly 0, as at inference. The statistics (min, max, mean) are over the foreground of each sample and
  channel, so each channel of a several-channel input (T1 + FLAIR, each normalised on its own) is transformed
  within its own range; the random parameters (gamma, contrast factor, bias field) are drawn per sample and
  shared by its channels, the noise is drawn per voxel of every channel. Order: bias field, contrast, gamma,
  noise.
* **Randomness**: every random number comes from ``generator`` (``None``: torch's default CPU generator),
  in a fixed order, drawn on the generator's device and then moved to the batch's device. With a CPU
  generator (recommended) a given seed gives the same augmentation on CPU and CUDA; a CUDA generator
  also works, but its stream differs from the CPU one. Parameters are drawn for every sample whether it
  is selected or not, so the same seed gives the same flips under ``flip`` and ``light``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BatchAugment", "affine_theta", "affine_grid", "warp", "bias_field"]

# (i, j, k) degrees along (D, H, W) of the tensor-product Legendre terms of the log bias field:
# total degree 1..3 (the constant would be a global scale), 19 terms.
BIAS_TERMS = tuple(
    (i, j, k) for i in range(4) for j in range(4) for k in range(4) if 1 <= i + j + k <= 3
)


# --------------------------------------------------------------------------------------------------- checks


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _in_range(value, name: str, lo: float, hi: float) -> float:
    v = _number(value, name)
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be in [{lo:g}, {hi:g}], got {value!r}")
    return v


def _non_negative(value, name: str) -> float:
    v = _number(value, name)
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return v


def _pair(value, name: str, allow_none: bool) -> tuple[float, float] | None:
    """A (low, high) range with 0 < low <= high (lists/ListConfigs from Hydra accepted)."""
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{name} must be a (low, high) pair with 0 < low <= high, got None")
    try:
        items = list(value)
    except TypeError:
        items = None
    if items is None or len(items) != 2:
        raise ValueError(f"{name} must be a (low, high) pair with 0 < low <= high, got {value!r}")
    lo, hi = (_number(v, name) for v in items)
    if not 0 < lo <= hi:
        raise ValueError(f"{name} must be a (low, high) pair with 0 < low <= high, got {value!r}")
    return lo, hi


# ------------------------------------------------------------------------------------------ spatial helpers


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """(B, 3) angles in radians about the D, H, W axes -> (B, 3, 3) rotations R_D @ R_H @ R_W in (D, H, W) coords."""
    c, s = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])

    def mat(rows):
        return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)

    r_d = mat([[one, zero, zero], [zero, c[:, 0], -s[:, 0]], [zero, s[:, 0], c[:, 0]]])  # in the H-W plane
    r_h = mat([[c[:, 1], zero, s[:, 1]], [zero, one, zero], [-s[:, 1], zero, c[:, 1]]])  # in the D-W plane
    r_w = mat([[c[:, 2], -s[:, 2], zero], [s[:, 2], c[:, 2], zero], [zero, zero, one]])  # in the D-H plane
    return r_d @ r_h @ r_w


def affine_theta(
    spatial_size: Sequence[int],
    flips: torch.Tensor | None = None,
    angles: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
    shifts: torch.Tensor | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """The ``(B, 3, 4)`` ``theta`` for ``F.affine_grid`` (``align_corners=False``) of a forward transform.

    The transform moves the content as ``v_out = R @ (s * flip(v_in)) + t`` in voxel coordinates about
    the volume's centre, all in (D, H, W) order; the returned matrix is its inverse (``affine_grid`` maps
    output to input positions), written in ``grid_sample``'s (x=W, y=H, z=D) normalized coordinates.

    Args:
        spatial_size: (D, H, W).
        flips: (B, 3) bool, flip the D / H / W axis.
        angles: (B, 3) radians about the D / H / W axes (rotation ``R_D @ R_H @ R_W``).
        scales: (B,) isotropic scale (> 1 enlarges the content).
        shifts: (B, 3) translation in voxels along D / H / W (> 0 moves the content to higher indices).
        batch_size: B when every one of the above is None.

    Returns:
        float64 tensor (B, 3, 4) on the device of the given parameters (CPU when none is given).
    """
    given = [t for t in (flips, angles, scales, shifts) if t is not None]
    b = given[0].shape[0] if given else int(batch_size)
    device = given[0].device if given else torch.device("cpu")
    f64 = dict(dtype=torch.float64, device=device)
    size = torch.tensor([float(s) for s in spatial_size], **f64)
    half = size / 2  # normalized -> voxel units: v = n * size / 2 (align_corners=False: [-1, 1] spans the volume)
    sign = torch.ones(b, 3, **f64) if flips is None else 1.0 - 2.0 * flips.to(**f64)
    rot = torch.eye(3, **f64).expand(b, 3, 3) if angles is None else _rotation(angles.to(**f64))
    scale = torch.ones(b, **f64) if scales is None else scales.to(**f64)
    shift = torch.zeros(b, 3, **f64) if shifts is None else shifts.to(**f64)
    # inverse in voxels: v_in = flip(R^T (v_out - t)) / s  (a flip is its own inverse)
    inv = sign[:, :, None] * rot.transpose(1, 2) / scale[:, None, None]
    # in normalized coordinates: n_in = S^-1 inv S n_out - S^-1 inv t, S = diag(half)
    a = inv * half[None, None, :] / half[None, :, None]
    t = -(inv @ shift[:, :, None])[:, :, 0] / half[None, :]
    # (D, H, W) -> grid_sample's (x, y, z) = (W, H, D): reverse rows and columns
    return torch.cat([a.flip(1).flip(2), t.flip(1)[:, :, None]], dim=2)


def voxel_centres(n: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """(n,) normalized positions of the voxel centres along an axis of n voxels, ``(2i + 1) / n - 1`` in (-1, 1)
    (grid_sample's ``align_corners=False`` convention)."""
    return (torch.arange(n, dtype=dtype, device=device) * 2 + 1) / n - 1


def affine_grid(theta: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``F.affine_grid(theta, size, align_corners=False)`` for a 5-D ``size`` (B, C, D, H, W), built by broadcasting.

    The grid is affine in each voxel index, ``grid[b, d, h, w] = theta[b] @ (x_w, y_h, z_d, 1)``, so it is the
    sum of three per-axis terms, (W, 3) + (H, 3) + (D, 3), broadcast to (D, H, W, 3): one addition per
    element where ``F.affine_grid`` multiplies a (D*H*W, 4) base grid by theta (on 2 CPU cores, at
    96x112x96, about a tenth of the time; the values agree to float rounding).

    Args:
        theta: (B, 3, 4) in grid_sample's (x=W, y=H, z=D) normalized coordinates (:func:`affine_theta`).
        size: (B, C, D, H, W) of the volumes to sample.

    Returns:
        (B, D, H, W, 3) grid in theta's dtype and device.
    """
    _, _, d, h, w = (int(s) for s in size)
    opts = dict(dtype=theta.dtype, device=theta.device)
    along_w = voxel_centres(w, **opts)[None, :, None] * theta[:, None, :, 0]  # (B, W, 3)
    along_h = voxel_centres(h, **opts)[None, :, None] * theta[:, None, :, 1]  # (B, H, 3)
    along_d = voxel_centres(d, **opts)[None, :, None] * theta[:, None, :, 2] + theta[:, None, :, 3]  # (B, D, 3), with t
    plane = along_d[:, :, None, None, :] + along_h[:, None, :, None, :]  # (B, D, H, 1, 3): small
    return plane + along_w[:, None, None, :, :]  # (B, D, H, W, 3): the one full-size operation


def warp(image: torch.Tensor, mask: torch.Tensor | None,
         theta: torch.Tensor, num_classes: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resample ``image`` trilinearly and ``mask`` trilinearly + threshold >= 0.5 with ``theta`` (B, 3, 4).

    ``num_classes`` K >= 2: ``mask`` (B, 1, D, H, W) holds labels 0..K; their one-hot (B, K+1, D, H, W) is
    interpolated and each voxel takes the label of highest value (ties: the lower label; outside the volume,
    where every channel pads to 0, the background). Zero padding, ``align_corners=False``. Returns new tensors
    with the inputs' shapes and dtypes.
    """
    work = image.dtype if image.dtype in (torch.float32, torch.float64) else torch.float32
    grid = affine_grid(theta.to(device=image.device, dtype=work), image.shape)
    out = F.grid_sample(image.to(work), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = out.to(image.dtype)
    if mask is None:
        return out, None
    if num_classes > 1:
        one_hot = F.one_hot(torch.round(mask[:, 0].float()).long(), num_classes + 1).movedim(-1, 1).to(work)
        m = F.grid_sample(one_hot, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return out, m.argmax(dim=1, keepdim=True).to(mask.dtype)  # (B, 1, D, H, W) labels
    m = F.grid_sample(mask.to(work), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out, (m >= 0.5).to(mask.dtype)


def bias_field(coeffs: torch.Tensor, spatial_size: Sequence[int]) -> torch.Tensor:
    """Smooth positive multiplicative field ``exp(sum_t coeffs[:, t] * phi_t)``, (B, 1, D, H, W).

    ``phi_t`` are the :data:`BIAS_TERMS` tensor products of Legendre polynomials of degree <= 3 on [-1, 1]
    (voxel centres), each scaled to unit root-mean-square over the cube, so with ``coeffs ~ N(0, sd^2 / 19)``
    the log field's RMS over the volume is about ``sd``.

    Args:
        coeffs: (B, len(BIAS_TERMS)) on the target device.
        spatial_size: (D, H, W).
    """
    b, dev, dt = coeffs.shape[0], coeffs.device, coeffs.dtype

    def legendre(n: int) -> torch.Tensor:  # (4, n): P0..P3 at the voxel centres
        x = voxel_centres(n, dtype=dt, device=dev)
        return torch.stack([torch.ones_like(x), x, (3 * x**2 - 1) / 2, (5 * x**3 - 3 * x) / 2])

    full = torch.zeros(b, 4, 4, 4, device=dev, dtype=dt)
    idx = torch.tensor(BIAS_TERMS, device=dev)
    norm = torch.tensor([math.sqrt((2 * i + 1) * (2 * j + 1) * (2 * k + 1)) for i, j, k in BIAS_TERMS],
                        device=dev, dtype=dt)
    full[:, idx[:, 0], idx[:, 1], idx[:, 2]] = coeffs * norm
    d, h, w = (int(s) for s in spatial_size)
    log_field = torch.einsum("bijk,id,jh,kw->bdhw", full, legendre(d), legendre(h), legendre(w))
    return torch.exp(log_field)[:, None]


# ------------------------------------------------------------------------------------ forward's steps


def _check_batch(image: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Raise ValueError unless ``image`` is (B, C, D, H, W) floating point and ``mask`` (B, Cm, D, H, W)."""
    if image.dim() != 5 or not image.is_floating_point():
        raise ValueError(
            f"image must be a 5-D (B, C, D, H, W) floating-point tensor, got {image.dtype} {tuple(image.shape)}"
        )
    if mask is not None and (mask.dim() != 5 or mask.shape[0] != image.shape[0]
                             or mask.shape[2:] != image.shape[2:]):
        raise ValueError(f"mask {tuple(mask.shape)} must be (B, Cm, D, H, W) matching image {tuple(image.shape)}")


def shift_zero_filled(x: torch.Tensor, shifts: Sequence[int]) -> torch.Tensor:
    """``x`` (..., D, H, W) moved by whole voxels, ``shifts`` (sD, sH, sW) (+: towards higher indices), the
    voxels moved in from outside set to 0 (a shift of a whole axis or more leaves zeros). Exact: no resampling."""
    out = torch.zeros_like(x)
    dst, src = [], []
    for n, s in zip(x.shape[-3:], shifts):
        s = int(s)
        if abs(s) >= n:
            return out
        dst.append(slice(s, n) if s >= 0 else slice(0, n + s))
        src.append(slice(0, n - s) if s >= 0 else slice(-s, n))
    out[(..., *dst)] = x[(..., *src)]
    return out


def _flip_shift_unwarped(image: torch.Tensor, mask: torch.Tensor | None, out_image: torch.Tensor,
                         out_mask: torch.Tensor | None, flips: torch.Tensor, shifts: torch.Tensor | None,
                         affine: torch.Tensor) -> None:
    """Write into ``out_*`` each sample that gets no affine, exactly ``torch.flip``-ed (flips (B, 3) bool) and
    then moved by whole voxels (shifts (B, 3) int, or None: no shift; :func:`shift_zero_filled`)."""
    for i in range(image.shape[0]):
        if affine[i]:
            continue  # its flips (and its own translation) are in its affine
        axes = [2 + a for a in range(3) if flips[i, a]]
        shift = [int(v) for v in shifts[i]] if shifts is not None else [0, 0, 0]
        if not axes and not any(shift):
            continue
        for source, out in ((image, out_image), (mask, out_mask)):
            if source is None:
                continue
            moved = torch.flip(source[i], [a - 1 for a in axes]) if axes else source[i]  # (C, D, H, W)
            out[i] = shift_zero_filled(moved, shift) if any(shift) else moved


def _warp_affine_samples(image: torch.Tensor, mask: torch.Tensor | None, out_image: torch.Tensor,
                         out_mask: torch.Tensor | None, p: dict[str, torch.Tensor], affine: torch.Tensor,
                         num_classes: int = 1) -> None:
    """Write into ``out_*`` the samples selected by ``affine`` (B,) resampled with their flips + affine."""
    spatial = image.shape[2:]
    idx = torch.nonzero(affine)[:, 0]  # (n,) CPU indices of the selected samples
    shifts = p["shift_frac"][idx] * torch.tensor([float(s) for s in spatial], dtype=torch.float64)  # voxels
    theta = affine_theta(spatial, p["flips"][idx], p["angles"][idx], p["scales"][idx], shifts)
    dev_idx = idx.to(image.device)
    warped, warped_mask = warp(image[dev_idx], mask[dev_idx] if mask is not None else None, theta, num_classes)
    out_image[dev_idx] = warped
    if mask is not None:
        out_mask[dev_idx] = warped_mask


# Intensity helpers: x (B, C, D, H, W) float32, fg = (x != 0) before the first intensity transform,
# per-sample flags / values (B,) on the CPU. Each returns a new x, changed only at selected samples' fg.

_SAMPLE_DIMS = (2, 3, 4)  # reduce over (D, H, W): one statistic per sample and channel


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) CPU float64 -> (B, 1, 1, 1, 1) on x's device, in x's dtype."""
    return v.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1, 1)


def _selected(fg: torch.Tensor, flag: torch.Tensor) -> torch.Tensor:
    """(B,) bool -> where to write: the selected samples' foreground voxels."""
    return fg & flag.to(fg.device).view(-1, 1, 1, 1, 1)


def _foreground_min(x: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """(B, C, 1, 1, 1) minimum over each sample's and channel's foreground (inf where it is empty)."""
    return torch.where(fg, x, torch.full_like(x, math.inf)).amin(dim=_SAMPLE_DIMS, keepdim=True)


def _foreground_max(x: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """(B, C, 1, 1, 1) maximum over each sample's and channel's foreground (-inf where it is empty)."""
    return torch.where(fg, x, torch.full_like(x, -math.inf)).amax(dim=_SAMPLE_DIMS, keepdim=True)


def _foreground_mean(x: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """(B, C, 1, 1, 1) mean over each sample's and channel's foreground (0 where it is empty)."""
    count = fg.sum(dim=_SAMPLE_DIMS, keepdim=True).clamp_min(1)
    return torch.where(fg, x, torch.zeros_like(x)).sum(dim=_SAMPLE_DIMS, keepdim=True) / count


def _apply_bias_field(x: torch.Tensor, fg: torch.Tensor, flag: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """``lo + (x - lo) * field`` with the foreground minimum ``lo``; coeffs (B, len(BIAS_TERMS)) already scaled."""
    field = bias_field(coeffs.to(device=x.device, dtype=x.dtype), x.shape[2:])  # (B, 1, D, H, W)
    lo = _foreground_min(x, fg)
    return torch.where(_selected(fg, flag), lo + (x - lo) * field, x)


def _apply_contrast(x: torch.Tensor, fg: torch.Tensor, flag: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``mean + c * (x - mean)`` with the foreground mean and the per-sample factor ``c`` (B,)."""
    mean = _foreground_mean(x, fg)
    return torch.where(_selected(fg, flag), mean + (x - mean) * _per_sample(factor, x), x)


def _apply_gamma(x: torch.Tensor, fg: torch.Tensor, flag: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``lo + r * ((x - lo) / r) ** gamma`` with the foreground min ``lo`` and range ``r``, gamma (B,)."""
    lo = _foreground_min(x, fg)
    rng = _foreground_max(x, fg) - lo
    ok = torch.isfinite(rng) & (rng > 0)  # skip empty or constant foregrounds
    rng = torch.where(ok, rng, torch.ones_like(rng))
    lo = torch.where(ok, lo, torch.zeros_like(lo))
    unit = ((x - lo) / rng).clamp(0, 1)
    new = lo + rng * unit.pow(_per_sample(gamma, x))
    return torch.where(_selected(fg, flag) & ok, new, x)


def _apply_noise(x: torch.Tensor, fg: torch.Tensor, flag: torch.Tensor, std: float,
                 generator: torch.Generator | None) -> torch.Tensor:
    """Add N(0, std^2) noise, drawn from ``generator`` for the selected samples only, in sample order."""
    idx = torch.nonzero(flag)[:, 0]
    gen_dev = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn((len(idx),) + tuple(x.shape[1:]), generator=generator, device=gen_dev,
                        dtype=torch.float32)  # (n, C, D, H, W)
    full = torch.zeros_like(x)
    full[idx.to(x.device)] = noise.to(device=x.device, dtype=x.dtype) * std
    return torch.where(_selected(fg, flag), x + full, x)


# ------------------------------------------------------------------------------------------------- module


class BatchAugment(nn.Module):
    """Random augmentation of a whole batch on its device; see the module docstring for the choices.

    Every argument's default disables its transform, so ``BatchAugment()`` is the identity.

    Args:
        flip_prob: probability of flipping each spatial axis, per sample, in [0, 1].
        flip_axes: the axes that may flip (0, 1, 2 of the (D, H, W) = RAS x, y, z volume); default all three.
            ``[0]`` flips left-right only, the one mirror a brain is nearly symmetric under: an upside-down or
            back-to-front head is never seen at test time, and learning to ignore it costs a small model.
        rotation_deg: maximum absolute rotation about each axis in degrees, in [0, 180]; each angle is
            uniform in ``[-rotation_deg, rotation_deg]``.
        scale_range: (low, high), 0 < low <= high: isotropic scale factor, uniform (> 1 enlarges).
        translation_frac: maximum shift along each axis as a fraction of that axis' size, in [0, 1];
            each shift is uniform in ``[-translation_frac, translation_frac] * size`` voxels.
        affine_prob: probability that a sample gets the random affine (rotation, scale, translation), in [0, 1].
        gamma_range: (low, high), 0 < low <= high, or None: gamma is log-uniform in the range (so gamma
            and 1/gamma are equally likely for a symmetric range); applied as ``lo + r * ((x - lo) / r) ** gamma``
            with the sample's foreground min ``lo`` and range ``r`` (intensities rescaled to [0, 1] and back).
        gamma_prob: probability of the gamma transform per sample, in [0, 1]; > 0 needs ``gamma_range``.
        noise_std: standard deviation of the additive Gaussian noise (z-score units), >= 0.
        noise_prob: probability of noise per sample, in [0, 1].
        bias_field_std: strength of the smooth multiplicative bias field, >= 0: RMS over the volume of its
            log, a degree-3 Legendre polynomial with random coefficients (see :func:`bias_field`). The
            field multiplies the intensities measured from the sample's foreground minimum,
            ``lo + (x - lo) * field`` (z-scored data are negative in places; this stands in for the raw,
            non-negative MRI intensities a real bias field multiplies).
        bias_prob: probability of the bias field per sample, in [0, 1].
        contrast_range: (low, high), 0 < low <= high, or None: factor ``c`` uniform in the range,
            ``x -> mean + c * (x - mean)`` with the sample's foreground mean.
        contrast_prob: probability of the contrast change per sample, in [0, 1]; > 0 needs ``contrast_range``.
        shift_voxels: maximum shift by whole voxels along each axis, >= 0 (an integer): each sample that gets
            no affine is moved by an integer drawn uniformly from ``[-shift_voxels, shift_voxels]`` per axis,
            zero filled (exact, no resampling, as brain-age CNNs such as SFCN augment: an interpolated affine
            low-pass filters the thin cortical ribbon whose contrast carries age); the mask moves with it.

    Raises:
        ValueError: an argument outside its range (the message names the argument, its value and the range).
    """

    def __init__(
        self,
        flip_prob: float = 0.0,
        rotation_deg: float = 0.0,
        scale_range: Sequence[float] = (1.0, 1.0),
        translation_frac: float = 0.0,
        affine_prob: float = 0.0,
        gamma_range: Sequence[float] | None = None,
        gamma_prob: float = 0.0,
        noise_std: float = 0.0,
        noise_prob: float = 0.0,
        bias_field_std: float = 0.0,
        bias_prob: float = 0.0,
        contrast_range: Sequence[float] | None = None,
        contrast_prob: float = 0.0,
        flip_axes: Sequence[int] = (0, 1, 2),
        shift_voxels: int = 0,
    ) -> None:
        super().__init__()
        self.flip_prob = _in_range(flip_prob, "flip_prob", 0.0, 1.0)
        axes = [int(a) for a in flip_axes]
        if not set(axes) <= {0, 1, 2}:
            raise ValueError(f"flip_axes must be a list of the axes 0, 1, 2 (RAS x, y, z), got {list(flip_axes)!r}")
        self.flip_axes = tuple(sorted(set(axes)))
        self.rotation_deg = _in_range(rotation_deg, "rotation_deg", 0.0, 180.0)
        self.scale_range = _pair(scale_range, "scale_range", allow_none=False)
        self.translation_frac = _in_range(translation_frac, "translation_frac", 0.0, 1.0)
        self.affine_prob = _in_range(affine_prob, "affine_prob", 0.0, 1.0)
        self.gamma_range = _pair(gamma_range, "gamma_range", allow_none=True)
        self.gamma_prob = _in_range(gamma_prob, "gamma_prob", 0.0, 1.0)
        self.noise_std = _non_negative(noise_std, "noise_std")
        self.noise_prob = _in_range(noise_prob, "noise_prob", 0.0, 1.0)
        self.bias_field_std = _non_negative(bias_field_std, "bias_field_std")
        self.bias_prob = _in_range(bias_prob, "bias_prob", 0.0, 1.0)
        self.contrast_range = _pair(contrast_range, "contrast_range", allow_none=True)
        self.contrast_prob = _in_range(contrast_prob, "contrast_prob", 0.0, 1.0)
        if isinstance(shift_voxels, bool) or int(_non_negative(shift_voxels, "shift_voxels")) != shift_voxels:
            raise ValueError(f"shift_voxels must be a whole number of voxels >= 0, got {shift_voxels!r}")
        self.shift_voxels = int(shift_voxels)
        if self.gamma_prob > 0 and self.gamma_range is None:
            raise ValueError(
                f"gamma_prob={gamma_prob!r} > 0 needs gamma_range, a (low, high) pair with 0 < low <= high; got None"
            )
        if self.contrast_prob > 0 and self.contrast_range is None:
            raise ValueError(
                f"contrast_prob={contrast_prob!r} > 0 needs contrast_range, a (low, high) pair with 0 < low <= high; "
                "got None"
            )

    # which transforms can do anything
    @property
    def _flip_on(self) -> bool:
        return self.flip_prob > 0 and bool(self.flip_axes)

    @property
    def _affine_on(self) -> bool:
        return self.affine_prob > 0 and (
            self.rotation_deg > 0 or self.scale_range != (1.0, 1.0) or self.translation_frac > 0
        )

    @property
    def _shift_on(self) -> bool:
        return self.shift_voxels > 0

    @property
    def _gamma_on(self) -> bool:
        return self.gamma_prob > 0 and self.gamma_range != (1.0, 1.0)

    @property
    def _noise_on(self) -> bool:
        return self.noise_prob > 0 and self.noise_std > 0

    @property
    def _bias_on(self) -> bool:
        return self.bias_prob > 0 and self.bias_field_std > 0

    @property
    def _contrast_on(self) -> bool:
        return self.contrast_prob > 0 and self.contrast_range != (1.0, 1.0)

    @property
    def is_identity(self) -> bool:
        """True when no transform is enabled (``forward`` then returns copies of its inputs)."""
        return not (self._flip_on or self._affine_on or self._shift_on or self._gamma_on or self._noise_on
                    or self._bias_on or self._contrast_on)

    def extra_repr(self) -> str:
        names = [
            "flip_prob", "flip_axes", "rotation_deg", "scale_range", "translation_frac", "affine_prob", "gamma_range",
            "gamma_prob", "noise_std", "noise_prob", "bias_field_std", "bias_prob", "contrast_range", "contrast_prob",
            "shift_voxels",
        ]  # fmt: skip
        return ", ".join(f"{n}={getattr(self, n)}" for n in names)

    def _draw(self, b: int, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """All per-sample parameters, in a fixed order, on CPU (float64)."""
        dev = generator.device if generator is not None else torch.device("cpu")

        def u(*shape):  # uniform [0, 1)
            return torch.rand(*shape, generator=generator, device=dev, dtype=torch.float64)

        p = {}
        allowed = torch.tensor([a in self.flip_axes for a in range(3)], device=dev)
        p["flips"] = (u(b, 3) < self.flip_prob) & allowed  # the same draws whatever flip_axes (seeds compare)
        p["affine"] = u(b) < self.affine_prob
        p["angles"] = (2 * u(b, 3) - 1) * math.radians(self.rotation_deg)
        lo, hi = self.scale_range
        p["scales"] = lo + (hi - lo) * u(b)
        p["shift_frac"] = (2 * u(b, 3) - 1) * self.translation_frac
        p["bias"] = u(b) < self.bias_prob
        p["bias_coeffs"] = torch.randn(b, len(BIAS_TERMS), generator=generator, device=dev, dtype=torch.float64)
        p["contrast"] = u(b) < self.contrast_prob
        lo, hi = self.contrast_range or (1.0, 1.0)
        p["contrast_factor"] = lo + (hi - lo) * u(b)
        p["gamma"] = u(b) < self.gamma_prob
        lo, hi = self.gamma_range or (1.0, 1.0)
        p["gamma_value"] = torch.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * u(b))
        p["noise"] = u(b) < self.noise_prob
        if self._shift_on:  # drawn last and only when on, so every other draw of a seed is what it was without
            p["int_shifts"] = (u(b, 3) * (2 * self.shift_voxels + 1)).floor().long() - self.shift_voxels
        return {k: v.cpu() for k, v in p.items()}

    @torch.no_grad()
    def forward(
        self, image: torch.Tensor, mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
        num_classes: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Augment a batch.

        Args:
            image: (B, C, D, H, W) floating-point batch (brain3d: z-scored, background 0).
            mask: optional (B, Cm, D, H, W) binary mask (any dtype, values in {0, 1}); transformed with the
                image's spatial transform only.
            generator: source of all randomness (``None``: torch's default CPU generator). Use a CPU
                generator for results that do not depend on the device.
            num_classes: 1 (default): ``mask`` is binary. K >= 2: ``mask`` (B, 1, D, H, W) is a label map of
                labels 0..K, warped per label (:func:`warp`); flips move it unchanged.

        Returns:
            ``(image, mask)``: new tensors with the inputs' shapes, dtypes and devices (``mask`` None if not given).

        Raises:
            ValueError: ``image`` is not a 5-D floating-point tensor, or ``mask`` does not match it.
        """
        _check_batch(image, mask)
        out_image, out_mask = image.clone(), (mask.clone() if mask is not None else None)
        b = image.shape[0]
        if self.is_identity or b == 0:
            return out_image, out_mask
        p = self._draw(b, generator)  # every per-sample parameter, before any transform draws noise

        # spatial: resample the affine samples (flips folded in), torch.flip and whole-voxel shift the others
        affine = p["affine"] if self._affine_on else torch.zeros(b, dtype=torch.bool)
        _flip_shift_unwarped(image, mask, out_image, out_mask, p["flips"], p.get("int_shifts"),
                             affine)
        if affine.any():
            _warp_affine_samples(image, mask, out_image, out_mask, p, affine, num_classes)

        # intensity: foreground = nonzero after the spatial transform; background stays exactly 0
        if not (self._bias_on or self._contrast_on or self._gamma_on or self._noise_on):
            return out_image, out_mask
        return self._intensity(out_image, p, generator).to(image.dtype), out_mask

    def _intensity(self, image: torch.Tensor, p: dict[str, torch.Tensor],
                   generator: torch.Generator | None) -> torch.Tensor:
        """Bias field, contrast, gamma, noise (in this order) on the spatially transformed ``image``, as float32.

        The foreground mask is taken once, before the first transform; the noise is the only draw from
        ``generator`` after :meth:`_draw`.
        """
        x = image.float()  # (B, C, D, H, W)
        fg = x != 0
        if self._bias_on and p["bias"].any():
            coeffs = p["bias_coeffs"] * (self.bias_field_std / math.sqrt(len(BIAS_TERMS)))
            x = _apply_bias_field(x, fg, p["bias"], coeffs)
        if self._contrast_on and p["contrast"].any():
            x = _apply_contrast(x, fg, p["contrast"], p["contrast_factor"])
        if self._gamma_on and p["gamma"].any():
            x = _apply_gamma(x, fg, p["gamma"], p["gamma_value"])
        if self._noise_on and p["noise"].any():
            x = _apply_noise(x, fg, p["noise"], self.noise_std, generator)
        return x
