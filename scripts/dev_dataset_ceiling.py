#!/usr/bin/env python
"""How far a development dataset of scripts/make_dev_dataset.py lets sex and age go: the val figures of simple
models fitted on the generator's own per-subject parameters (from dataset.json), not on the images.

A network that reads the images can at best measure those parameters, so these are ceilings for what a
preset can reach on the set (up to the fit being linear): when the ceiling is below an issue's target, the
target cannot be judged on that set.

* age: least squares on the train split (intercept + parameters), MAE on val: the mean predictor, each age
  parameter alone, all of them (plus scale) together.
* sex: linear discriminant (pooled covariance) on the train split, val accuracy and AUC: size alone; size and
  shape (aspect); size and grey-matter intensity; all of these and the true age.

Example:
    python scripts/dev_dataset_ceiling.py /work/devdata/size10
    python scripts/dev_dataset_ceiling.py /work/devdata/size10 --json ceiling.json
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

AGE_PARAMETERS = ("ventricle_factor", "atrophy", "cortical_thickness_mm", "sulcal_halfwidth_mm",
                  "fissure_halfwidth_mm", "gm_intensity")
SEX_FEATURES = {"size": ("size",), "size+shape": ("size", "shape"), "size+gm": ("size", "gm"),
                "size+shape+gm+age": ("size", "shape", "gm", "age")}


def read_dataset(folder: Path) -> tuple[list[dict], np.ndarray]:
    """(dataset.json's subjects, (N,) bool: in the train split of manifest.csv)."""
    subjects = json.loads((folder / "dataset.json").read_text())["subjects"]
    with open(folder / "manifest.csv", newline="") as f:
        split = {row["subject_id"]: row["split"] for row in csv.DictReader(f)}
    return subjects, np.array([split[s["subject_id"]] == "train" for s in subjects])


def least_squares_mae(x: np.ndarray, y: np.ndarray, train: np.ndarray) -> float:
    """Val MAE of ``y ~ x @ w + b`` fitted on the train rows. x: (N, F), y: (N,)."""
    design = np.c_[x, np.ones(len(x))]  # (N, F + 1)
    w, *_ = np.linalg.lstsq(design[train], y[train], rcond=None)
    return float(np.abs(design[~train] @ w - y[~train]).mean())


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """ROC AUC: the share of (positive, negative) pairs ordered right, ties counting half (NaN without both)."""
    pos, neg = score[label == 1][:, None], score[label == 0][None, :]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    return float(np.mean(pos > neg) + 0.5 * np.mean(pos == neg))


def lda_scores(x: np.ndarray, label: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Val scores of a linear discriminant with pooled covariance fitted on the train rows (> 0: class 1)."""
    x1, x0 = x[train & (label == 1)], x[train & (label == 0)]
    m1, m0 = x1.mean(0), x0.mean(0)
    pooled = np.atleast_2d(np.cov(np.r_[x1 - m1, x0 - m0].T))  # (F, F)
    w = np.linalg.lstsq(pooled, m1 - m0, rcond=None)[0]
    return x[~train] @ w - w @ (m1 + m0) / 2


def sex_features(subject: dict, parts: Sequence[str]) -> list[float]:
    anatomy = subject["anatomy"]
    out: list[float] = []
    if "size" in parts:
        out.append(float(np.log(anatomy["scale"])))
    if "shape" in parts:
        out.extend(float(v) for v in np.log(anatomy["aspect"]))
    if "gm" in parts:
        out.append(float(anatomy["gm_intensity"]))
    if "age" in parts:
        out.append(float(subject["age"]))
    return out


def ceilings(folder: Path) -> dict:
    """``{"age": {"mean_predictor_mae", "<parameter>_mae"..., "all_parameters_mae"}, "sex": {"<features>":
    {"accuracy", "auc"}}}`` on the manifest's val split."""
    subjects, train = read_dataset(folder)
    if train.all() or not train.any():
        raise SystemExit(f"{folder}/manifest.csv needs subjects in both splits (train and val)")
    age = np.array([s["age"] for s in subjects], dtype=float)  # (N,)
    params = np.array([[s["anatomy"][k] for k in AGE_PARAMETERS] for s in subjects], dtype=float)  # (N, 6)
    scale = np.array([[s["anatomy"]["scale"]] for s in subjects], dtype=float)
    report: dict = {"age": {"mean_predictor_mae": float(np.abs(age[~train] - age[train].mean()).mean())}}
    for i, name in enumerate(AGE_PARAMETERS):
        report["age"][f"{name}_mae"] = least_squares_mae(params[:, i:i + 1], age, train)
    report["age"]["all_parameters_mae"] = least_squares_mae(np.c_[params, scale], age, train)
    male = np.array([s["sex"] == "M" for s in subjects], dtype=float)
    report["sex"] = {}
    if len(set(male[train])) < 2:  # a tiny set may lack a class in the train split: nothing to fit
        return report
    for name, parts in SEX_FEATURES.items():
        score = lda_scores(np.array([sex_features(s, parts) for s in subjects]), male, train)
        report["sex"][name] = {"accuracy": float(np.mean((score > 0) == (male[~train] == 1))),
                               "auc": auc(score, male[~train])}
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="a dataset folder written by scripts/make_dev_dataset.py")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    a = p.parse_args(argv)
    if not (a.folder / "dataset.json").is_file():
        p.error(f"{a.folder} has no dataset.json (not written by scripts/make_dev_dataset.py)")
    report = ceilings(a.folder)
    n_val = sum(1 for s in read_dataset(a.folder)[1] if not s)
    print(f"{a.folder}: {n_val} val subjects")
    print("age (val MAE, years; least squares on the true parameters):")
    for key, value in report["age"].items():
        print(f"  {key[:-4]:<24} {value:6.2f}")
    print("sex (val; linear discriminant on the true parameters):")
    for key, value in report["sex"].items():
        print(f"  {key:<24} accuracy {value['accuracy']:.3f}  AUC {value['auc']:.3f}")
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
