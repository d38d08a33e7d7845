"""``report.html``: a visual check of a run (or of predictions) that opens offline in any browser.

A page holds the learning curves of every logged metric, a table of final and best metrics, and one picture
per subject (three orthogonal slices, truth outlined green, prediction red), worst subjects first. Pictures
are PNG files in ``report_files/`` beside the page, referenced by relative paths, so the page stays small and
the folder can be copied or zipped as a whole. ``brain3d-train`` refreshes its report after every validation
(so a running job can be checked), ``brain3d-predict`` writes one for its outputs.

Primitives other commands build on: :func:`orthogonal_panel` (a volume -> an RGB picture), :func:`save_png`,
:func:`plot_curves` (history -> PNGs), :func:`write_html` (sections -> a page, written atomically).
:class:`WorstCases` keeps the worst few subjects of a long loop (bounded memory); :class:`ReportGuard` makes a
failure to draw one warning instead of a stopped run.

Orientation: volumes are RAS-ordered as brain3d loads them (axis 0 = x, left -> right; 1 = y, posterior ->
anterior; 2 = z, inferior -> superior). Every view is shown in the neurological convention: the patient's right
on the picture's right; axial: anterior at the top; coronal and sagittal: superior at the top; sagittal:
anterior on the right. (Axial = ``volume[:, :, k].T`` drawn with the origin at the lower left.)

matplotlib draws the pictures, through ``Figure`` + ``FigureCanvasAgg`` (no pyplot state, no display); it is
imported only when something is drawn, so training without it loses only the report.
"""

from __future__ import annotations

import heapq
import html
import logging
import math
import os
import re
import textwrap
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("brain3d.report")

FILES_DIR = "report_files"  # pictures beside report.html
VIEW_PIXELS = 160  # each view is enlarged by a whole factor to at least this many pixels on its longer side
TRUTH_RGB, PREDICTION_RGB, BOTH_RGB = (0, 230, 0), (255, 40, 40), (255, 230, 0)
_VIEWS = (("axial", 2, "z"), ("coronal", 1, "y"), ("sagittal", 0, "x"))  # (name, axis cut, its coordinate)


# ---- pictures of volumes ----------------------------------------------------------------------------------

def orthogonal_slices(image: np.ndarray, truth: np.ndarray | None = None, prediction: np.ndarray | None = None,
                      *, voxel_size_mm=None) -> dict:
    """The three orthogonal slices of a (X, Y, Z) RAS volume, ready to draw, as a small dict (a few tens of KB).

    The slices cross at the voxel of the truth's foreground nearest its centre of mass, else the prediction's,
    else the volume centre (a small lesion is invisible on a mid-slice). The image is windowed to its 1st-99th
    percentiles and stored as uint8; masks as bool (``> 0.5``: probabilities or binary).

    Args:
        image: (X, Y, Z) float volume.
        truth: optional mask of the same shape (ground truth).
        prediction: optional mask or probability map of the same shape.
        voxel_size_mm: optional (3,) voxel size; the views are then drawn with true proportions. Defaults to
            None (square voxels).

    Returns:
        ``{"views": [{"name", "coordinate", "index", "image", "truth", "prediction", "pixel_mm"}, ...] (axial,
        coronal, sagittal; 2-D arrays in display orientation, row 0 at the top), "through": str, "centre"}``.

    Raises:
        ValueError: an image that is not 3-D, or a mask of another shape.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise ValueError(f"orthogonal_slices: expected a 3-D (X, Y, Z) volume, got shape {image.shape}")
    masks = {}
    for name, mask in (("truth", truth), ("prediction", prediction)):
        if mask is not None:
            mask = np.asarray(mask)
            if mask.shape != image.shape:
                raise ValueError(f"orthogonal_slices: {name} has shape {mask.shape}, the image {image.shape}")
            masks[name] = mask > 0.5
    centre, through = _slice_centre(masks, image.shape)
    sample = image.reshape(-1)[:: max(1, image.size // 1_000_000)]  # percentiles of at most ~1M voxels: fast
    sample = sample[np.isfinite(sample)]
    lo, hi = np.percentile(sample, [1, 99]) if sample.size else (0.0, 1.0)
    scale = 255.0 / max(float(hi - lo), 1e-6)
    spacing = np.ones(3) if voxel_size_mm is None else np.asarray(voxel_size_mm, dtype=np.float64).reshape(3)
    views = []
    for name, axis, coordinate in _VIEWS:
        cut = [slice(None)] * 3
        cut[axis] = centre[axis]
        cut = tuple(cut)
        grey = np.clip((np.nan_to_num(image[cut]) - lo) * scale, 0, 255).astype(np.uint8)
        rows_axis, cols_axis = [a for a in range(3) if a != axis][::-1]  # after .T: rows = the later axis
        views.append({
            "name": name, "coordinate": coordinate, "index": int(centre[axis]),
            "image": _display(grey),
            "truth": _display(masks["truth"][cut]) if "truth" in masks else None,
            "prediction": _display(masks["prediction"][cut]) if "prediction" in masks else None,
            "pixel_mm": (float(spacing[rows_axis]), float(spacing[cols_axis])),
        })
    return {"views": views, "through": through, "centre": tuple(int(c) for c in centre)}


def orthogonal_panel(image: np.ndarray, truth: np.ndarray | None = None, prediction: np.ndarray | None = None,
                     title: str = "") -> np.ndarray:
    """An (H, W, 3) uint8 RGB picture of the axial, coronal and sagittal slices of a (X, Y, Z) RAS volume.

    Grey image (1st-99th percentile window), truth outlined green, prediction (probability > 0.5, or binary)
    outlined red, both yellow. The slices pass through the truth's foreground (else the prediction's, else the
    volume centre); the title says which. Orientation: the module docstring (neurological convention).

    Args:
        image: (X, Y, Z) float volume.
        truth: optional ground-truth mask, same shape.
        prediction: optional probability map or mask, same shape.
        title: text above the views. Defaults to "".

    Example:
        >>> picture = orthogonal_panel(volume, truth=mask, prediction=probability, title="sub-001")
        >>> save_png(picture, Path("sub-001.png"))
    """
    return slices_panel(orthogonal_slices(image, truth, prediction), title)


def slices_panel(slices: dict, title: str = "") -> np.ndarray:
    """Draw :func:`orthogonal_slices`' dict as :func:`orthogonal_panel` does (title, then the slices' position)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    views = slices["views"]
    finest = min(min(v["pixel_mm"]) for v in views)
    longest = max(max(n * mm / finest for n, mm in zip(v["image"].shape, v["pixel_mm"])) for v in views)
    zoom = max(1, math.ceil(VIEW_PIXELS / max(longest, 1)))
    tiles = [_tile(v, [max(1, round(zoom * mm / finest)) for mm in v["pixel_mm"]]) for v in views]
    gap, line_h, label_h = 6, 14, 16
    width = sum(t.shape[1] for t in tiles) + gap * (len(tiles) + 1)
    text = f"{title} | slices through {slices['through']}" if title else f"slices through {slices['through']}"
    lines = textwrap.wrap(text, max(20, int(width / 7.2))) or [""]  # ~7 px per character at 8.5 pt
    header = gap + line_h * len(lines)
    height = header + max(t.shape[0] for t in tiles) + label_h
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    x, centres = gap, []
    for tile in tiles:
        canvas[header:header + tile.shape[0], x:x + tile.shape[1]] = tile
        centres.append(x + tile.shape[1] / 2)
        x += tile.shape[1] + gap
    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    fig.figimage(canvas, 0, 0, origin="upper")
    fig.text(gap / width, 1 - 3 / height, "\n".join(lines), va="top", ha="left", color="white", fontsize=8.5,
             linespacing=1.15)
    for view, cx in zip(views, centres):
        fig.text(cx / width, 3 / height, f"{view['name']}, {view['coordinate']}={view['index']}", ha="center",
                 va="bottom", color="#bbbbbb", fontsize=7.5)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _display(slice_2d: np.ndarray) -> np.ndarray:
    """A (first, second) RAS slice in display orientation: rows = second axis (top = its high end), columns =
    first axis (left = its low end), i.e. ``slice.T`` drawn with the origin at the lower left."""
    return np.ascontiguousarray(np.flipud(slice_2d.T))


def _slice_centre(masks: dict, shape: tuple) -> tuple[tuple[int, int, int], str]:
    """Where the three slices cross, and a phrase saying why (for the title)."""
    for name in ("truth", "prediction"):
        mask = masks.get(name)
        if mask is not None and mask.any():
            coords = np.argwhere(mask)  # (N, 3)
            nearest = coords[np.argmin(((coords - coords.mean(0)) ** 2).sum(1))]  # a foreground voxel, even for rings
            centre = tuple(int(c) for c in nearest)
            return centre, f"the {name}'s foreground ({', '.join(f'{a}={c}' for a, c in zip('xyz', centre))})"
    centre = tuple(int(n) // 2 for n in shape)
    return centre, "the volume centre"


def _tile(view: dict, zoom: list[int]) -> np.ndarray:
    """One view as RGB, enlarged by whole factors (rows, columns), masks drawn as outlines (their edge pixels)."""
    zoom_rows, zoom_cols = zoom

    def enlarge(a):
        return a.repeat(zoom_rows, axis=0).repeat(zoom_cols, axis=1)

    grey = enlarge(view["image"])
    rgb = np.stack([grey, grey, grey], axis=-1)
    thickness = max(1, min(zoom_rows, zoom_cols) // 3)
    outlines = {}
    for name in ("truth", "prediction"):
        if view[name] is not None and view[name].any():
            mask = enlarge(view[name])
            outlines[name] = mask & ~_erode(mask, thickness)  # the voxels' own edge: a full mask frames the view
    truth, pred = outlines.get("truth"), outlines.get("prediction")
    if truth is not None:
        rgb[truth] = TRUTH_RGB
    if pred is not None:
        rgb[pred] = PREDICTION_RGB
    if truth is not None and pred is not None:
        rgb[truth & pred] = BOTH_RGB
    return rgb


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    """8-neighbour binary erosion by ``steps`` pixels, outside the picture counting as background (numpy only)."""
    out = mask.copy()
    for _ in range(steps):
        padded = np.pad(out, 1)
        shrunk = np.ones_like(out)
        for dr in (0, 1, 2):
            for dc in (0, 1, 2):
                shrunk &= padded[dr:dr + out.shape[0], dc:dc + out.shape[1]]
        out = shrunk
    return out


def save_png(picture: np.ndarray, path: Path) -> Path:
    """Write an (H, W, 3) uint8 RGB picture as PNG, atomically (a browser reloading the page never reads half a
    file). Returns ``path``."""
    from matplotlib.image import imsave

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = np.asarray(picture)
    if picture.ndim != 3 or picture.shape[2] not in (3, 4) or picture.dtype != np.uint8:
        raise ValueError(f"save_png: expected an (H, W, 3) uint8 picture, got {picture.shape} {picture.dtype}")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        imsave(f, picture, format="png")
    os.replace(tmp, path)
    return path


# ---- learning curves --------------------------------------------------------------------------------------

_THROUGHPUT = ("train_volumes_per_second", "train_data_wait_fraction")


def curve_families(history: list[dict]) -> dict[str, list[str]]:
    """Which history keys go in which plot: ``loss`` (train_loss and val_loss), each other ``val_<metric>``,
    ``lr``, ``throughput`` (volumes/s and data-wait fraction), and any other logged number on its own."""
    keys = list(dict.fromkeys(k for record in history for k in record if k != "epoch"))
    families: dict[str, list[str]] = {}
    for key in keys:
        if key in ("train_loss", "val_loss"):
            families.setdefault("loss", []).append(key)
        elif key in _THROUGHPUT:
            families.setdefault("throughput", []).append(key)
        else:
            families[key] = [key]
    return families


def plot_curves(history: list[dict], out_dir: Path) -> list[Path]:
    """One PNG per metric family of a brain3d history (``curve_<family>.png`` in ``out_dir``), x = epoch.

    Every epoch is a marker, so a curve of one to three epochs still shows its points. Families as
    :func:`curve_families`; the throughput family has two stacked plots (volumes/s, data-wait fraction).

    Args:
        history: brain3d's per-epoch records (``epoch``, ``train_loss``, ``val_loss``, ``val_<metric>``, ``lr``,
            ``train_volumes_per_second``, ``train_data_wait_fraction``).
        out_dir: folder for the PNGs (created).

    Returns:
        The PNG paths, in family order (loss first).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for family, keys in curve_families(history).items():
        stacked = family == "throughput"
        # fixed margins: constrained layout doubles the time
        fig = Figure(figsize=(4.6, 3.6 if stacked else 3.0), dpi=100)
        FigureCanvasAgg(fig)
        fig.subplots_adjust(left=0.17, right=0.97, top=0.9, bottom=0.13 if stacked else 0.15, hspace=0.12)
        axes = fig.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0] if stacked else [fig.subplots()] * len(keys)
        for ax, key in zip(axes, keys):
            points = [(r["epoch"], r[key]) for r in history if _is_number(r.get(key)) and _is_number(r.get("epoch"))]
            if points:
                x, y = zip(*points)
                ax.plot(x, y, marker="o", markersize=4, linewidth=1.5, label=key)
            ax.set_ylabel({"train_volumes_per_second": "volumes / s",
                           "train_data_wait_fraction": "data wait"}.get(key, key) if stacked else "")
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if family == "lr":
            axes[0].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if len(keys) > 1 and not stacked:
            axes[0].legend(fontsize=8)
        axes[-1].set_xlabel("epoch")
        fig.suptitle(family, fontsize=10)
        path = out_dir / f"curve_{_safe_name(family)}.png"
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            fig.savefig(f, format="png")
        os.replace(tmp, path)
        paths.append(path)
    return paths


# ---- the page ---------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 1.5em; color: #222;
       max-width: 1600px; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
p.text { white-space: pre-wrap; color: #444; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; } figure img { display: block; max-width: 100%; }
figcaption { font-size: 0.85em; color: #333; margin-top: 2px; }
"""


def _cell(value, esc) -> str:
    """A table cell: numbers right-aligned (digits line up), text left-aligned."""
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    return f'<td class="num">{esc(_format(value))}</td>' if number else f"<td>{esc(_format(value))}</td>"


def write_html(path: Path, title: str, sections: list[dict]) -> Path:
    """A self-contained page (inline CSS, no script, no network) of ``sections``, written atomically.

    Args:
        path: the .html file (its folder is created).
        title: the page's title and top heading.
        sections: each ``{"heading": str, "text": str (optional), "table": list[dict] (optional: one row per
            dict, columns = the keys in first-seen order), "images": [{"src": path relative to the page,
            "caption": str}] (optional: a grid of pictures)}``. All text is HTML-escaped.

    Returns:
        ``path``. A temp file is renamed onto it, so a browser reloading while a run refreshes it never reads
        half a page.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>", f"<h1>{esc(title)}</h1>"]
    for section in sections:
        parts.append(f"<section><h2>{esc(str(section.get('heading', '')))}</h2>")
        if section.get("text"):
            parts.append(f'<p class="text">{esc(str(section["text"]))}</p>')
        if section.get("table"):
            rows = section["table"]
            columns = list(dict.fromkeys(k for row in rows for k in row))
            parts.append("<table><thead><tr>" + "".join(f"<th>{esc(str(c))}</th>" for c in columns)
                         + "</tr></thead><tbody>")
            for row in rows:
                parts.append("<tr>" + "".join(_cell(row.get(c), esc) for c in columns) + "</tr>")
            parts.append("</tbody></table>")
        if section.get("images"):
            parts.append('<div class="grid">')
            for image in section["images"]:
                caption = esc(str(image.get("caption", "")))
                parts.append(f'<figure><img src="{esc(str(image["src"]), quote=True)}" alt="{caption}" loading="lazy">'
                             f"<figcaption>{caption}</figcaption></figure>")
            parts.append("</div>")
        parts.append("</section>")
    parts.append("</body></html>\n")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    os.replace(tmp, path)
    return path


def prune_files(files_dir: Path, keep: list[Path]) -> None:
    """Delete the PNGs in ``files_dir`` that ``keep`` does not name (pictures of an earlier refresh)."""
    kept = {Path(p).resolve() for p in keep}
    for png in Path(files_dir).glob("*.png"):
        if png.resolve() not in kept:
            png.unlink(missing_ok=True)


# ---- which subjects to show -------------------------------------------------------------------------------

class WorstCases:
    """The ``limit`` worst subjects of a stream, in bounded memory (a validation set of 1,000 brains).

    ``offer(badness, build)`` counts a subject and calls ``build()`` (which draws its slices) only if it is
    among the worst so far; larger badness is worse (segmentation 1 - Dice, classification |p - label|,
    regression |prediction - target|; NaN counts as worst). Ties keep the earlier subject.

    Example:
        >>> worst = WorstCases(16)
        >>> for case in stream: worst.offer(1 - case_dice, lambda: {"subject_id": ..., "slices": ...})
        >>> worst.sorted()  # worst first
    """

    def __init__(self, limit: int | None):
        self.limit = None if limit is None else max(0, int(limit))
        self.total = 0
        self._heap: list = []  # (badness, -arrival, case): the root is the least bad, latest among equals

    def offer(self, badness: float, build: Callable[[], dict]) -> None:
        badness = float(badness)
        badness = math.inf if math.isnan(badness) else badness
        self.total += 1
        if self.limit is not None and len(self._heap) >= self.limit:
            if self.limit == 0 or badness <= self._heap[0][0]:
                return
            heapq.heappop(self._heap)
        case = dict(build())
        case["badness"] = badness
        heapq.heappush(self._heap, (badness, -self.total, case))

    def sorted(self) -> list[dict]:
        """The kept cases, worst first (ties in arrival order)."""
        return [case for *_, case in sorted(self._heap, key=lambda e: (e[0], e[1]), reverse=True)]


class ReportGuard:
    """Calls a report writer so that a failure (matplotlib missing, a full disk) logs one warning, the first
    time, and never raises: a report must not stop a training run. Keeps the time spent (``seconds``)."""

    def __init__(self, what: str = "report.html"):
        self.what, self.warned, self.seconds, self.calls = what, False, 0.0, 0

    def __call__(self, write: Callable[..., Path], *args, **kwargs) -> Path | None:
        start = time.perf_counter()
        try:
            path = write(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - any failure to draw is a warning, never a stopped run
            if not self.warned:
                log.warning("could not write %s (%s: %s); training and predictions are unaffected, and this "
                            "warning is not repeated", self.what, type(err).__name__, err)
                self.warned = True
            return None
        elapsed = time.perf_counter() - start
        self.seconds += elapsed
        self.calls += 1
        if self.calls == 1:
            log.info("report: %s", path)
        log.debug("%s written in %.2f s", self.what, elapsed)
        return path


# ---- the run report and the prediction report -------------------------------------------------------------

_LOWER_IS_BETTER = ("loss", "mae", "rmse", "hd95", "error")


def metrics_table(history: list[dict], best: dict | None = None) -> list[dict]:
    """One row per logged number: its final (last epoch) value, and for losses and validation metrics its best
    value over the epochs and that epoch (min for losses and errors, max otherwise); the monitored metric
    (``best["name"]``) is marked."""
    if not history:
        return []
    last = history[-1]
    rows = []
    for key in [k for k in last if k != "epoch"]:
        row = {"metric": key + (" (monitored)" if best and key == best.get("name") else ""),
               f"final (epoch {last.get('epoch')})": last.get(key), "best": None, "best epoch": None}
        if key.startswith("val_") or key == "train_loss":
            points = [(r[key], r["epoch"]) for r in history if _is_number(r.get(key)) and not math.isnan(r[key])]
            if points:
                lower = any(key.endswith(s) for s in _LOWER_IS_BETTER)
                value, epoch = (min if lower else max)(points, key=lambda p: p[0])
                row["best"], row["best epoch"] = value, epoch
        rows.append(row)
    return rows


def write_run_report(run_dir: Path, history: list[dict], best: dict, task: str, cases: list[dict],
                     max_cases: int, *, total_cases: int | None = None, class_names: list[str] | None = None,
                     note: str = "") -> Path:
    """``<run_dir>/report.html`` with ``<run_dir>/report_files/*.png``: learning curves, final and best metrics,
    and one picture per validation subject (at most ``max_cases``), worst first.

    Args:
        run_dir: the run folder.
        history: the per-epoch records (as in summary.json).
        best: ``{"name", "value", "epoch", "mode"}`` of the monitored metric.
        task: classification | regression | segmentation.
        cases: from ``engine.evaluate(..., collect_cases=True)``: ``{"subject_id", "slices", "badness"}`` plus
            ``dice`` | ``probability``, ``label`` | ``prediction``, ``target``.
        max_cases: at most this many subject pictures (``trainer.report_subjects``).
        total_cases: how many subjects were validated (for "the 16 worst of 48"). Defaults to ``len(cases)``.
        class_names: classification: (negative, positive) names for the captions.
        note: an extra sentence for the top of the page.

    Returns:
        The path of report.html. Pictures of an earlier refresh that are no longer shown are deleted.
    """
    run_dir = Path(run_dir)
    files = run_dir / FILES_DIR
    curves = plot_curves(history, files)
    last = history[-1]["epoch"] if history else 0
    summary = f"task {task}; {len(history)} epoch(s) recorded, refreshed after epoch {last} at " \
              f"{datetime.now():%Y-%m-%d %H:%M:%S} (after every validation while the run lasts)."
    if best and best.get("value") is not None:
        summary += (f"\nmonitored {best['name']}: best {best['value']:.4g} at epoch {best['epoch']} "
                    f"(checkpoints/best.pt).")
    if note:
        summary += "\n" + note
    subjects, pictures = _subject_section(task, cases, max_cases, total_cases, files, "validation subjects",
                                          class_names, scored=True)
    sections = [
        {"heading": "Run", "text": summary},
        {"heading": "Metrics", "table": metrics_table(history, best)},
        {"heading": "Learning curves", "images": [{"src": f"{FILES_DIR}/{p.name}", "caption": p.stem[len("curve_"):]}
                                                  for p in curves]},
        subjects,
    ]
    path = write_html(run_dir / "report.html", f"brain3d run report: {run_dir.name}", sections)
    prune_files(files, curves + pictures)
    return path


def write_prediction_report(out_dir: Path, task: str, metrics: dict, cases: list[dict], max_cases: int, *,
                            total_cases: int | None = None, scored: bool = False,
                            class_names: list[str] | None = None, note: str = "") -> Path:
    """``<out_dir>/report.html`` for ``brain3d-predict``: the metrics (if any) and one picture per subject.

    Args:
        out_dir: the output folder.
        task: classification | regression | segmentation.
        metrics: metrics.json's content (``{name: {"value", "ci_low", "ci_high"}}`` and plain numbers), or {}.
        cases: from a :class:`WorstCases` (sorted); as :func:`write_run_report`'s.
        max_cases: at most this many pictures (predict.yaml ``report_subjects``).
        total_cases: how many subjects were predicted.
        scored: whether the order is by error (targets were given) or the manifest's.
        class_names: classification: (negative, positive) names.
        note: an extra sentence (e.g. which grid the pictures show).
    """
    out_dir = Path(out_dir)
    files = out_dir / FILES_DIR
    subjects, pictures = _subject_section(task, cases, max_cases, total_cases, files, "subjects", class_names,
                                          scored=scored)
    subjects["text"] = subjects["text"] + ("\n" + note if note else "")
    n_subjects = total_cases if total_cases is not None else len(cases)
    sections = [{"heading": "Predictions", "text": f"task {task}; {n_subjects} subject(s); "
                                                   f"written {datetime.now():%Y-%m-%d %H:%M:%S}."}]
    rows = _flatten_metrics(metrics)
    sections.append({"heading": "Metrics", "table": rows} if rows else
                    {"heading": "Metrics", "text": "no targets in the manifest: predictions only"})
    sections.append(subjects)
    path = write_html(out_dir / "report.html", f"brain3d predictions: {out_dir.name}", sections)
    prune_files(files, pictures)
    return path


def case_caption(task: str, case: dict, class_names: list[str] | None = None) -> str:
    """``sub-003: Dice 0.412`` | ``sub-003: p(M)=0.930, label F`` | ``sub-003: predicted 63.2, target 41 (error
    +22.2)``; the parts without a value (no target) are left out."""
    parts = []
    if case.get("dice") is not None:
        parts.append(f"Dice {case['dice']:.3f}")
    if case.get("probability") is not None:
        positive = f"({class_names[1]})" if class_names else ""
        parts.append(f"p{positive}={case['probability']:.3f}")
        if case.get("label") is not None:
            label = round(case["label"])
            parts.append(f"label {class_names[label] if class_names else label}")
    if case.get("prediction") is not None:
        parts.append(f"predicted {case['prediction']:.4g}")
        if case.get("target") is not None:
            parts.append(f"target {case['target']:.4g} (error {case['prediction'] - case['target']:+.3g})")
    if case.get("predicted_volume_ml") is not None and case.get("dice") is None:
        parts.append(f"predicted volume {case['predicted_volume_ml']:.3g} ml")
    return f"{case['subject_id']}: " + ", ".join(parts) if parts else str(case["subject_id"])


_ORDER = {"segmentation": "sorted from worst to best Dice",
          "classification": "most confidently wrong first (|p − label| descending)",
          "regression": "largest error first (|prediction − target| descending)"}


def _subject_section(task: str, cases: list[dict], max_cases: int, total: int | None, files: Path, what: str,
                     class_names, scored: bool) -> tuple[dict, list[Path]]:
    """The subjects' section (text + pictures) and the PNGs drawn for it."""
    ordered = sorted(cases, key=lambda c: c.get("badness", 0.0), reverse=True)[: max(0, int(max_cases))]
    total = len(cases) if total is None else int(total)
    order = _ORDER.get(task, "worst first") if scored else "in manifest order"
    if not ordered:
        return {"heading": what.capitalize(), "text": f"no pictures ({total} {what}; report_subjects={max_cases})"}, []
    shown = (f"the {len(ordered)} worst of {total}" if scored else f"the first {len(ordered)} of {total}") \
        if len(ordered) < total else f"all {total}"
    where = ("Green outline: truth, red: prediction (> 0.5), yellow: both. Three slices through the truth's "
             "foreground (else the prediction's, else the volume centre)" if task == "segmentation" else
             "Three slices through the volume centre")
    text = (f"{what.capitalize()}: {shown}, {order}. {where}, in the neurological convention: patient's right on the "
            "right; axial anterior up; coronal and sagittal superior up; sagittal anterior right.")
    images, pictures = [], []
    for i, case in enumerate(ordered):
        caption = case_caption(task, case, class_names)
        path = files / f"case_{i:03d}_{_safe_name(str(case['subject_id']))}.png"
        save_png(slices_panel(case["slices"], caption), path)
        pictures.append(path)
        images.append({"src": f"{FILES_DIR}/{path.name}", "caption": caption})
    return {"heading": what.capitalize(), "text": text, "images": images}, pictures


def _flatten_metrics(metrics: dict, prefix: str = "") -> list[dict]:
    """metrics.json's numbers as table rows ``{"metric", "value", "95% CI"}``."""
    rows = []
    for key, value in (metrics or {}).items():
        name = prefix + str(key)
        if isinstance(value, dict) and "value" in value:
            ci = (f"{value['ci_low']:.4g} – {value['ci_high']:.4g}" if _is_number(value.get("ci_low"))
                  and _is_number(value.get("ci_high")) else None)
            rows.append({"metric": name, "value": value["value"], "95% CI": ci})
        elif isinstance(value, dict):
            rows.extend(_flatten_metrics(value, name + "."))
        elif _is_number(value) and not isinstance(value, bool):
            rows.append({"metric": name, "value": value, "95% CI": None})
    return rows


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _format(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, (float, np.floating)):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:80] or "subject"
