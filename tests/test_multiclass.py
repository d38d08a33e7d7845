"""Multi-class segmentation (task.num_classes=K): the Dice + cross-entropy loss, per-label metrics, label maps
through resampling, the cache and augmentation, a three-label run end to end, and its one-line errors."""

from __future__ import annotations

import csv
import json
import math
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform
from scipy import ndimage

from brain3d.augment import BatchAugment
from brain3d.data import cache
from brain3d.data.manifest import ManifestError, load_manifest
from brain3d.data.nifti import load_label_map, resize_label_map, resize_mask, resize_volume, save_nifti
from brain3d.data.preprocess import preprocess_volume
from brain3d.evaluation import label_map_case_metrics, label_map_report
from brain3d.losses import DiceCELoss
from brain3d.metrics import dice_per_class
from brain3d.tasks import MultiClassSegmentationTask, build_task_set
from brain3d.train import ConfigError, build_loss

from tests.conftest import CONFIG_DIR, read_summary, run_train, tiny_overrides

NAMES = ["csf", "gm", "wm"]
THREE_LABELS = ["task=segmentation", "task.num_classes=3", "loss=dice_ce"]


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def components(mask: np.ndarray) -> int:
    return ndimage.label(mask, structure=np.ones((3, 3, 3)))[1]


# ---------------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------------

# 4 voxels, 2 labels plus background: the softmax of log(P) is P, so the hand computation below uses P itself.
P = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.5, 0.25, 0.25]])  # (voxel, class)
LABELS = [0, 1, 2, 1]
# label 1: sum p = 1.45, sum t = 2, sum p*t = 0.8 + 0.25 -> Dice 2.1 / 3.45
# label 2: sum p = 1.05, sum t = 1, sum p*t = 0.6 -> Dice 1.2 / 2.05
HAND_DICE_LOSS = 1.0 - (2.1 / 3.45 + 1.2 / 2.05) / 2  # 0.40297 (the background is left out)
HAND_CE = -(math.log(0.7) + math.log(0.8) + math.log(0.6) + math.log(0.25)) / 4  # 0.61923


def tiny_batch() -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.log(torch.tensor(P, dtype=torch.float32)).T.reshape(1, 3, 4, 1, 1)  # (B, K+1, D, H, W)
    target = torch.tensor(LABELS, dtype=torch.float32).reshape(1, 1, 4, 1, 1)
    return logits, target


def test_dice_ce_loss_matches_a_hand_computation():
    logits, target = tiny_batch()
    assert DiceCELoss(ce_weight=0.0)(logits, target).item() == pytest.approx(HAND_DICE_LOSS, abs=1e-5)
    assert DiceCELoss(dice_weight=0.0)(logits, target).item() == pytest.approx(HAND_CE, abs=1e-6)
    assert DiceCELoss()(logits, target).item() == pytest.approx(HAND_DICE_LOSS + HAND_CE, abs=1e-5)
    weighted = DiceCELoss(dice_weight=2.0, ce_weight=0.5)(logits, target).item()
    assert weighted == pytest.approx(2 * HAND_DICE_LOSS + 0.5 * HAND_CE, abs=1e-5)
    # integer targets give the same; bf16 logits under autocast are computed in float32
    assert DiceCELoss()(logits, target.long()).item() == pytest.approx(HAND_DICE_LOSS + HAND_CE, abs=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = DiceCELoss()(logits.bfloat16(), target)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(DiceCELoss()(logits.bfloat16().float(), target).item(), abs=1e-6)


def test_batch_dice_pools_the_samples_voxels():
    logits, target = tiny_batch()
    other_logits, other_target = torch.randn(1, 3, 4, 1, 1), torch.tensor([2.0, 2, 0, 1]).reshape(1, 1, 4, 1, 1)
    both_logits, both_target = torch.cat([logits, other_logits]), torch.cat([target, other_target])
    pooled = DiceCELoss(ce_weight=0.0, batch=True)(both_logits, both_target)  # as one sample of all 8 voxels
    joined = DiceCELoss(ce_weight=0.0)(torch.cat([logits, other_logits], dim=2), torch.cat([target, other_target], 2))
    assert pooled.item() == pytest.approx(joined.item(), abs=1e-6)
    per_sample = DiceCELoss(ce_weight=0.0)(both_logits, both_target)  # the mean of each sample's Dice loss
    own = [DiceCELoss(ce_weight=0.0)(lg, tg).item() for lg, tg in ((logits, target), (other_logits, other_target))]
    assert per_sample.item() == pytest.approx(sum(own) / 2, abs=1e-6)


def test_dice_ce_loss_refuses_bad_arguments():
    logits, target = tiny_batch()
    with pytest.raises(ValueError, match="must not both be zero"):
        DiceCELoss(dice_weight=0.0, ce_weight=0.0)
    with pytest.raises(ValueError, match="K\\+1 >= 2 classes"):
        DiceCELoss()(logits[:, :1], target)
    with pytest.raises(ValueError, match="target must be the label map"):
        DiceCELoss()(logits, target[:, :, :2])


# ---------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------

def random_label_maps(rng: np.random.Generator, shape=(24, 20, 16)) -> tuple[np.ndarray, np.ndarray]:
    """(pred, true) label maps 0..3: blobs of each label, the prediction shifted and partly wrong."""
    true = np.zeros(shape, dtype=np.uint8)
    for label in (1, 2, 3):
        for _ in range(2):
            c = [int(rng.integers(3, s - 3)) for s in shape]
            r = int(rng.integers(2, 5))
            true[tuple(slice(max(x - r, 0), x + r) for x in c)] = label
    pred = np.roll(true, int(rng.integers(-2, 3)), axis=int(rng.integers(0, 3)))
    pred[rng.random(shape) < 0.02] = int(rng.integers(1, 4))
    return pred, true


def test_per_label_dice_and_hd95_match_monai():
    pytest.importorskip("monai")
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    rng = np.random.default_rng(7)
    for case, spacing in enumerate([(1.0, 1.0, 1.0), (1.0, 1.5, 2.0), (0.8, 0.8, 3.0)]):
        pred, true = random_label_maps(rng)
        ours = label_map_case_metrics(pred, true, spacing, NAMES)
        one_hot = [torch.from_numpy(np.stack([m == k for k in range(4)])[None].astype(np.float32))  # (1, 4, X, Y, Z)
                   for m in (pred, true)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dice = DiceMetric(include_background=False, reduction="none")(*one_hot)[0]  # (3,)
            hd95 = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(
                *one_hot, spacing=spacing)[0]
        for k, name in enumerate(NAMES):
            assert ours[f"dice_{name}"] == pytest.approx(dice[k].item(), abs=1e-4), f"case {case} {name}"
            assert ours[f"hd95_mm_{name}"] == pytest.approx(hd95[k].item(), abs=1e-4), f"case {case} {name}"
        assert ours["dice"] == pytest.approx(dice.mean().item(), abs=1e-4)
        assert ours["hd95_mm"] == pytest.approx(hd95.mean().item(), abs=1e-4)
        # the training-time per-label Dice agrees
        np.testing.assert_allclose(dice_per_class(pred[None, None], true[None, None], 3)[0], dice.numpy(), atol=1e-4)


def test_a_label_in_neither_map_scores_one_and_in_one_only_the_worst_case():
    true = np.zeros((10, 10, 10), dtype=np.uint8)
    true[2:5, 2:5, 2:5] = 1
    pred = true.copy()
    pred[7, 7, 7] = 3  # label 3: predicted, not true; label 2 in neither
    ours = label_map_case_metrics(pred, true, (1.0, 2.0, 1.0), NAMES)
    assert ours["dice_csf"] == 1.0 and ours["dice_gm"] == 1.0 and ours["dice_wm"] == 0.0
    assert ours["hd95_mm_gm"] == 0.0 and ours["hd95_worst_case_wm"] == 1
    assert ours["hd95_mm_wm"] == pytest.approx(math.sqrt(10**2 + 20**2 + 10**2))
    report = label_map_report([ours, ours], NAMES, num_samples=20)
    assert report["n"] == 2 and report["label_names"] == NAMES
    assert report["dice"]["value"] == pytest.approx(2 / 3) and report["hd95_worst_case_subjects_wm"] == 2
    with pytest.raises(ValueError, match="labels 0..3"):
        label_map_case_metrics(pred + 4 * (pred == 3), true, (1, 1, 1), NAMES)


def test_validation_metrics_are_each_labels_dice_and_their_mean():
    task = MultiClassSegmentationTask("segmentation", num_classes=3, label_names=NAMES)
    true = torch.zeros(2, 1, 4, 4, 4)
    true[:, :, :2] = 1
    true[:, :, 2:, :2] = 2
    true[0, :, 3, 3, 3] = 3  # label 3 in subject 0 only
    logits = torch.nn.functional.one_hot(true[:, 0].long(), 4).movedim(-1, 1).float() * 10
    logits[1, :, 0] = torch.tensor([0.0, 0, 10, 0])[:, None, None]  # subject 1: layer x=0 of label 1 called 2
    outputs = task.new_outputs()
    task.collect(outputs, logits, true, None, {"subject_id": ["a", "b"]}, torch.ones(2, 1, 4, 4, 4), None)
    metrics = task.metrics(task.parts(outputs))
    # subject 1: label 1 has 32 true voxels, 16 predicted (all right): 32 / 48; label 2: 16 true, 32 predicted
    assert metrics["dice_csf"] == pytest.approx((1 + 32 / 48) / 2)
    assert metrics["dice_gm"] == pytest.approx((1 + 32 / 48) / 2)
    assert metrics["dice_wm"] == pytest.approx(1.0)  # subject 1 has none and predicts none: 1
    assert metrics["dice"] == pytest.approx(np.mean([metrics[f"dice_{n}"] for n in NAMES]))


# ---------------------------------------------------------------------------------------------------------
# Label maps through resampling, the cache and augmentation
# ---------------------------------------------------------------------------------------------------------

def layered_labels() -> np.ndarray:
    """64^3: label 1 a big block, label 2 a slab inside it, label 3 three voxels that nearest would lose."""
    labels = np.zeros((64, 64, 64), dtype=np.uint8)
    labels[8:56, 8:56, 8:56] = 1
    labels[20:40, 20:40, 30:34] = 2
    labels[44:47, 10, 12] = 3  # even y and z: 2x nearest-exact samples the odd voxels 2j + 1 only
    return labels


def test_label_maps_survive_resampling_with_every_label_kept():
    labels = layered_labels()
    assert 3 not in resize_volume(labels, (32, 32, 32), "nearest")  # nearest neighbour loses the small label
    for settings in ({"mode": "resize", "shape": [32, 32, 32], "normalization": "none"},
                     {"mode": "spacing", "spacing": [3.0, 3.0, 3.0], "normalization": "none"}):
        _, out, _ = preprocess_volume(np.ones(labels.shape, np.float32), (1.0, 1.0, 1.0), settings, labels, 3)
        assert out.dtype == np.uint8 and set(np.unique(out)) == {0, 1, 2, 3}
        assert components(out == 3) == 1 and components(out == 2) == 1
    out = resize_label_map(labels, (32, 32, 32))
    for k in (1, 2):  # the large labels keep their volume (a 2x downsampling: / 8)
        assert (out == k).sum() == pytest.approx((labels == k).sum() / 8, rel=0.1)
    # a map with one label is resampled as resize_mask resamples a binary mask; upsampling is nearest
    binary = (labels == 3) | (labels == 2)
    np.testing.assert_array_equal(resize_label_map(binary.astype(np.uint8), (32, 32, 32)),
                                  resize_mask(binary, (32, 32, 32)))
    small = labels[::4, ::4, ::4]
    np.testing.assert_array_equal(resize_label_map(small, (32, 32, 32)), resize_volume(small, (32, 32, 32), "nearest"))


def test_label_maps_are_cached_under_their_own_key(tmp_path):
    labels = layered_labels()[::2, ::2, ::2]
    image_path, mask_path = tmp_path / "img.nii.gz", tmp_path / "labels.nii.gz"
    save_nifti(np.ones(labels.shape, np.float32), np.eye(4), image_path)
    save_nifti(labels, np.eye(4), mask_path, dtype=np.uint8)
    settings = {"mode": "resize", "shape": [16, 16, 16]}
    binary_key = cache.cache_key(image_path, mask_path, settings)
    assert cache.cache_key(image_path, mask_path, settings, 1) == binary_key  # binary keys unchanged
    assert cache.cache_key(image_path, mask_path, settings, 3) != binary_key
    _, mask, _ = cache.cached_volume(image_path, mask_path, settings, tmp_path / "c", num_classes=3)
    assert set(np.unique(mask)) == {0, 1, 2, 3}
    _, binary, _ = cache.cached_volume(image_path, mask_path, settings, tmp_path / "c")  # load_mask's 0/1
    assert set(np.unique(binary)) == {0, 1}
    assert load_label_map(mask_path, 3)[0].max() == 3
    with pytest.raises(ValueError, match="values must be integers 0..2.*found \\[3.0\\]"):
        load_label_map(mask_path, 2)


def test_augmentation_warps_label_maps_per_label():
    labels = torch.from_numpy(layered_labels()[::2, ::2, ::2].astype(np.float32))[None, None].repeat(2, 1, 1, 1, 1)
    image = (labels + 1.0) * (labels > 0)
    augment = BatchAugment(flip_prob=0.5, affine_prob=1.0, rotation_deg=20.0, scale_range=[0.9, 1.1])
    generator = torch.Generator().manual_seed(3)
    out_image, out_labels = augment(image, labels, generator=generator, num_classes=3)
    assert out_labels.shape == labels.shape and out_labels.dtype == labels.dtype
    assert set(torch.unique(out_labels).tolist()) <= {0.0, 1.0, 2.0, 3.0}  # no value between two labels
    for b in range(2):
        assert set(torch.unique(out_labels[b]).tolist()) >= {1.0, 2.0}
        # the labels move with the image: where the warped image is 3 (label 2 + 1) the label is 2
        inside = (out_image[b, 0] - 3.0).abs() < 1e-3
        assert (out_labels[b, 0][inside] == 2).float().mean() > 0.95
    # a binary mask is warped as before (num_classes=1: trilinear + threshold)
    generator = torch.Generator().manual_seed(3)
    _, binary = augment(image, (labels > 0).float(), generator=generator)
    assert set(torch.unique(binary).tolist()) <= {0.0, 1.0}


# ---------------------------------------------------------------------------------------------------------
# Configuration errors
# ---------------------------------------------------------------------------------------------------------

def test_wrong_loss_and_label_names_are_refused_with_one_line(tmp_path):
    with pytest.raises(ConfigError, match="loss=dice_bce does not fit task=segmentation with task.num_classes=3; "
                                          "valid losses for segmentation with task.num_classes=3: dice_ce"):
        build_loss(compose_train(["task=segmentation", "task.num_classes=3"]))
    with pytest.raises(ConfigError, match="valid losses for segmentation: dice_bce, dice, bce"):
        build_loss(compose_train(["task=segmentation", "loss=dice_ce"]))  # binary stays as it was
    cfg = compose_train([*THREE_LABELS, "data.label_names=[csf,gm]"])
    with pytest.raises(ConfigError, match="data.label_names has 2 names \\(csf, gm\\) but task.num_classes=3 needs 3"):
        build_task_set(cfg.task, build_loss(cfg), cfg.data)
    cfg = compose_train([*THREE_LABELS, "data.label_names=[csf,gm,csf]"])
    with pytest.raises(ConfigError, match="names csf more than once"):
        build_task_set(cfg.task, build_loss(cfg), cfg.data)
    with pytest.raises(ConfigError, match="task.num_classes=0 must be a whole number from 1 to 255"):
        build_loss(compose_train(["task=segmentation", "task.num_classes=0"]))
    cfg = compose_train(["task=segmentation", "data.label_names=[a,b]"])
    with pytest.raises(ConfigError, match="set task.num_classes=K"):
        build_task_set(cfg.task, build_loss(cfg), cfg.data)
    # and on the command line: one line, exit 2
    proc = run_train([*tiny_overrides(tmp_path / "cache"), "task=segmentation", "task.num_classes=3",
                      f"hydra.run.dir={tmp_path / 'bad'}"], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "valid losses for segmentation with task.num_classes=3: dice_ce" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_label_outside_0_to_k_is_a_start_up_problem_naming_the_file(tmp_path):
    rows = []
    for i, top in enumerate((3, 7)):
        labels = np.zeros((8, 8, 8), dtype=np.uint8)
        labels[2:4, 2:4, 2:4] = top
        save_nifti(np.ones((8, 8, 8), np.float32), np.eye(4), tmp_path / f"s{i}.nii.gz")
        save_nifti(labels, np.eye(4), tmp_path / f"s{i}_labels.nii.gz", dtype=np.uint8)
        rows.append(f"s{i},s{i}.nii.gz,s{i}_labels.nii.gz\n")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("subject_id,image,mask\n" + "".join(rows))
    assert len(load_manifest(manifest, "segmentation", num_classes=7).subjects) == 2
    with pytest.raises(ManifestError) as err:
        load_manifest(manifest, "segmentation", num_classes=3)
    (problem,) = err.value.problems
    assert problem.startswith("line 3 (s1), column 'mask': a label map for task.num_classes=3 must hold the "
                              "integers 0..3") and "[7]" in problem and str(tmp_path / "s1_labels.nii.gz") in problem


# ---------------------------------------------------------------------------------------------------------
# End to end: train three labels on the synthetic phantoms, predict on a reoriented copy of the inputs
# ---------------------------------------------------------------------------------------------------------

def reoriented(path, codes: str, out_path, crop) -> nib.Nifti1Image:
    """The file at ``path`` stored with axis codes ``codes`` and ``crop`` applied: another shape and affine."""
    img = nib.load(str(path))
    data, affine = np.asanyarray(img.dataobj)[crop], img.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ np.array([s.start or 0 for s in crop])
    transform = ornt_transform(axcodes2ornt(nib.aff2axcodes(affine)), axcodes2ornt(tuple(codes)))
    new = nib.Nifti1Image(apply_orientation(data, transform), affine @ inv_ornt_aff(transform, data.shape))
    new.set_qform(new.affine, code=1)
    new.set_sform(new.affine, code=1)
    nib.save(new, str(out_path))
    return new


def test_three_labels_train_and_predict_label_maps_on_each_inputs_grid(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    run_train([*tiny_overrides(cache_dir), *THREE_LABELS, "data.label_names=[csf,gm,wm]", "trainer.max_epochs=1",
               f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    with open(run_dir / "metrics.csv") as f:
        (row,) = list(csv.DictReader(f))
    per_label = [float(row[f"val_dice_{name}"]) for name in NAMES]
    assert float(row["val_dice"]) == pytest.approx(np.mean(per_label)) and "val_lesion_f1" not in row
    summary = read_summary(run_dir)
    assert summary["best_metric"]["name"] == "val_dice"
    assert summary["final_val"]["dice_wm"] == pytest.approx(per_label[2])
    state = torch.load(run_dir / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    assert state["tasks"]["heads"]["segmentation"]["num_classes"] == 3
    assert state["model"]["heads.segmentation.final_conv.weight"].shape[0] == 4  # K+1 output channels

    # inputs on other grids: two phantoms stored as LAS and PSR, cropped, with their tissue label maps
    synthetic = cache_dir / "synthetic"
    (source,) = [p for p in synthetic.iterdir() if p.name.startswith("n12_s32x32x32") and p.name.endswith("labels3")]
    rows, inputs = [], {}
    for sid, codes, crop in (("sub-0000", "LAS", (slice(1, 31), slice(None), slice(2, None))),
                             ("sub-0001", "PSR", (slice(None), slice(3, 29), slice(None)))):
        image = reoriented(source / "images" / f"{sid}_T1w.nii.gz", codes, tmp_path / f"{sid}.nii.gz", crop)
        reoriented(source / "masks" / f"{sid}_tissue.nii.gz", codes, tmp_path / f"{sid}_labels.nii.gz", crop)
        inputs[sid] = image
        rows.append(f"{sid},{tmp_path / f'{sid}.nii.gz'},{tmp_path / f'{sid}_labels.nii.gz'}\n")
    (tmp_path / "test.csv").write_text("subject_id,image,mask\n" + "".join(rows))

    from brain3d.cli import config_dir
    from brain3d.predict import predict

    out = tmp_path / "pred"
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="predict", overrides=[
            "progress=false", "bootstrap_samples=20", "device=cpu", f"checkpoint={run_dir / 'checkpoints/best.pt'}",
            f"data.manifest={tmp_path / 'test.csv'}", f"output_dir={out}", "report_subjects=0"])
    metrics = predict(cfg)
    for sid, image in inputs.items():
        labels = nib.load(str(out / f"{sid}_mask.nii.gz"))
        assert labels.shape == image.shape and np.allclose(labels.affine, image.affine)
        assert labels.get_data_dtype() == np.uint8 and set(np.unique(np.asanyarray(labels.dataobj))) <= {0, 1, 2, 3}
        probs = nib.load(str(out / f"{sid}_prob.nii.gz"))
        assert probs.shape == (*image.shape, 4) and np.allclose(probs.affine, image.affine)
        p = probs.get_fdata()
        np.testing.assert_allclose(p.sum(axis=-1), 1.0, atol=1e-4)
        np.testing.assert_array_equal(p.argmax(axis=-1), np.asanyarray(labels.dataobj))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics)) and saved["n"] == 2 and saved["label_names"] == NAMES
    for key in ("dice", "hd95_mm", *(f"{m}_{n}" for m in ("dice", "hd95_mm") for n in NAMES)):
        assert set(saved[key]) == {"value", "ci_low", "ci_high"}, key
    assert saved["dice"]["value"] == pytest.approx(np.mean([saved[f"dice_{n}"]["value"] for n in NAMES]))
    with open(out / "metrics.csv") as f:
        cases = list(csv.DictReader(f))
    assert [c["subject_id"] for c in cases] == ["sub-0000", "sub-0001"]
    for case in cases:
        assert float(case["dice"]) == pytest.approx(np.mean([float(case[f"dice_{n}"]) for n in NAMES]))
        assert all(f"hd95_mm_{n}" in case for n in NAMES)
    with open(out / "predictions.csv") as f:
        predicted = list(csv.DictReader(f))
    assert float(predicted[0]["predicted_volume_ml"]) == pytest.approx(
        sum(float(predicted[0][f"predicted_volume_ml_{n}"]) for n in NAMES))

    # task.min_lesion_voxels at predict time: each label's small components become background, nothing else changes
    out_small = tmp_path / "pred_small"
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="predict", overrides=[
            "progress=false", "bootstrap_samples=20", "device=cpu", f"checkpoint={run_dir / 'checkpoints/best.pt'}",
            f"data.manifest={tmp_path / 'test.csv'}", f"output_dir={out_small}", "report_subjects=0",
            "min_lesion_voxels=1000000000"])
    assert predict(cfg)["min_lesion_voxels"] == 1000000000
    for sid in inputs:
        assert not np.asanyarray(nib.load(str(out_small / f"{sid}_mask.nii.gz")).dataobj).any()
