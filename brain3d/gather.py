"""``brain3d-eval``: gather the ``summary.json`` of every run under a folder (e.g. the K folds of a
cross-validation sweep) into one table, mean ± sd per metric.

    brain3d-train -m task=regression data.num_folds=5 data.fold=0,1,2,3,4 hydra.sweep.dir=runs/cv
    brain3d-eval runs/cv

writes ``runs/cv/cv_summary.csv`` (one row per run, then mean and sd) and ``runs/cv/cv_summary.json``.
Metrics are the final epoch's validation metrics (judge a model by its curve's end, not its best point)
plus ``best_<monitor>``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np


def find_summaries(root: Path) -> list[Path]:
    return sorted(root.rglob("summary.json"))


def run_row(summary_path: Path, root: Path) -> dict:
    summary = json.loads(summary_path.read_text())
    row = {"run": str(summary_path.parent.relative_to(root)), "fold": summary.get("data", {}).get("fold"),
           "epochs": summary.get("epochs_completed")}
    row.update({f"val_{k}": v for k, v in summary.get("final_val", {}).items()})
    best = summary.get("best_metric") or {}
    if best.get("name"):
        row[f"best_{best['name']}"] = best.get("value")
    return row


def gather(root: Path) -> dict:
    """Rows of every run under ``root`` and the mean / sd (ddof=1) of each numeric metric over runs.

    Raises:
        FileNotFoundError: no summary.json below root.
    """
    paths = find_summaries(root)
    if not paths:
        raise FileNotFoundError(f"no summary.json found under {root}")
    rows = [run_row(p, root) for p in paths]
    metrics = sorted({k for r in rows for k in r if k.startswith(("val_", "best_"))})
    stats = {}
    for key in metrics:
        values = np.array([r[key] for r in rows if isinstance(r.get(key), (int, float)) and r[key] is not None], dtype=float)
        values = values[np.isfinite(values)]
        stats[key] = {"mean": float(values.mean()) if values.size else math.nan,
                      "sd": float(values.std(ddof=1)) if values.size > 1 else math.nan, "n": int(values.size)}
    return {"root": str(root), "runs": rows, "metrics": stats}


def write_table(result: dict, out_csv: Path) -> None:
    keys = ["run", "fold", "epochs", *result["metrics"]]
    with open(out_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result["runs"])
        writer.writerow({"run": "mean", **{k: v["mean"] for k, v in result["metrics"].items()}})
        writer.writerow({"run": "sd", **{k: v["sd"] for k, v in result["metrics"].items()}})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="brain3d-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="folder holding the runs (e.g. a multirun sweep folder)")
    args = parser.parse_args(argv)
    try:
        result = gather(args.root)
    except FileNotFoundError as err:
        print(f"brain3d-eval: error: {err}", file=sys.stderr)
        return 2
    write_table(result, args.root / "cv_summary.csv")
    (args.root / "cv_summary.json").write_text(json.dumps(result, indent=2))
    print(f"{len(result['runs'])} runs under {args.root}")
    for key, s in result["metrics"].items():
        print(f"  {key:<28} {s['mean']:.4f} ± {s['sd']:.4f}  (n={s['n']})")
    print(f"written: {args.root / 'cv_summary.csv'}, {args.root / 'cv_summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
