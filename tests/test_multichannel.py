"""Several input channels (data.image_col=[t1,flair]): reading, resampling onto the first channel's grid,
per-channel normalisation, cache keys, errors, the synthetic two-channel source, BIDS suffix lists, and a
two-channel model trained, predicted and evaluated end to end."""

from __future__ import annotations

import csv
import json
import logging
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from brain3d.augment import BatchAugment
from brain3d.checkpoint import load_checkpoint
from brain3d.data.cache import cache_key
from brain3d.data.channels import image_columns, load_channels, resample_to_grid
from brain3d.data.dataset import VolumeDataset
from brain3d.data.manifest import ManifestError, load_manifest
from brain3d.data.nifti import save_nifti, zscore_nonzero
from brain3d.data.resident import ResidentVolumes
from brain3d.data.sources import bids_manifest
from brain3d.data.synthetic import make_phantom, synthetic_cache_dir
from brain3d.errors import ConfigError
from brain3d.predict import check_channels, manifest_columns
from brain3d.train import set_input_channels

from tests.conftest import run_train, tiny_overrides

SHAPE = (16, 16, 16)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])  # 2 mm voxels, voxel (0, 0, 0) at the world origin
SAME = {"mode": "resize", "shape": list(SHAPE)}  # resizing to the input's own shape is the identity


def head(rng: np.random.Generator, scale: float, offset: float) -> np.ndarray:
    """A positive 'head' (a ball of radius 6 voxels) with random texture, zero outside."""
    i, j, k = np.indices(SHAPE)
    inside = (i - 7.5) ** 2 + (j - 7.5) ** 2 + (k - 7.5) ** 2 < 36
    return np.where(inside, offset + scale * rng.random(SHAPE), 0.0).astype(np.float32)


def write_manifest(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def two_channel_subjects(tmp_path):
    """s0: FLAIR on the T1's grid; s1: FLAIR on a grid shifted by +3 voxels along x (its voxel i is the T1's
    voxel i + 3). Returns (manifest, {subject: (t1 array, flair array)})."""
    rng = np.random.default_rng(0)
    arrays, rows = {}, []
    for name, shift in (("s0", 0), ("s1", 3)):
        t1, flair = head(rng, 1.0, 1.0), head(rng, 5.0, 10.0)
        flair_affine = AFFINE.copy()
        flair_affine[0, 3] = 2.0 * shift
        save_nifti(t1, AFFINE, tmp_path / f"{name}_t1.nii.gz")
        save_nifti(flair, flair_affine, tmp_path / f"{name}_flair.nii.gz")
        arrays[name] = (t1, flair)
        rows.append([name, f"{name}_t1.nii.gz", f"{name}_flair.nii.gz", "40"])
    return write_manifest(tmp_path / "manifest.csv", ["subject_id", "t1", "flair", "age"], rows), arrays


def test_items_stack_the_channels_on_the_first_grid_each_zscored(two_channel_subjects, caplog):
    manifest_path, arrays = two_channel_subjects
    with caplog.at_level(logging.WARNING, logger="brain3d.data"):
        manifest = load_manifest(manifest_path, "regression", image_col=["t1", "flair"])
    warnings = [r.getMessage() for r in caplog.records if "another grid" in r.getMessage()]
    assert len(warnings) == 1  # s1 only, naming both files
    assert "(s1)" in warnings[0] and "s1_flair.nii.gz" in warnings[0] and "s1_t1.nii.gz" in warnings[0]
    assert "6 mm apart" in warnings[0]
    s0, s1 = manifest.subjects
    assert [p.name for p in s1.image_paths] == ["s1_t1.nii.gz", "s1_flair.nii.gz"] and s1.image == s1.images[0]

    data = VolumeDataset(manifest.subjects, "regression", SAME)
    for subject, item in zip(manifest.subjects, (data[0], data[1])):
        image = item["image"].numpy()
        assert image.shape == (2, *SHAPE)
        for channel in image:  # each channel z-scored over its own head
            head_voxels = channel[channel != 0]
            assert abs(head_voxels.mean()) < 1e-5 and abs(head_voxels.std() - 1) < 1e-4
    t1, flair = arrays["s0"]
    np.testing.assert_allclose(data[0]["image"][1].numpy(), zscore_nonzero(flair), atol=1e-5)
    # s1's FLAIR voxel i sits at the T1's voxel i + 3: on the T1's grid, voxel j holds FLAIR voxel j - 3
    t1, flair = arrays["s1"]
    by_hand = np.zeros_like(flair)
    by_hand[3:] = flair[:-3]
    np.testing.assert_allclose(data[1]["image"][1].numpy(), zscore_nonzero(by_hand), atol=1e-5)
    np.testing.assert_allclose(data[1]["image"][0].numpy(), zscore_nonzero(t1), atol=1e-5)


def test_resampling_is_exact_for_a_linear_image_on_another_grid(tmp_path):
    """Trilinear interpolation reproduces a linear function of world position exactly: a FLAIR stored
    left-to-right flipped (LAS), with 1 mm voxels and its own origin, lands on the T1's 2 mm grid as the
    function evaluated at the T1's voxel centres."""
    def value(world):  # world (..., 3) mm
        return 3.0 + 0.1 * world[..., 0] - 0.05 * world[..., 1] + 0.02 * world[..., 2]

    flair_affine = np.array([[-1.0, 0, 0, 40.0], [0, 1.0, 0, -4.0], [0, 0, 1.0, -4.0], [0, 0, 0, 1]])
    ijk = np.stack(np.indices((44, 40, 40)), axis=-1).astype(np.float64)
    flair_world = ijk @ flair_affine[:3, :3].T + flair_affine[:3, 3]
    save_nifti(np.ones(SHAPE, np.float32), AFFINE, tmp_path / "t1.nii")
    save_nifti(value(flair_world).astype(np.float32), flair_affine, tmp_path / "flair.nii")
    image, affine, grid = load_channels([tmp_path / "t1.nii", tmp_path / "flair.nii"])
    assert image.shape == (2, *SHAPE) and grid.ras_shape == SHAPE
    np.testing.assert_allclose(affine, AFFINE)
    t1_world = np.stack(np.indices(SHAPE), axis=-1) * 2.0  # the T1's voxel centres (mm), all inside the FLAIR
    np.testing.assert_allclose(image[1], value(t1_world), atol=1e-4)
    # half a voxel off: the mean of the two neighbours; outside the volume: 0
    row = np.arange(4, dtype=np.float32).reshape(4, 1, 1) * np.ones((1, 2, 2), np.float32) + 1
    shifted = np.diag([1.0, 1.0, 1.0, 1.0])
    shifted[0, 3] = 0.5
    out = resample_to_grid(row, np.eye(4), (4, 2, 2), shifted)
    np.testing.assert_allclose(out[:3, 0, 0], [1.5, 2.5, 3.5])
    assert out[3, 0, 0] == 0


def test_cache_keys_follow_every_channel_and_their_order(two_channel_subjects, tmp_path):
    _, _ = two_channel_subjects
    t1, flair = tmp_path / "s0_t1.nii.gz", tmp_path / "s0_flair.nii.gz"
    keys = {cache_key(t1, None, SAME), cache_key([t1, flair], None, SAME), cache_key([flair, t1], None, SAME),
            cache_key([t1, tmp_path / "s1_flair.nii.gz"], None, SAME)}
    assert len(keys) == 4
    assert cache_key([t1], None, SAME) == cache_key(t1, None, SAME)  # one channel keeps its key
    manifest = load_manifest(tmp_path / "manifest.csv", "regression", image_col=["t1", "flair"])
    fresh = VolumeDataset(manifest.subjects, "regression", SAME)
    cached = VolumeDataset(manifest.subjects, "regression", SAME, cache_dir=tmp_path / "cache")
    for i in range(2):
        for _ in range(2):  # a miss, then a hit
            torch.testing.assert_close(cached[i]["image"], fresh[i]["image"])


def test_patches_cut_every_channel_alike_and_resident_batches_match(two_channel_subjects, tmp_path):
    manifest_path, _ = two_channel_subjects
    manifest = load_manifest(manifest_path, "regression", image_col=["t1", "flair"])
    data = VolumeDataset(manifest.subjects, "regression", SAME, patch_size=(8, 8, 8), seed=3)
    whole = VolumeDataset(manifest.subjects, "regression", SAME)[1]["image"]
    item = data[1]["image"]
    assert item.shape == (2, 8, 8, 8)
    starts = [(i, j, k) for i in range(9) for j in range(9) for k in range(9)
              if torch.equal(whole[:, i:i + 8, j:j + 8, k:k + 8], item)]
    assert len(starts) == 1  # one window, the same in both channels
    store = ResidentVolumes(data, torch.device("cpu"), progress=False)
    batch = store.batch([0, 1])
    assert batch["image"].shape == (2, 2, 8, 8, 8)
    torch.testing.assert_close(batch["image"], torch.stack([data[0]["image"], data[1]["image"]]))


def test_missing_channels_are_one_start_up_error_naming_rows_and_column(tmp_path):
    rng = np.random.default_rng(1)
    for name in ("a", "b", "c"):
        save_nifti(head(rng, 1.0, 1.0), AFFINE, tmp_path / f"{name}_t1.nii.gz")
    save_nifti(head(rng, 1.0, 1.0), AFFINE, tmp_path / "a_flair.nii.gz")
    manifest = write_manifest(tmp_path / "m.csv", ["subject_id", "t1", "flair", "age"],
                              [["a", "a_t1.nii.gz", "a_flair.nii.gz", "30"], ["b", "b_t1.nii.gz", "", "40"],
                               ["c", "c_t1.nii.gz", "c_flair.nii.gz", "50"]])
    with pytest.raises(ManifestError) as err:
        load_manifest(manifest, "regression", image_col=["t1", "flair"])
    assert err.value.problems == [
        "line 3 (b), column 'flair': empty image path",
        f"line 4 (c), column 'flair': image file not found: {tmp_path / 'c_flair.nii.gz'}",
    ]
    with pytest.raises(ManifestError, match=r"column 'FLAIR' \(data.image_col\) not found"):
        load_manifest(manifest, "regression", image_col=["t1", "FLAIR"])
    with pytest.raises(ValueError, match="more than once"):
        load_manifest(manifest, "regression", image_col=["t1", "t1"])
    # the command: exit 2, both rows named
    proc = subprocess.run([sys.executable, "-m", "brain3d.train", "task=regression", "data=nifti",
                           f"data.manifest={manifest}", "data.image_col=[t1,flair]", "trainer.device=cpu",
                           f"data.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "line 3 (b), column 'flair': empty image path" in proc.stderr
    assert "line 4 (c), column 'flair': image file not found" in proc.stderr


def test_in_channels_follow_the_image_columns():
    cfg = OmegaConf.create({"data": {"source": "nifti", "image_col": ["t1", "flair"]},
                            "backbone": {"in_channels": 1}})
    set_input_channels(cfg)
    assert cfg.backbone.in_channels == 2 and list(cfg.data.image_col) == ["t1", "flair"]
    one = OmegaConf.create({"data": {"source": "nifti", "image_col": "image"}, "backbone": {"in_channels": 1}})
    set_input_channels(one)
    assert one.backbone.in_channels == 1 and one.data.image_col == "image"
    synthetic = OmegaConf.create({"data": {"source": "synthetic", "image_col": "image", "channels": 2},
                                  "backbone": {"in_channels": 1}})
    set_input_channels(synthetic)
    assert synthetic.backbone.in_channels == 2 and list(synthetic.data.image_col) == ["image", "flair"]
    t1_only = OmegaConf.create({"data": {"source": "synthetic", "image_col": ["image"], "channels": 2},
                                "backbone": {"in_channels": 1}})
    set_input_channels(t1_only)  # stays a list: plain "image" would mean both of the source's columns
    assert t1_only.backbone.in_channels == 1 and list(t1_only.data.image_col) == ["image"]
    assert image_columns(t1_only.data) == ["image"]
    conflict = OmegaConf.create({"data": {"source": "nifti", "image_col": ["t1", "flair"]},
                                 "backbone": {"in_channels": 3}})
    with pytest.raises(ConfigError, match=r"backbone.in_channels=3 but data.image_col=\['t1', 'flair'\] gives 2"):
        set_input_channels(conflict)
    bids = OmegaConf.create({"source": "bids", "image_col": "image", "suffix": ["T1w", "FLAIR"]})
    assert image_columns(bids) == ["image", "FLAIR"]


def test_spatial_augmentation_is_shared_and_intensity_is_per_channel():
    rng = np.random.default_rng(2)
    base = torch.from_numpy(head(rng, 1.0, 1.0))
    image = torch.stack([base, base])[None]  # (1, 2, D, H, W): two identical channels
    spatial = BatchAugment(flip_prob=1.0, rotation_deg=20, scale_range=(0.9, 1.1), affine_prob=1.0)
    out, _ = spatial(image, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(out, image) and torch.equal(out[0, 0], out[0, 1])
    # channel 1 = 3 * channel 0 + 5 on the head: gamma on each channel's own range keeps that relation
    stretched = torch.stack([base, torch.where(base != 0, 3 * base + 5, base)])[None]
    gamma = BatchAugment(gamma_range=(0.5, 0.5), gamma_prob=1.0)
    out, _ = gamma(stretched, generator=torch.Generator().manual_seed(0))
    fg = base != 0
    assert not torch.allclose(out[0, 0], stretched[0, 0])
    torch.testing.assert_close(out[0, 1][fg], 3 * out[0, 0][fg] + 5)


def test_synthetic_flair_channel_carries_the_lesions():
    one, mask = make_phantom((48, 48, 48), 1, 50.0, np.random.default_rng([0, 3]))
    two, mask2 = make_phantom((48, 48, 48), 1, 50.0, np.random.default_rng([0, 3]), channels=2)
    assert two.shape == (2, 48, 48, 48) and np.array_equal(mask, mask2) and mask.any()
    # the same anatomy and T1 draws; only the lesions' T1 intensity differs
    np.testing.assert_array_equal(two[0][mask == 0], one[mask == 0])
    lesion, wm = mask == 1, (two[0] > 0.7) & (two[0] < 0.9) & (mask == 0)
    t1_contrast = two[0][lesion].mean() / two[0][wm].mean()
    flair_contrast = two[1][lesion].mean() / two[1][wm].mean()
    assert 0.85 < t1_contrast < 1.0 and flair_contrast > 2.0


def write_bids(root: Path, flair_for: set[str]) -> None:
    (root).mkdir(parents=True)
    (root / "participants.tsv").write_text("participant_id\tage\nsub-01\t30\nsub-02\t40\n")
    rng = np.random.default_rng(3)
    for pid in ("sub-01", "sub-02"):
        anat = root / pid / "ses-1" / "anat"
        anat.mkdir(parents=True)
        save_nifti(head(rng, 1.0, 1.0), AFFINE, anat / f"{pid}_ses-1_T1w.nii.gz")
        if pid in flair_for:
            save_nifti(head(rng, 1.0, 1.0), AFFINE, anat / f"{pid}_ses-1_FLAIR.nii.gz")


def test_bids_suffix_list_gives_one_column_per_suffix(tmp_path):
    write_bids(tmp_path / "bids", {"sub-01", "sub-02"})
    out = bids_manifest(tmp_path / "bids", tmp_path / "m.csv", suffix=["T1w", "FLAIR"])
    manifest = load_manifest(out, "regression", image_col=["image", "FLAIR"], group_col="participant_id")
    assert [[p.name for p in s.image_paths] for s in manifest.subjects] == [
        ["sub-01_ses-1_T1w.nii.gz", "sub-01_ses-1_FLAIR.nii.gz"],
        ["sub-02_ses-1_T1w.nii.gz", "sub-02_ses-1_FLAIR.nii.gz"]]
    write_bids(tmp_path / "partial", {"sub-01"})
    with pytest.raises(ValueError, match=r"1 scan\(s\) missing.*sub-02_ses-1: FLAIR"):
        bids_manifest(tmp_path / "partial", tmp_path / "p.csv", suffix=["T1w", "FLAIR"])


@pytest.mark.slow  # 8-17 s on 2 fp32 CPU cores: the default suite stays under 10 minutes
def test_two_channel_synthetic_trains_predicts_and_evaluates(tmp_path, cache_dir):
    run = tmp_path / "run"
    run_train(["task=segmentation", "data.channels=2", *tiny_overrides(cache_dir), "trainer.max_epochs=1",
               f"hydra.run.dir={run}"], cwd=tmp_path)
    state = load_checkpoint(run / "checkpoints" / "last.pt", map_location="cpu")
    assert state["config"]["backbone"]["in_channels"] == 2
    assert state["config"]["data"]["image_col"] == ["image", "flair"]
    assert state["model"]["backbone.conv1.conv.weight"].shape[1] == 2

    # predict on a manifest of three synthetic subjects; one FLAIR stored on another grid (1.5x coarser, flipped)
    folder = synthetic_cache_dir(Path(cache_dir) / "synthetic", 12, (32, 32, 32), 0, channels=2)
    with open(folder / "manifest.csv") as f:
        rows = list(csv.DictReader(f))[:3]
    flair = nib.load(folder / rows[0]["flair"])
    coarse = np.diag([-9.0, 9.0, 9.0, 1.0])
    coarse[:3, 3] = flair.affine[:3, 3] + [192.0 - 6.0, 0.0, 0.0]
    resampled = resample_to_grid(flair.get_fdata(), flair.affine, (21, 21, 21), coarse)
    save_nifti(resampled, coarse, tmp_path / "flair_coarse.nii.gz")
    for r in rows:
        for key in ("image", "flair", "mask"):
            r[key] = str(folder / r[key])
    rows[0]["flair"] = str(tmp_path / "flair_coarse.nii.gz")
    manifest = write_manifest(tmp_path / "test.csv", list(rows[0]), [list(r.values()) for r in rows])
    out = tmp_path / "preds"
    proc = subprocess.run([sys.executable, "-m", "brain3d.predict", f"checkpoint={run / 'checkpoints' / 'last.pt'}",
                           f"data.manifest={manifest}", f"output_dir={out}", "progress=false", "device=cpu",
                           "report_subjects=0"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "column 'flair'" in proc.stdout and "another grid" in proc.stdout  # the coarse FLAIR, logged
    for r in rows:
        image, predicted = nib.load(r["image"]), nib.load(out / f"{r['subject_id']}_mask.nii.gz")
        assert predicted.shape == image.shape and np.allclose(predicted.affine, image.affine)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "segmentation" and metrics["n"] == 3 and 0.0 <= metrics["dice"]["value"] <= 1.0
    # data.image_col=image for this two-channel model: one line (exit 2 through brain3d-predict's ConfigError)
    columns, origins = manifest_columns(OmegaConf.create({"image_col": "image"}), state["config"]["data"])
    with pytest.raises(ConfigError, match=r"names 1 column\(s\), but the checkpoint's model reads 2 channel\(s\)"):
        check_channels(columns, origins, state)
