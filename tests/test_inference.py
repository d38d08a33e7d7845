"""Tests for the inference building blocks: native-grid round trips, preprocessing,
ensemble/TTA outputs and Grad-CAM (CPU, a few seconds)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn as nn
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

from brain3d.data.nifti import (
    NativeGrid,
    load_mask,
    load_nifti,
    load_nifti_with_grid,
    save_on_native_grid,
    to_native_orientation,
)
from brain3d.inference import flip_combinations, predict_outputs, tta_flip_axes
from brain3d.models.heads import GlobalPoolHead
from brain3d.models.model import Brain3DModel, build_model
from brain3d.saliency import grad_cam

# Non-cubic shape, anisotropic voxels (1.2 x 1.0 x 1.5 mm) and an off-centre origin.
SHAPE = (9, 6, 7)
RAS_AFFINE = np.array(
    [[1.2, 0, 0, -20.0], [0, 1.0, 0, 13.5], [0, 0, 1.5, -7.25], [0, 0, 0, 1]], dtype=np.float64
)
ORIENTATIONS = [("R", "A", "S"), ("L", "A", "S"), ("L", "P", "S"), ("P", "S", "R"), ("A", "S", "L"), ("S", "L", "P")]


def _ras_data() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.normal(size=SHAPE).astype(np.float32)  # every voxel distinct


def _reorient(data, affine, codes):
    """The same volume stored in orientation ``codes``."""
    xform = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(codes))
    return apply_orientation(data, xform), affine @ inv_ornt_aff(xform, data.shape)


def _write(path, data, affine, qform_code=1, sform_code=1):
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=qform_code)
    img.set_sform(affine, code=sform_code)
    nib.save(img, str(path))
    return path


def _saved_twin(tmp_path, codes, name="in.nii.gz"):
    """Write the RAS volume in orientation ``codes``; return (path, on-disk data, on-disk affine as read)."""
    data, aff = _reorient(_ras_data(), RAS_AFFINE, codes)
    path = _write(tmp_path / name, np.ascontiguousarray(data), aff)
    img = nib.load(str(path))
    assert nib.aff2axcodes(img.affine) == codes
    return path, img.get_fdata(), img.affine


# --------------------------------------------------------------------------- native grid


@pytest.mark.parametrize("codes", ORIENTATIONS, ids="".join)
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_native_grid_round_trip_is_exact(tmp_path, codes, suffix):
    path, on_disk, disk_affine = _saved_twin(tmp_path, codes, "in" + suffix)
    ras, ras_aff, grid = load_nifti_with_grid(path)

    # Same as load_nifti, and the grid describes the file.
    ref, ref_aff = load_nifti(path)
    np.testing.assert_array_equal(ras, ref)
    np.testing.assert_array_equal(ras_aff, ref_aff)
    assert ras.dtype == np.float32 and ras_aff.dtype == np.float64
    assert isinstance(grid, NativeGrid)
    assert grid.shape == on_disk.shape and grid.ras_shape == SHAPE == ras.shape
    np.testing.assert_array_equal(grid.affine, disk_affine)
    assert grid.affine.dtype == np.float64
    np.testing.assert_allclose(grid.voxel_size_mm, (1.2, 1.0, 1.5), rtol=1e-6)  # RAS axis order
    assert grid.header is not None

    np.testing.assert_array_equal(to_native_orientation(ras, grid), on_disk)
    out = save_on_native_grid(ras, grid, tmp_path / "sub" / ("out" + suffix), np.float32)
    assert out == tmp_path / "sub" / ("out" + suffix)
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temp file left
    img = nib.load(str(out))
    assert img.shape == on_disk.shape
    assert img.get_data_dtype() == np.float32
    np.testing.assert_array_equal(img.affine, disk_affine)
    np.testing.assert_array_equal(img.get_fdata(), on_disk)
    assert (int(img.header["qform_code"]), int(img.header["sform_code"])) == (1, 1)
    assert (img.dataobj.slope, img.dataobj.inter) == (1.0, 0.0)  # stored unscaled


@pytest.mark.parametrize("codes", [("L", "A", "S"), ("P", "S", "R")], ids="".join)
def test_mask_saved_as_uint8_on_native_grid(tmp_path, codes):
    path, on_disk, disk_affine = _saved_twin(tmp_path, codes)
    ras, _, grid = load_nifti_with_grid(path)
    mask = (ras > 0).astype(np.uint8)
    img = nib.load(str(save_on_native_grid(mask, grid, tmp_path / "mask.nii.gz", np.uint8)))
    assert img.get_data_dtype() == np.uint8
    assert (img.dataobj.slope, img.dataobj.inter) == (1.0, 0.0)
    np.testing.assert_array_equal(np.asarray(img.dataobj), (on_disk > 0).astype(np.uint8))
    np.testing.assert_array_equal(img.affine, disk_affine)


def test_mask_from_ras_and_las_copies_agree(tmp_path):
    """A mask computed in RAS space lands on the same anatomy whatever the input layout."""
    ras_path, _, _ = _saved_twin(tmp_path, ("R", "A", "S"), "ras.nii.gz")
    las_path, las_disk, _ = _saved_twin(tmp_path, ("L", "A", "S"), "las.nii.gz")
    results = {}
    for name, path in (("ras", ras_path), ("las", las_path)):
        image, _, grid = load_nifti_with_grid(path)
        mask = (image > 0.3).astype(np.uint8)  # stand-in for a model's thresholded output
        out = save_on_native_grid(mask, grid, tmp_path / f"mask_{name}.nii.gz", np.uint8)
        results[name] = load_mask(out)
    np.testing.assert_array_equal(results["las"][0], results["ras"][0])
    np.testing.assert_allclose(results["las"][1], results["ras"][1], atol=1e-6)
    # ...and the LAS output really is stored in LAS order (left-right flipped on disk).
    las_mask = np.asarray(nib.load(str(tmp_path / "mask_las.nii.gz")).dataobj)
    np.testing.assert_array_equal(las_mask, (las_disk > 0.3).astype(np.uint8))
    np.testing.assert_array_equal(las_mask, results["ras"][0][::-1])


@pytest.mark.parametrize("codes", [(0, 2), (1, 0), (0, 0)])
def test_header_codes_are_copied(tmp_path, codes):
    data, aff = _reorient(_ras_data(), RAS_AFFINE, ("L", "P", "S"))
    path = _write(tmp_path / "in.nii.gz", np.ascontiguousarray(data), aff, *codes)
    src = nib.load(str(path))
    ras, _, grid = load_nifti_with_grid(path)
    img = nib.load(str(save_on_native_grid(ras, grid, tmp_path / "out.nii.gz", np.float32)))
    assert (int(img.header["qform_code"]), int(img.header["sform_code"])) == codes
    np.testing.assert_allclose(img.affine, src.affine, atol=1e-5)
    np.testing.assert_array_equal(img.get_fdata(), src.get_fdata())


def test_singleton_4d_input_written_3d(tmp_path):
    data, aff = _reorient(_ras_data(), RAS_AFFINE, ("A", "S", "L"))
    path = _write(tmp_path / "in.nii.gz", np.ascontiguousarray(data)[..., None], aff)
    ras, _, grid = load_nifti_with_grid(path)
    assert ras.shape == SHAPE and grid.shape == data.shape
    img = nib.load(str(save_on_native_grid(ras, grid, tmp_path / "out.nii.gz", np.float32)))
    assert img.shape == data.shape
    np.testing.assert_array_equal(img.get_fdata(), data)


def test_to_native_orientation_rejects_wrong_shape(tmp_path):
    path, _, _ = _saved_twin(tmp_path, ("P", "S", "R"))
    ras, _, grid = load_nifti_with_grid(path)
    with pytest.raises(ValueError, match="RAS shape"):
        to_native_orientation(ras.transpose(1, 0, 2), grid)
    with pytest.raises(ValueError, match="RAS shape"):
        save_on_native_grid(ras[:-1], grid, tmp_path / "x.nii.gz", np.float32)
    assert not (tmp_path / "x.nii.gz").exists()


# --------------------------------------------------------------------------- predict_outputs


def _tiny(head_cfg: dict, head_name: str, seed: int = 0) -> Brain3DModel:
    torch.manual_seed(seed)
    model = build_model({"_target_": "brain3d.models.backbones.PlainBackbone", "width": 0.125}, head_cfg, head_name)
    return model.eval()


SEG = {"_target_": "brain3d.models.heads.SegmentationHead"}
GLOBAL = {"_target_": "brain3d.models.heads.GlobalPoolHead", "out_features": 2}


def _symmetric_image(batch: int = 1) -> torch.Tensor:
    """Invariant under every flip of the 3 spatial axes."""
    x = torch.randn(batch, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    for axes in flip_combinations()[1:]:
        x = x + torch.flip(x, axes)
    return x / 8


def test_flip_combinations():
    combos = flip_combinations()
    assert len(combos) == 8 and len(set(combos)) == 8 and combos[0] == ()


def test_predict_outputs_segmentation_no_tta_is_sigmoid():
    model = _tiny(SEG, "seg")
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    out = predict_outputs([model], x, "seg", "segmentation")
    assert out.shape == (1, 1, 32, 32, 32) and out.dtype == torch.float32
    with torch.no_grad():
        expected = torch.sigmoid(model(x)["seg"])
    torch.testing.assert_close(out, expected)
    assert 0 <= out.min() and out.max() <= 1
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("head_cfg,task", [(SEG, "segmentation"), (GLOBAL, "classification"), (GLOBAL, "regression")])
def test_predict_outputs_tta_on_symmetric_input_equals_no_tta(head_cfg, task):
    model = _tiny(head_cfg, "out")
    x = _symmetric_image()
    plain = predict_outputs([model], x, "out", task)
    tta = predict_outputs([model], x, "out", task, tta=True)
    if plain.dim() == 5:
        # model(flip(x)) == model(x) here, and TTA flips each voxel-wise output back, so
        # TTA gives the flip-symmetrised plain output (a conv net is not flip-equivariant).
        expected = sum(torch.flip(plain, axes) for axes in flip_combinations()) / 8
        assert not torch.allclose(expected, plain, atol=1e-3)
    else:  # a per-volume output is simply the same 8 times
        expected = plain
    torch.testing.assert_close(tta, expected, atol=1e-5, rtol=1e-4)


def test_predict_outputs_tta_flips_voxelwise_outputs_back():
    """A model that outputs its input: TTA must return the input itself, not a flipped mix."""

    class Identity(nn.Module):
        def forward(self, x):
            return {"seg": x}

    x = torch.randn(2, 1, 16, 12, 8, generator=torch.Generator().manual_seed(3))
    out = predict_outputs([Identity()], x, "seg", "regression", tta=True)
    torch.testing.assert_close(out, x)
    probs = predict_outputs([Identity()], x, "seg", "segmentation", tta=True)
    torch.testing.assert_close(probs, torch.sigmoid(x))


def test_predict_outputs_tta_averages_probabilities_not_logits():
    class Global(nn.Module):  # a (B, 1) output that depends on the flip
        def forward(self, x):
            return {"cls": 10 * x[:, :, 0, 0, :1].reshape(x.shape[0], 1)}

    x = torch.zeros(1, 1, 4, 4, 4)
    x[0, 0, 0, 0, 0] = 1.0  # logit 10 unflipped, 0 once axis 2 or 3 is flipped
    x[0, 0, 3, 3, 0] = -0.5  # logit -5 when both are flipped
    out = predict_outputs([Global()], x, "cls", "classification", tta=True)
    flips = flip_combinations()
    expected = sum(torch.sigmoid(10 * torch.flip(x, a)[:, :, 0, 0, :1].reshape(1, 1)) for a in flips) / 8
    torch.testing.assert_close(out, expected)
    mean_logit = torch.tensor([[(10.0 - 5.0) / 8]])
    assert (torch.sigmoid(mean_logit) - out).abs().item() > 0.1  # sigmoid(mean logit) is not what we want


def test_predict_outputs_ensemble_of_identical_models_equals_one():
    a, b = _tiny(SEG, "seg", seed=5), _tiny(SEG, "seg", seed=5)
    x = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(4))
    one = predict_outputs([a], x, "seg", "segmentation", tta=True)
    two = predict_outputs([a, b], x, "seg", "segmentation", tta=True)
    torch.testing.assert_close(two, one)
    assert one.shape == (2, 1, 32, 32, 32)


def test_predict_outputs_ensemble_averages():
    a, b = _tiny(GLOBAL, "cls", seed=6), _tiny(GLOBAL, "cls", seed=7)
    x = torch.randn(3, 1, 32, 32, 32, generator=torch.Generator().manual_seed(5))
    both = predict_outputs([a, b], x, "cls", "classification")
    expected = (predict_outputs([a], x, "cls", "classification") + predict_outputs([b], x, "cls", "classification")) / 2
    torch.testing.assert_close(both, expected)
    assert both.shape == (3, 2)


def test_predict_outputs_regression_returns_raw_values():
    model = _tiny(GLOBAL, "age")
    with torch.no_grad():
        model.heads["age"].mlp[-1].bias.fill_(-50.0)  # far below 0: a sigmoid would hide it
    x = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(6))
    out = predict_outputs([model], x, "age", "regression")
    with torch.no_grad():
        expected = model(x)["age"]
    torch.testing.assert_close(out, expected)
    assert out.shape == (2, 2) and (out < 0).all()


def test_predict_outputs_amp_and_errors():
    model = _tiny(GLOBAL, "cls")
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(7))
    out = predict_outputs([model], x, "cls", "classification", amp_dtype=torch.bfloat16)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, predict_outputs([model], x, "cls", "classification"), atol=0.05, rtol=0)
    with pytest.raises(ValueError, match="task"):
        predict_outputs([model], x, "cls", "survival")
    with pytest.raises(ValueError, match="head"):
        predict_outputs([model], x, "nope", "classification")
    with pytest.raises(ValueError, match="at least one"):
        predict_outputs([], x, "cls", "classification")
    with pytest.raises(ValueError, match="5-D"):
        predict_outputs([model], x[0], "cls", "classification")


# --------------------------------------------------------------------------- grad_cam


@pytest.mark.parametrize("head_cfg", [GLOBAL, SEG], ids=["global", "seg"])
def test_grad_cam_shape_range_and_no_param_grads(head_cfg):
    model = _tiny(head_cfg, "out")
    model.train()  # grad_cam switches to eval for the call and restores the mode
    x = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():  # grads are enabled locally
        cam = grad_cam(model, x, "out", target_index=0)
    assert model.training
    assert isinstance(cam, np.ndarray) and cam.shape == (2, 32, 32, 32) and cam.dtype == np.float32
    assert np.isfinite(cam).all() and cam.min() >= 0 and cam.max() <= 1
    assert all(p.grad is None for p in model.parameters())
    assert not x.requires_grad and x.grad is None
    for b in range(2):  # each non-empty volume peaks at exactly 1 and is not constant
        if cam[b].max() > 0:
            assert cam[b].max() == pytest.approx(1.0) and cam[b].std() > 0
    assert any(cam[b].std() > 0 for b in range(2))


class _SignBackbone(nn.Module):
    """f4 = [pooled positive part, pooled negative part] of the input, at 1/16 resolution."""

    feature_channels = (1, 1, 1, 2)

    def forward(self, x):
        f4 = torch.cat([_avg16(torch.relu(x)), _avg16(torch.relu(-x))], dim=1)
        return [x, x, x, f4]


def _avg16(x):
    return nn.functional.avg_pool3d(x, 16)


def test_grad_cam_highlights_the_informative_region():
    """The head reads only the positive channel: the positive blob (left half) lights up,
    the equally strong negative blob (right half) does not."""
    head = GlobalPoolHead(_SignBackbone.feature_channels, out_features=1, hidden_features=1, dropout=0.0)
    with torch.no_grad():
        head.mlp[0].weight.copy_(torch.tensor([[1.0, 0.0]]))  # uses channel 0 only
        head.mlp[0].bias.zero_()
        head.mlp[-1].weight.fill_(1.0)
    model = Brain3DModel(_SignBackbone(), {"cls": head})
    x = torch.zeros(1, 1, 64, 32, 32)
    x[0, 0, 4:12, 8:24, 8:24] = 1.0  # positive blob, left half (axis 0 < 32)
    x[0, 0, 52:60, 8:24, 8:24] = -1.0  # negative blob, right half
    cam = grad_cam(model, x, "cls")
    assert cam.shape == (1, 64, 32, 32)
    left, right = cam[0, :32], cam[0, 32:]
    assert left.max() == pytest.approx(1.0)
    assert right.max() < 0.5 * left.max()
    assert cam[0, 4:12, 8:24, 8:24].mean() > 0.3
    assert all(p.grad is None for p in model.parameters())

    # Explaining a head that ignores f4 entirely gives an all-zero map, not NaNs.
    with torch.no_grad():
        head.mlp[0].weight.zero_()
    cam = grad_cam(model, x, "cls")
    assert np.array_equal(cam, np.zeros_like(cam))


def test_grad_cam_errors():
    model = _tiny(GLOBAL, "cls")
    x = torch.randn(1, 1, 32, 32, 32)
    with pytest.raises(ValueError, match="head"):
        grad_cam(model, x, "nope")
    with pytest.raises(ValueError, match="5-D"):
        grad_cam(model, x[0], "cls")
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        grad_cam(model, x, "cls")


def test_flip_combinations_of_named_axes():
    assert flip_combinations((0,)) == [(), (2,)]
    assert flip_combinations((2, 0)) == [(), (2,), (4,), (2, 4)]
    assert flip_combinations(()) == [()]


@pytest.mark.parametrize("value,axes", [(None, ()), (False, ()), ([], ()), (True, (0, 1, 2)), ([0], (0,)),
                                        ([2, 0], (0, 2))])
def test_tta_flip_axes_reads_every_form(value, axes):
    assert tta_flip_axes(value) == axes


@pytest.mark.parametrize("value", [[3], [0, 0], "lr", [True], 1])
def test_tta_flip_axes_refuses_what_is_not_a_list_of_axes(value):
    with pytest.raises(ValueError, match="trainer.val_flip_axes=.*0, 1, 2"):
        tta_flip_axes(value, "trainer.val_flip_axes")


class _Corner(nn.Module):
    """A per-volume output that reads one corner voxel: flipping axis 0 (dim 2) reads the opposite one."""

    def __init__(self, name: str = "age"):
        super().__init__()
        self.name = name

    def forward(self, x):
        return {self.name: x[:, :, 0, 0, 0].reshape(x.shape[0], 1)}


def test_predict_outputs_left_right_tta_averages_the_volume_and_its_mirror():
    x = torch.randn(3, 1, 4, 5, 6, generator=torch.Generator().manual_seed(4))
    out = predict_outputs([_Corner()], x, "age", "regression", tta=[0])
    torch.testing.assert_close(out, (x[:, :, 0, 0, 0] + x[:, :, -1, 0, 0]).reshape(3, 1) / 2)


def test_evaluate_with_val_flip_axes_scores_the_mean_of_the_volume_and_its_mirror():
    """engine.evaluate(flip_axes=(0,)): MAE and loss of the decoded mean of the two passes, by hand."""
    from brain3d import engine
    from brain3d.tasks import single_task

    gen = torch.Generator().manual_seed(5)
    batches = [{"image": torch.randn(2, 1, 4, 4, 4, generator=gen), "target": torch.tensor([[60.0], [30.0]]),
                "subject_id": [f"s{2 * i}", f"s{2 * i + 1}"]} for i in range(2)]
    task = single_task("regression", nn.L1Loss(), target_mean=50.0, target_std=10.0)
    model = _Corner("regression")  # a single-task run's head is named after its kind
    plain, _ = engine.evaluate(model, batches, None, task, torch.device("cpu"), None, progress=False)
    flipped, outputs = engine.evaluate(model, batches, None, task, torch.device("cpu"), None, progress=False,
                                       flip_axes=(0,))
    image = torch.cat([b["image"] for b in batches])
    target = torch.cat([b["target"] for b in batches]).reshape(-1)
    mean_logit = (image[:, 0, 0, 0, 0] + image[:, 0, -1, 0, 0]) / 2
    np.testing.assert_allclose(outputs["predictions"], (mean_logit * 10 + 50).numpy(), rtol=1e-6)
    assert flipped["mae"] == pytest.approx((mean_logit * 10 + 50 - target).abs().mean().item(), rel=1e-5)
    assert plain["mae"] == pytest.approx((image[:, 0, 0, 0, 0] * 10 + 50 - target).abs().mean().item(), rel=1e-5)
    assert flipped["loss"] == pytest.approx((mean_logit - (target - 50) / 10).abs().mean().item(), rel=1e-5)
    assert flipped["mae"] != pytest.approx(plain["mae"])
