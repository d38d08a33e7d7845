"""``brain3d-eval``: gather the ``summary.json`` of every run under a folder (e.g. the K folds of a
cross-validation sweep) into one table, mean ± sd per metric.

    brain3d-train -m task=regression data.num_folds=5 data.fold=0,1,2,3,4 hydra.sweep.dir=runs/cv
    brain3d-eval runs/cv

writes ``runs/cv/cv_summary.csv`` (one row per run, then mean and sd) and ``runs/cv/cv_summary.json``.
Metrics are the final epoch's validation metrics (judge a model by its curve's end, not its best point)
plus ``best_<monitor>``.

A sweep that varies more than the fold (``backbone.width=0.5,1.0 data.fold=0,1,2,3,4``) is grouped by the
run's other command-line overrides (``.hydra/overrides.yaml`` in each run folder): each configuration gets
its own mean ± sd, since one mean over different models describes none of them. Overrides that do not change
the model or its data (``hydra.*``, ``trainer.progress``, ``trainer.device``, ``trainer.resume``,
``data.cache_dir``, ``output_dir``) are not grouped on. ``--no-group`` pools every run into one mean ± sd.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

FOLD_KEY = "data.fold"
# Overrides that change neither the model nor its data: runs differing only in these are one configuration.
IGNORED_KEYS = frozenset({"trainer.progress", "trainer.device", "trainer.resume", "data.cache_dir", "output_dir"})
IGNORED_PREFIXES = ("hydra.",)
NO_OVERRIDES_LABEL = "(no .hydra/overrides.yaml)"


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


def _split_override(text: str) -> tuple[str, str]:
    """``"+backbone.width=0.5"`` -> ``("backbone.width", "0.5")``; a deletion ``"~key"`` -> ``("key", "(deleted)")``."""
    key, sep, value = text.partition("=")
    return key.lstrip("+~"), value if sep else "(deleted)"


def read_overrides(run_dir: Path) -> dict[str, str] | None:
    """The command-line overrides of a run as ``{key: value}``, from Hydra's ``.hydra/overrides.yaml``.

    None when the file is absent or not a list (a run not started by Hydra, or ``output_dir`` moved away from
    the Hydra folder): its configuration is then unknown.
    """
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    items = OmegaConf.to_container(OmegaConf.load(path))
    if not isinstance(items, list):
        return None
    return dict(_split_override(str(item)) for item in items)


def model_overrides(overrides: dict[str, str] | None) -> dict[str, str] | None:
    """The overrides that make one configuration differ from another: all but the fold and :data:`IGNORED_KEYS`."""
    if overrides is None:
        return None
    return {k: v for k, v in sorted(overrides.items())
            if k != FOLD_KEY and k not in IGNORED_KEYS and not k.startswith(IGNORED_PREFIXES)}


def differing_keys(configs: list[dict[str, str] | None]) -> list[str]:
    """Override keys whose value (or presence) is not the same in every known configuration."""
    known = [c for c in configs if c is not None]
    keys = sorted({k for c in known for k in c})
    return [k for k in keys if len({c.get(k) for c in known}) > 1]


def group_label(config: dict[str, str] | None, keys: list[str]) -> str:
    """``"backbone.width=0.5 loss=l1"``: the group's values of the keys that differ between groups."""
    if config is None:
        return NO_OVERRIDES_LABEL
    return " ".join(f"{k}={config.get(k, '(default)')}" for k in keys)


def metric_stats(rows: list[dict], metrics: list[str]) -> dict:
    """Mean and sd (ddof=1) of each metric over the rows' finite values, with how many there were."""
    stats = {}
    for key in metrics:
        values = np.array([r[key] for r in rows if isinstance(r.get(key), (int, float)) and r[key] is not None],
                          dtype=float)
        values = values[np.isfinite(values)]
        stats[key] = {"mean": float(values.mean()) if values.size else math.nan,
                      "sd": float(values.std(ddof=1)) if values.size > 1 else math.nan, "n": int(values.size)}
    return stats


def _partition(configs: list[dict[str, str] | None]) -> list[list[int]]:
    """Indices of the runs sharing a configuration, groups in order of their first run."""
    groups: dict[str, list[int]] = {}
    for i, config in enumerate(configs):
        groups.setdefault(json.dumps(config, sort_keys=True), []).append(i)
    return list(groups.values())


def gather(root: Path, group: bool = True) -> dict:
    """Rows of every run under ``root`` and the mean / sd (ddof=1) of each numeric metric, per configuration.

    Runs are grouped by their overrides other than the fold (see :func:`model_overrides`), so a sweep over
    widths and folds gives one mean ± sd per width rather than one over all. Returns ``{"root", "runs",
    "groups", "differing_keys", "unknown_config"}``: ``groups`` holds ``{"label", "overrides", "runs",
    "metrics"}`` per configuration, ``differing_keys`` the override keys that differ between runs (beyond the
    fold; also given with ``group=False``), ``unknown_config`` how many runs had no ``.hydra/overrides.yaml``.
    With a single group (or ``group=False``, which pools every run), ``metrics`` is also given at the top
    level, as before grouping existed; with several it is not, since a pooled mean would mix configurations.

    Raises:
        FileNotFoundError: no summary.json below root.
    """
    paths = find_summaries(root)
    if not paths:
        raise FileNotFoundError(f"no summary.json found under {root}")
    rows = [run_row(p, root) for p in paths]
    metrics = sorted({k for r in rows for k in r if k.startswith(("val_", "best_"))})
    configs = [model_overrides(read_overrides(p.parent)) for p in paths]
    keys = differing_keys(configs)
    parts = _partition(configs) if group else [list(range(len(rows)))]
    groups = []
    for indices in parts:
        config = configs[indices[0]] if group else None
        label = group_label(config, keys) if len(parts) > 1 else ""
        members = [rows[i] for i in indices]
        if label:
            for row in members:
                row["group"] = label
        groups.append({"label": label, "overrides": config, "runs": members, "metrics": metric_stats(members, metrics)})
    result = {"root": str(root), "runs": rows, "groups": groups, "differing_keys": keys,
              "unknown_config": sum(c is None for c in configs)}
    if len(groups) == 1:
        result["metrics"] = groups[0]["metrics"]
    return result


def write_table(result: dict, out_csv: Path) -> None:
    """One row per run, then a ``mean`` and an ``sd`` row, per group (a ``group`` column when there are several)."""
    metrics = list(result["groups"][0]["metrics"])
    several = len(result["groups"]) > 1
    keys = [*(["group"] if several else []), "run", "fold", "epochs", *metrics]
    with open(out_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for group in result["groups"]:
            label = {"group": group["label"]} if several else {}
            writer.writerows(group["runs"])
            writer.writerow({**label, "run": "mean", **{k: v["mean"] for k, v in group["metrics"].items()}})
            writer.writerow({**label, "run": "sd", **{k: v["sd"] for k, v in group["metrics"].items()}})


def print_result(result: dict, root: Path) -> None:
    """The runs, a line on how they were grouped (or why that is unknown), then mean ± sd per group."""
    groups = result["groups"]
    print(f"{len(result['runs'])} runs under {root}")
    differ = ", ".join(result["differing_keys"]) or "their overrides"
    if len(groups) > 1:
        print(f"warning: the runs differ in {differ}: grouped into {len(groups)} configurations, "
              "mean ± sd per group (--no-group pools them)")
    elif result["differing_keys"]:
        print(f"warning: the runs differ in {differ}, pooled into one mean ± sd as asked (--no-group)")
    if result["unknown_config"]:
        print(f"note: {result['unknown_config']} run(s) have no .hydra/overrides.yaml, so whether their configurations "
              "differ is unknown; they are taken as one")
    for group in groups:
        if len(groups) > 1:
            print(f"group {group['label']}: {len(group['runs'])} runs")
        for key, s in group["metrics"].items():
            print(f"  {key:<28} {s['mean']:.4f} ± {s['sd']:.4f}  (n={s['n']})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="brain3d-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="folder holding the runs (e.g. a multirun sweep folder)")
    parser.add_argument("--no-group", action="store_true",
                        help="pool every run into one mean ± sd, even when their overrides differ beyond the fold")
    args = parser.parse_args(argv)
    try:
        result = gather(args.root, group=not args.no_group)
    except FileNotFoundError as err:
        print(f"brain3d-eval: error: {err}", file=sys.stderr)
        return 2
    write_table(result, args.root / "cv_summary.csv")
    (args.root / "cv_summary.json").write_text(json.dumps(result, indent=2))
    print_result(result, args.root)
    print(f"written: {args.root / 'cv_summary.csv'}, {args.root / 'cv_summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
