"""brain3d-plan: the fingerprint of a hand-made dataset, the choices for a stated memory budget, and a printed
command that trains as it is."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from brain3d import cli
from brain3d.data.synthetic import make_phantom
from brain3d.errors import ConfigError
from brain3d.plan import (
    HELP,
    Budget,
    Plan,
    choose_plan,
    fingerprint_dataset,
    make_plan,
    outliers,
    round_to_multiple,
    step_probe,
    train_command,
)

from tests.conftest import CONFIG_DIR, read_summary, run_train

MB = 2**20


def compose_plan(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("plan", overrides=overrides)


def _save(path: Path, data: np.ndarray, affine: np.ndarray, dtype) -> str:
    img = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    img.set_data_dtype(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return f"{path.parent.name}/{path.name}"  # relative to the manifest's folder


def hand_made_dataset(root: Path) -> Path:
    """Four subjects with known statistics (RAS axes):

    - sub-1: 20x24x20 at 1 mm, float32, RAS; head value 100; one lesion of 27 voxels (0.027 ml)
    - sub-2: as sub-1 but its header says LAS (the data are not flipped: a header that lies); lesions of 8 and 1 voxels
    - sub-3: as sub-1, an empty mask
    - sub-4: 14x16x14 at 1.5 mm, int16, head value 1000 (another scanner's scaling); one lesion of 8 voxels (0.027 ml)
    """
    rows = []
    for i, (shape, vox, dtype, value, code) in enumerate([((20, 24, 20), 1.0, np.float32, 100, "RAS"),
                                                         ((20, 24, 20), 1.0, np.float32, 100, "LAS"),
                                                         ((20, 24, 20), 1.0, np.float32, 100, "RAS"),
                                                         ((14, 16, 14), 1.5, np.int16, 1000, "RAS")], start=1):
        affine = np.diag([vox, vox, vox, 1.0])
        if code == "LAS":
            affine[0, 0] = -vox
        image = np.zeros(shape)
        image[3:-3, 3:-3, 3:-3] = value
        mask = np.zeros(shape, dtype=np.uint8)
        if i == 1:
            mask[5:8, 5:8, 5:8] = 1
        elif i == 2:
            mask[5:7, 5:7, 5:7] = 1
            mask[12, 14, 12] = 1
        elif i == 4:
            mask[5:7, 5:7, 5:7] = 1
        img = _save(root / "images" / f"sub-{i}.nii.gz", image, affine, dtype)
        msk = _save(root / "masks" / f"sub-{i}.nii.gz", mask, affine, np.uint8)
        rows.append({"subject_id": f"sub-{i}", "image": img, "mask": msk, "sex": "FMFM"[i - 1], "age": 20 + 10 * i})
    with open(root / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root / "manifest.csv"


def test_help_examples_pass_the_command_line_check(tmp_path):
    assert HELP.startswith("brain3d-plan: ") and "task " in HELP and "segmentation" in HELP
    examples = [line for line in HELP.split("Examples:", 1)[1].split("\n\n", 1)[0].splitlines()
                if "brain3d-plan " in line]
    assert len(examples) >= 4
    for line in examples:
        words = shlex.split(line.split("  #", 1)[0])
        assert cli.check_command_line("plan", words[words.index("brain3d-plan") + 1:]) is None, line
    proc = subprocess.run([sys.executable, "-m", "brain3d.plan", "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0 and proc.stdout.startswith("brain3d-plan: ")
    proc = subprocess.run([sys.executable, "-m", "brain3d.plan", "plan.memory_g=2"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "did you mean plan.memory_gb?" in proc.stderr


def test_config_is_the_training_config_plus_a_plan_block():
    cfg = compose_plan(["task=segmentation", "preprocess=spacing"])
    assert cfg.plan.memory_gb is None and cfg.plan.workers == "auto" and cfg.plan.intensity_samples == 200
    own = OmegaConf.to_container(cfg)
    own.pop("plan")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        assert own == OmegaConf.to_container(compose("train", overrides=["task=segmentation", "preprocess=spacing"]))


def test_outliers_are_3_mads_away_or_1_5_times_off():
    assert outliers([1.0, 1.0, 1.0, 1.5]).tolist() == [False, False, False, True]
    assert outliers([1.0, 1.2, 1.5]).tolist() == [False, False, False]  # a designed mix is no anomaly
    assert outliers([100, 101, 99, 100, 102, 98, 140]).tolist()[-1]  # 3 MADs and 10% off
    assert not outliers([100, 100.5, 99.5, 100, 101]).any()
    assert outliers([1.0, 3.0]).tolist() == [False, False]  # too few to tell
    assert round_to_multiple([61, 70, 73], 16) == [64, 64, 80] and round_to_multiple([17], 16, up=True) == [32]


def test_fingerprint_of_a_hand_made_dataset(tmp_path):
    manifest = hand_made_dataset(tmp_path / "data")
    cfg = compose_plan(["task=segmentation", "data=nifti", f"data.manifest={manifest}", "plan.workers=2"])
    fp = fingerprint_dataset(cfg)
    assert (fp["num_subjects"], fp["num_sampled"], fp["num_skipped"]) == (4, 4, 0)
    assert fp["spacing_mm"]["p50"] == [1, 1, 1] and fp["spacing_mm"]["max"] == [1.5, 1.5, 1.5]
    assert fp["shape"]["p50"] == [20, 24, 20] and fp["shape"]["min"] == [14, 16, 14]
    assert fp["orientations"] == {"RAS": 3, "LAS": 1}
    assert fp["dtypes"] == {"float32": 3, "int16": 1}
    rows = {r["subject_id"]: r for r in fp["subjects"]}
    assert rows["sub-1"]["intensity"]["p50"] == 100 and rows["sub-4"]["intensity"]["p99"] == 1000
    assert rows["sub-1"]["foreground_extent_mm"] == [14, 18, 14]
    assert rows["sub-4"]["foreground_extent_mm"] == [12, 15, 12]
    assert [rows[s]["lesion_count"] for s in ("sub-1", "sub-2", "sub-3", "sub-4")] == [1, 2, 0, 1]
    assert rows["sub-2"]["lesion_sizes_voxels"] == [8, 1]
    assert rows["sub-1"]["foreground_ml"] == pytest.approx(0.027)
    assert rows["sub-4"]["foreground_ml"] == pytest.approx(0.027)
    seg = fp["segmentation"]
    assert (seg["lesions_total"], seg["empty_masks"]) == (4, 1)
    assert seg["lesion_size_voxels"]["max"] == 27 and seg["lesion_size_voxels"]["min"] == 1
    kinds = {(a["subject_id"], a["kind"]) for a in fp["anomalies"]}
    assert {("sub-2", "orientation"), ("sub-4", "spacing"), ("sub-4", "shape"), ("sub-4", "intensity"),
            ("sub-3", "empty_mask"), ("sub-2", "small_lesions")} <= kinds
    assert not any(s == "sub-1" for s, _ in kinds)
    las = next(a for a in fp["anomalies"] if a["kind"] == "orientation")
    assert "LAS header where 3 of 4 are RAS" in las["message"]
    assert rows["sub-2"]["flags"] == ["orientation", "small_lesions"]


def test_fingerprint_class_balance_and_target_distribution(tmp_path):
    manifest = hand_made_dataset(tmp_path / "data")
    common = ["data=nifti", f"data.manifest={manifest}", "plan.workers=1", "plan.intensity_samples=2"]
    fp = fingerprint_dataset(compose_plan(["task=classification", *common]))
    assert fp["classification"]["class_balance"] == {"F": 2, "M": 2} and fp["num_sampled"] == 2
    fp = fingerprint_dataset(compose_plan(["task=regression", *common]))
    target = fp["regression"]["target"]
    assert (target["min"], target["p50"], target["max"], target["mean"]) == (30, 45, 60, 45)


def test_rows_the_start_up_check_refuses_come_first_and_are_left_out_of_training(tmp_path):
    manifest = hand_made_dataset(tmp_path / "data")
    _save(tmp_path / "data" / "images" / "sub-5.nii.gz", np.zeros((20, 24, 20, 2)), np.eye(4), np.float32)
    with open(manifest, "a") as f:
        f.write("sub-5,images/sub-5.nii.gz,masks/sub-1.nii.gz,F,70\n")
    given = ["task=segmentation", "data=nifti", f"data.manifest={manifest}", "backbone.width=0.125",
             "trainer.device=cpu", "trainer.progress=false", "plan.workers=1", "plan.memory_gb=8", "plan.thumbnails=2"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        result = make_plan(compose("plan", overrides=given), given, tmp_path / "plan")
    fp = result["fingerprint"]
    first = fp["anomalies"][0]
    assert (fp["num_subjects"], fp["num_skipped"]) == (4, 1)
    assert (first["subject_id"], first["kind"], first["stops_training"]) == ("sub-5", "4d_file", True)
    assert "2 volumes" in first["message"]
    assert result["command"].endswith("data.on_error=skip")
    assert "1 subject(s)" in result["plan"].reasons["data.on_error"]
    assert sorted(p.name for p in (tmp_path / "plan" / "report_files").iterdir()) == ["000_sub-2.png", "001_sub-4.png"]
    assert {"fingerprint.json", "plan.yaml", "report.html"} <= {p.name for p in (tmp_path / "plan").iterdir()}


def _cohort(n: int, shape, spacing, extent_mm=None) -> dict:
    extent = list(extent_mm) if extent_mm is not None else [s * v for s, v in zip(shape, spacing)]
    return {"subjects": [{"subject_id": f"s{i}", "shape": list(shape), "spacing_mm": list(spacing),
                          "foreground_extent_mm": extent} for i in range(n)]}


def _linear_step(bytes_per_voxel: int = 1000):
    """A stand-in for a measured step: memory proportional to the voxels of the batch."""
    return lambda shape, batch: int(batch * np.prod(shape) * bytes_per_voxel)


def test_plan_choices_follow_a_stated_memory_budget():
    cfg = compose_plan(["task=segmentation"])
    fp, step = _cohort(40, (64, 64, 64), (1.0, 1.0, 1.0)), _linear_step()
    large = choose_plan(cfg, fp, Budget(8 * 2**30, 0, "test", torch.device("cpu")), step, 32, ("fp32", "test"))
    assert large.overrides == {"preprocess": "resize", "data.shape": [64, 64, 64], "data.batch_size": 4,
                               "trainer.precision": "fp32"}  # 4: the CPU cap (plan.batch_size_max=null)
    assert set(large.reasons) == set(large.overrides)
    wide = choose_plan(compose_plan(["task=segmentation", "plan.batch_size_max=16"]), fp,
                       Budget(8 * 2**30, 0, "test", torch.device("cpu")), step, 32, ("fp32", "test"))
    assert wide.overrides["data.batch_size"] == 8  # a quarter of the 32 training subjects
    # 2 x 64^3 needs 524 MB > 300 MB: the largest cube whose batch-2 step fits what the resident data leave
    small = choose_plan(cfg, fp, Budget(300 * 10**6, 0, "test", torch.device("cpu")), step, 32, ("fp32", "test"))
    assert small.overrides["data.patch_size"] == [48, 48, 48] and small.overrides["data.shape"] == [64, 64, 64]
    assert small.overrides["data.batch_size"] == 2
    assert small.memory["expected_peak_bytes"] <= 300 * 10**6
    assert small.memory["step_bytes"] == step([48] * 3, 2)
    with pytest.raises(ConfigError, match="even 32\\^3 patches"):
        choose_plan(cfg, fp, Budget(60 * 10**6, 0, "test", torch.device("cpu")), step, 32, ("fp32", "test"))
    with pytest.raises(ConfigError, match="smaller than what the training process takes"):
        choose_plan(cfg, fp, Budget(10**6, 2 * 10**6, "test", torch.device("cpu")), step, 32, ("fp32", "test"))
    # classification: whole volumes, downsampled until one volume fits
    cls = choose_plan(compose_plan(["task=classification"]), fp, Budget(200 * 10**6, 0, "test", torch.device("cpu")),
                      step, 32, ("fp32", "test"))
    assert cls.overrides["data.shape"] == [48, 48, 48] and "downsampled" in cls.reasons["data.shape"]
    assert "data.patch_size" not in cls.overrides
    # a preset's patches are cleared when whole volumes fit; the command composes with the plan winning
    preset = choose_plan(compose_plan(["experiment=lesion_patches"]), fp, Budget(8 * 2**30, 0, "test",
                         torch.device("cpu")), step, 32, ("fp32", "test"))
    assert preset.overrides["data.patch_size"] is None and preset.overrides["preprocess"] == "resize"
    _, args = train_command(["experiment=lesion_patches", "data.patch_size=[64,64,64]"], preset)
    assert args[:1] == ["experiment=lesion_patches"] and "data.patch_size=[64,64,64]" not in args
    assert cli.check_command_line("train", args) is None
    final = compose_plan(args)
    assert (final.preprocess.mode, final.data.patch_size, list(final.data.shape)) == ("resize", None, [64, 64, 64])
    # resident data that would crowd out the step are left on disk
    big = _cohort(4000, (64, 64, 64), (1.0, 1.0, 1.0))
    off = choose_plan(cfg, big, Budget(2 * 2**30, 0, "test", torch.device("cpu")), step, 3000, ("fp32", "test"))
    assert off.overrides["data.resident"] == "off"


def test_mixed_voxel_sizes_resample_to_the_median_and_crop_the_head():
    cfg = compose_plan(["task=segmentation"])
    fp = {"subjects": [*_cohort(3, (192, 192, 192), (1.0, 1.0, 1.0), (140, 170, 150))["subjects"],
                       *_cohort(3, (160, 160, 160), (1.2, 1.2, 1.2), (140, 170, 150))["subjects"],
                       *_cohort(3, (128, 128, 128), (1.5, 1.5, 1.5), (140, 170, 150))["subjects"]]}
    plan = choose_plan(cfg, fp, Budget(64 * 2**30, 0, "test", torch.device("cpu")), _linear_step(10), 6,
                       ("bf16", "test"))
    assert plan.overrides["preprocess"] == "spacing" and plan.overrides["preprocess.spacing"] == [1.2, 1.2, 1.2]
    assert plan.overrides["preprocess.crop_foreground"] is True
    # 140/1.2 + 2 x 4 voxels of margin = 125 -> 128; 170/1.2 + 8 = 150 -> 160; 150/1.2 + 8 = 133 -> 144
    assert plan.overrides["data.shape"] == [128, 160, 144]
    assert plan.overrides["data.batch_size"] == 2  # a quarter of 6 training subjects, at least 2


def test_chosen_step_measured_by_the_probe_fits_the_budget():
    memory_probe = pytest.importorskip("brain3d.memory_probe")
    cfg = compose_plan(["task=segmentation", "debug=fast", "trainer.device=cpu"])
    step = step_probe(cfg, torch.device("cpu"), None)
    fp = _cohort(8, (64, 64, 64), (3.0, 3.0, 3.0))
    whole = step([64] * 3, 2)
    budget = Budget(whole - 1, 0, "test", torch.device("cpu"))
    plan = choose_plan(cfg, fp, budget, step, 6, ("fp32", "test"))
    patch, batch = plan.overrides["data.patch_size"], plan.overrides["data.batch_size"]
    assert patch in ([32] * 3, [48] * 3) and batch >= 2
    assert plan.memory["expected_peak_bytes"] <= budget.total
    fresh = memory_probe.peak_step_bytes  # measured again, not remembered
    from brain3d.models.model import build_model
    from brain3d.train import build_loss

    model = build_model(cfg.backbone, cfg.task.head, head_name="segmentation").to(memory_format=torch.channels_last_3d)
    assert fresh(model, build_loss(cfg), "segmentation", (1, *patch), batch, torch.device("cpu"), None,
                 True) <= budget.total


def test_command_keeps_the_users_overrides_and_replaces_the_planned_keys():
    plan = Plan()
    plan.set("preprocess", "spacing")
    plan.set("preprocess.spacing", [1.2, 1.2, 1.2])
    plan.set("data.batch_size", 4)
    command, args = train_command(["task=segmentation", "data=nifti", "data.manifest=/d/m.csv", "plan.memory_gb=2",
                                   "data.batch_size=16", "hydra.run.dir=x", "backbone.width=0.5"], plan)
    assert args == ["task=segmentation", "data=nifti", "data.manifest=/d/m.csv", "backbone.width=0.5",
                    "preprocess=spacing", "preprocess.spacing=[1.2,1.2,1.2]", "data.batch_size=4"]
    assert command == ("brain3d-train task=segmentation data=nifti data.manifest=/d/m.csv backbone.width=0.5 "
                       "preprocess=spacing 'preprocess.spacing=[1.2,1.2,1.2]' data.batch_size=4")


def mixed_phantoms(root: Path) -> tuple[Path, str]:
    """8 phantoms at 6, 7.5 and 9.6 mm (a ~192 mm field of view); one stored with an LAS header over RAS data."""
    rows = []
    for i, vox in enumerate([6.0, 6.0, 6.0, 7.5, 7.5, 7.5, 9.6, 9.6]):
        shape = (round(192 / vox),) * 3
        image, mask = make_phantom(shape, i % 2, 30 + 5 * i, np.random.default_rng([7, i]), vox)
        affine = np.diag([vox, vox, vox, 1.0])
        if i == 5:
            affine[0, 0] = -vox  # the header says x runs right -> left; the data were written left -> right
        img = _save(root / "images" / f"sub-{i}.nii.gz", image, affine, np.float32)
        msk = _save(root / "masks" / f"sub-{i}.nii.gz", mask, affine, np.uint8)
        rows.append({"subject_id": f"sub-{i}", "image": img, "mask": msk})
    with open(root / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root / "manifest.csv", "sub-5"


@pytest.mark.slow  # plans, then trains the printed command (~12 s)
def test_printed_command_trains_within_the_budget_and_the_report_flags_the_flipped_subject(tmp_path):
    manifest, flipped = mixed_phantoms(tmp_path / "data")
    out = tmp_path / "plan"
    given = ["task=segmentation", "data=nifti", f"data.manifest={manifest}", "backbone.width=0.125",
             "data.num_workers=0", f"data.cache_dir={tmp_path / 'cache'}", "trainer.progress=false",
             "trainer.device=cpu", "trainer.max_epochs=1", "plan.memory_gb=2", f"plan.output_dir={out}"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run([sys.executable, "-m", "brain3d.plan", *given], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    command = proc.stdout.strip().splitlines()[-1]
    assert command.startswith("brain3d-train ") and "plan." not in command
    assert "preprocess=spacing" in command and "'preprocess.spacing=[7.5,7.5,7.5]'" in command
    plan = OmegaConf.load(out / "plan.yaml")
    assert plan.command == command and set(plan.reasons) >= {"preprocess", "data.shape", "data.batch_size",
                                                             "trainer.precision"}
    assert plan.memory.expected_peak_bytes <= 2 * 2**30
    fp = json.loads((out / "fingerprint.json").read_text())
    assert fp["orientations"] == {"RAS": 7, "LAS": 1}
    # the report: the flipped subject first, flagged in its caption; every picture a PNG
    page = (out / "report.html").read_text()
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", page)
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(captions) == 8 and captions[0].startswith(f"{flipped} - FLAGGED: orientation: LAS header")
    for src in sources:
        assert (out / src).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the command, exactly as printed, trains; its peak resident memory stays within plan.memory_gb
    args = shlex.split(command)[1:]
    run_train(args, cwd=tmp_path)
    run_dir = next((tmp_path / "outputs").rglob("summary.json")).parent
    summary = read_summary(run_dir)
    assert summary["peak_memory_mb"] * MB <= 2 * 2**30
