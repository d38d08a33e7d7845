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


@pytest.mark.slow  # 8-17 s on 2 fp32 CPU cores: the default suite stays under 10 minutes
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


def _fake_run(folder, overrides, fold, mae, hydra=True):
    """A run folder as a Hydra sweep job leaves it: summary.json and (optionally) .hydra/overrides.yaml."""
    folder.mkdir(parents=True)
    summary = {"data": {"fold": fold}, "epochs_completed": 2, "final_val": {"mae": mae},
               "best_metric": {"name": "val_mae", "value": mae}}
    (folder / "summary.json").write_text(json.dumps(summary))
    if hydra:
        (folder / ".hydra").mkdir()
        (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))


def test_sweep_over_width_and_fold_is_grouped_by_width(tmp_path, capsys):
    sweep = tmp_path / "cv"
    maes = {("0.5", 0): 4.0, ("0.5", 1): 6.0, ("1.0", 0): 1.0, ("1.0", 1): 2.0}
    for job, ((width, fold), mae) in enumerate(maes.items()):
        # trainer.device / data.cache_dir differ between jobs but do not change the model: not grouped on
        _fake_run(sweep / str(job), ["task=regression", f"backbone.width={width}", f"data.fold={fold}",
                                     f"trainer.device=cpu{job}", f"data.cache_dir=/tmp/c{job}"], fold, mae)
    assert gather_main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "differ in backbone.width" in out and "grouped into 2" in out
    assert "group backbone.width=0.5: 2 runs" in out and "group backbone.width=1.0: 2 runs" in out

    result = json.loads((sweep / "cv_summary.json").read_text())
    assert result["differing_keys"] == ["backbone.width"] and "metrics" not in result  # no pooled mean
    by_width = {g["overrides"]["backbone.width"]: g for g in result["groups"]}
    assert by_width["0.5"]["overrides"] == {"backbone.width": "0.5", "task": "regression"}
    assert by_width["0.5"]["metrics"]["val_mae"]["mean"] == pytest.approx(5.0)  # (4 + 6) / 2
    assert by_width["0.5"]["metrics"]["val_mae"]["sd"] == pytest.approx(2**0.5)  # sqrt((1 + 1) / 1)
    assert by_width["1.0"]["metrics"]["val_mae"]["mean"] == pytest.approx(1.5)  # (1 + 2) / 2
    assert sorted(r["fold"] for r in by_width["1.0"]["runs"]) == [0, 1]

    table = list(csv.DictReader(open(sweep / "cv_summary.csv")))
    means = {r["group"]: float(r["val_mae"]) for r in table if r["run"] == "mean"}
    assert means == {"backbone.width=0.5": pytest.approx(5.0), "backbone.width=1.0": pytest.approx(1.5)}
    assert len(table) == 4 + 2 * 2  # 4 runs, a mean and an sd row per group

    assert gather_main([str(sweep), "--no-group"]) == 0  # pooled as before, with a warning
    assert "pooled" in capsys.readouterr().out
    pooled = json.loads((sweep / "cv_summary.json").read_text())
    assert pooled["metrics"]["val_mae"]["mean"] == pytest.approx(13 / 4)


def test_fold_only_sweep_and_runs_without_overrides_stay_one_group(tmp_path, capsys):
    sweep = tmp_path / "cv"
    for fold, mae in enumerate([1.0, 3.0]):
        _fake_run(sweep / f"f{fold}", ["backbone.width=0.5", f"data.fold={fold}"], fold, mae)
    assert gather_main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "warning" not in out and "group " not in out
    result = json.loads((sweep / "cv_summary.json").read_text())
    assert len(result["groups"]) == 1 and result["metrics"]["val_mae"]["mean"] == pytest.approx(2.0)

    bare = tmp_path / "bare"
    for fold, mae in enumerate([1.0, 3.0]):
        _fake_run(bare / f"f{fold}", [], fold, mae, hydra=False)
    assert gather_main([str(bare)]) == 0
    assert "2 run(s) have no .hydra/overrides.yaml" in capsys.readouterr().out
    result = json.loads((bare / "cv_summary.json").read_text())
    assert result["unknown_config"] == 2 and result["metrics"]["val_mae"]["mean"] == pytest.approx(2.0)
