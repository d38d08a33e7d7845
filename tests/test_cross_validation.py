"""K-fold splits by subject and the gathered table of a fold sweep."""

from __future__ import annotations

import csv
import json

import pytest

from brain3d.data.manifest import Subject, split_subjects
from brain3d.gather import main as gather_main

from tests.conftest import run_train, tiny_overrides


def subjects(labels):
    return [Subject(f"s{i}", None, i + 1, float(t)) for i, t in enumerate(labels)]


def test_folds_partition_subjects_and_keep_class_balance():
    subs = subjects([0] * 15 + [1] * 10)
    vals = [split_subjects(subs, 0.2, seed=0, stratify=True, num_folds=5, fold=k)[1] for k in range(5)]
    ids = [s.subject_id for v in vals for s in v]
    assert sorted(ids) == sorted(s.subject_id for s in subs)  # every subject validated exactly once
    assert [len(v) for v in vals] == [5] * 5
    assert all(sum(s.target for s in v) == 2 for v in vals)  # 10 positives over 5 folds
    train, val = split_subjects(subs, 0.2, seed=0, stratify=True, num_folds=5, fold=3)
    assert not {s.subject_id for s in train} & {s.subject_id for s in val} and len(train) == 20


def test_bad_fold_is_refused():
    with pytest.raises(ValueError, match="data.fold in 0..num_folds-1"):
        split_subjects(subjects([0, 1, 0, 1]), 0.2, seed=0, stratify=False, num_folds=2, fold=2)


def test_five_fold_sweep_gives_five_summaries_and_one_table(tmp_path, cache_dir):
    sweep = tmp_path / "cv"
    run_train(["-m", "task=regression", *tiny_overrides(cache_dir), "data.num_subjects=10", "trainer.max_epochs=1",
               "data.num_folds=5", "data.fold=0,1,2,3,4", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    summaries = sorted(sweep.rglob("summary.json"))
    assert len(summaries) == 5
    val_ids = []
    for path in summaries:
        rows = list(csv.DictReader(open(path.parent / "split.csv")))
        val_ids += [r["subject_id"] for r in rows if r["split"] == "val"]
    assert len(val_ids) == len(set(val_ids)) == 10

    assert gather_main([str(sweep)]) == 0
    table = list(csv.DictReader(open(sweep / "cv_summary.csv")))
    assert [r["run"] for r in table[-2:]] == ["mean", "sd"] and len(table) == 7
    result = json.loads((sweep / "cv_summary.json").read_text())
    maes = [r["val_mae"] for r in result["runs"]]
    assert sorted(r["fold"] for r in result["runs"]) == [0, 1, 2, 3, 4]
    assert result["metrics"]["val_mae"]["mean"] == pytest.approx(sum(maes) / 5)
    assert float(table[-2]["val_mae"]) == pytest.approx(sum(maes) / 5)


def test_gather_without_runs_fails_clearly(tmp_path, capsys):
    assert gather_main([str(tmp_path)]) == 2
    assert "no summary.json found" in capsys.readouterr().err
