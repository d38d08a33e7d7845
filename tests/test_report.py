"""report.html: the pictures (orientation, outlines, slices through small lesions), the page, the curves, which
subjects are shown and in what order, and the reports brain3d-train and brain3d-predict write."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from brain3d import report
from brain3d.data.synthetic import synthetic_cache_dir

from tests.conftest import read_summary, tiny_overrides

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def green(picture: np.ndarray) -> np.ndarray:
    r, g, b = (picture[..., i].astype(int) for i in range(3))
    return (g > 180) & (r < 80) & (b < 80)


def red(picture: np.ndarray) -> np.ndarray:
    r, g, b = (picture[..., i].astype(int) for i in range(3))
    return (r > 180) & (g < 80) & (b < 80)


def phantom(shape=(40, 48, 36)) -> np.ndarray:
    """A bright ellipsoid 'head' on a dark background, with some noise."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    head = (grid ** 2).sum(0) < 0.8
    return (head * 100 + np.random.default_rng(0).normal(0, 5, shape)).astype(np.float32)


class Page(HTMLParser):
    """The <img> sources, figure captions, headings and table cells of a page."""

    def __init__(self):
        super().__init__()
        self.images, self.captions, self.headings, self.cells, self.texts = [], [], [], [], []
        self._tag = None

    def handle_starttag(self, tag, attrs):
        self._tag = tag
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_endtag(self, tag):
        self._tag = None

    def handle_data(self, data):
        target = {"figcaption": self.captions, "h2": self.headings, "td": self.cells, "p": self.texts}.get(self._tag)
        if target is not None:
            target.append(data)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text())
    return page


def assert_pngs(page_path: Path, page: Page) -> None:
    """Every <img> names a file beside the page that is a PNG and decodes to an RGB(A) picture."""
    for src in page.images:
        assert not src.startswith(("/", "http", "data:")), src
        file = page_path.parent / src
        assert file.read_bytes()[:8] == PNG_SIGNATURE, src
        picture = imread(file)
        assert picture.ndim == 3 and picture.shape[2] in (3, 4) and min(picture.shape[:2]) > 50, (src, picture.shape)


# ---- pictures -------------------------------------------------------------------------------------------------

def test_orthogonal_panel_is_an_rgb_picture_without_colour_when_no_masks():
    picture = report.orthogonal_panel(phantom(), title="sub-001")
    assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3
    assert picture.shape[1] > picture.shape[0] > 150  # three views side by side, each enlarged to >= 160 px
    assert not green(picture).any() and not red(picture).any()


def test_truth_is_outlined_green_and_prediction_red():
    image = phantom()
    truth = np.zeros(image.shape, bool)
    truth[15:25, 20:30, 12:22] = True
    prediction = np.zeros(image.shape, np.float32)
    prediction[18:28, 22:32, 14:24] = 0.9  # a probability map: > 0.5 is the prediction
    only_truth = report.orthogonal_panel(image, truth=truth)
    only_prediction = report.orthogonal_panel(image, prediction=prediction)
    both = report.orthogonal_panel(image, truth=truth, prediction=prediction)
    assert green(only_truth).sum() > 100 and not red(only_truth).any()
    assert red(only_prediction).sum() > 100 and not green(only_prediction).any()
    assert green(both).any() and red(both).any()
    assert not red(report.orthogonal_panel(image, prediction=prediction * 0.5)).any()  # 0.45 < 0.5: nothing


def test_slices_pass_through_a_tiny_off_centre_lesion():
    image = phantom((48, 48, 48))
    truth = np.zeros(image.shape, np.uint8)
    truth[6:8, 38:40, 9:11] = 1  # 8 voxels, far from the volume centre: no mid-slice crosses it
    slices = report.orthogonal_slices(image, truth=truth)
    assert all(view["truth"].any() for view in slices["views"])  # each of the three views shows it
    assert "truth" in slices["through"]
    assert slices["centre"] in [(x, y, z) for x in (6, 7) for y in (38, 39) for z in (9, 10)]
    assert green(report.slices_panel(slices, "lesion")).sum() >= 3 * 4
    # without a truth the prediction decides, and without either the volume centre
    assert "prediction" in report.orthogonal_slices(image, prediction=truth)["through"]
    centre = report.orthogonal_slices(image)
    assert centre["through"] == "the volume centre" and centre["centre"] == (24, 24, 24)


def test_views_follow_the_neurological_convention():
    """RAS arrays: a spot at high x (right), high y (anterior) and high z (superior) is drawn on the right and at
    the top of the axial view (anterior up), and at the top right of the coronal and sagittal views."""
    image = np.zeros((30, 30, 30), np.float32)
    image[20:26, 20:26, 20:26] = 1.0
    views = {v["name"]: v["image"] for v in report.orthogonal_slices(image, truth=image)["views"]}
    for name in ("axial", "coronal", "sagittal"):
        rows, cols = np.nonzero(views[name] > 128)
        assert rows.mean() < 15 and cols.mean() > 15, name  # top (row 0 is the top), right


def test_voxel_size_gives_true_proportions():
    image = phantom((32, 32, 16))
    square = report.orthogonal_slices(image)
    thick = report.orthogonal_slices(image, voxel_size_mm=(1.0, 1.0, 2.0))
    assert [v["pixel_mm"] for v in thick["views"]] == [(1.0, 1.0), (2.0, 1.0), (2.0, 1.0)]  # (rows, columns)
    head = [(report.slices_panel(s) > 128).all(axis=2).sum() for s in (square, thick)]
    assert head[1] > 1.3 * head[0]  # the coronal and sagittal views draw each z voxel twice as tall


def test_save_png_writes_a_decodable_png(tmp_path):
    picture = report.orthogonal_panel(phantom())
    path = report.save_png(picture, tmp_path / "sub" / "a.png")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert (imread(path)[..., :3] * 255).round().astype(np.uint8).shape == picture.shape
    assert [p.name for p in path.parent.iterdir()] == ["a.png"]  # no temp file left behind
    with pytest.raises(ValueError, match="uint8"):
        report.save_png(picture.astype(np.float32), tmp_path / "b.png")


# ---- the page and the curves --------------------------------------------------------------------------------

def test_write_html_escapes_text_and_renders_tables_and_images(tmp_path):
    path = report.write_html(tmp_path / "report.html", "run <1>", [
        {"heading": "Metrics & more", "text": "<script>alert(1)</script>",
         "table": [{"metric": "val_dice", "value": 0.123456}, {"metric": "val_iou", "value": None, "extra": "a<b"}]},
        {"heading": "Pictures", "images": [{"src": "report_files/x.png", "caption": 'sub "1"'}]},
    ])
    text = path.read_text()
    assert "<script>" not in text and "&lt;script&gt;" in text and "run &lt;1&gt;" in text
    assert "http" not in text.lower() and "<link" not in text  # nothing fetched from a network
    page = parse(path)
    assert page.headings == ["Metrics & more", "Pictures"]
    assert page.cells == ["val_dice", "0.1235", "—", "val_iou", "—", "a<b"]  # union of columns, None as a dash
    assert page.images == ["report_files/x.png"] and page.captions == ['sub "1"']
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # written atomically, no temp file left


def history(epochs: int) -> list[dict]:
    return [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.1 / e, "val_dice": 0.2 * e, "val_iou": 0.1 * e,
             "lr": 1e-3 / e, "train_volumes_per_second": 10.0 + e, "train_data_wait_fraction": 0.01} for e in
            range(1, epochs + 1)]


@pytest.mark.parametrize("epochs", [1, 3])
def test_plot_curves_draws_one_png_per_metric_family(tmp_path, epochs):
    paths = report.plot_curves(history(epochs), tmp_path)
    assert [p.name for p in paths] == ["curve_loss.png", "curve_val_dice.png", "curve_val_iou.png", "curve_lr.png",
                                       "curve_throughput.png"]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        picture = imread(path)
        assert picture.ndim == 3 and picture.shape[0] > 200
        assert (picture[..., :3].std(axis=2) > 0.1).any()  # coloured markers and lines, not only black on white


def test_metrics_table_gives_final_and_best_values():
    records = history(3)
    records[1]["val_loss"] = 0.01  # the best val_loss is at epoch 2; val_dice is best (highest) at epoch 3
    rows = {r["metric"]: r for r in report.metrics_table(records, {"name": "val_dice", "value": 0.6, "epoch": 3})}
    assert rows["val_loss"]["best"] == 0.01 and rows["val_loss"]["best epoch"] == 2
    assert rows["val_dice (monitored)"]["best epoch"] == 3
    assert rows["val_dice (monitored)"]["final (epoch 3)"] == 0.6000000000000001
    assert rows["lr"]["best"] is None  # not a metric to optimise


# ---- which subjects, in what order -------------------------------------------------------------------------

def test_worst_cases_keeps_the_worst_and_builds_only_those():
    built = []
    worst = report.WorstCases(3)
    badness = [0.1, 0.9, 0.5, 0.9, 0.2, 0.7, float("nan"), 0.05]
    for i, b in enumerate(badness):
        worst.offer(b, lambda i=i: built.append(i) or {"subject_id": f"s{i}"})
    assert [c["subject_id"] for c in worst.sorted()] == ["s6", "s1", "s3"]  # NaN first, ties in arrival order
    assert worst.total == len(badness) and 7 not in built and 4 not in built  # never among the worst: never drawn
    assert report.WorstCases(0).sorted() == []


def test_report_guard_warns_once_and_never_raises(caplog):
    guard = report.ReportGuard("report.html")

    def broken():
        raise ImportError("No module named 'matplotlib'")

    with caplog.at_level(logging.WARNING, logger="brain3d.report"):
        assert guard(broken) is None and guard(broken) is None
    assert len([r for r in caplog.records if "could not write report.html" in r.getMessage()]) == 1


# ---- the reports of brain3d-train and brain3d-predict ---------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tiny_runs):
    """A tiny segmentation run (2 of its 3 validation subjects pictured) and a classification run, with their
    report.html (conftest's tiny_runs)."""
    return {"seg": tiny_runs["segmentation"], "cls": tiny_runs["classification"]}


def test_segmentation_run_report_has_curves_and_worst_subjects_first(runs):
    run = runs["seg"]
    summary = read_summary(run)
    page = parse(run / "report.html")
    assert_pngs(run / "report.html", page)
    num_curves = len(report.curve_families(summary["history"]))
    num_val = summary["data"]["num_val"]
    # loss, val_dice, val_iou, val_lesion_f1, val_lesion_f1_pooled, lr, throughput
    assert num_curves == 7 and num_val == 3
    cases = [src for src in page.images if "/case_" in src]
    assert len(page.images) == num_curves + min(num_val, 2) and len(cases) == 2
    assert sorted(p.name for p in (run / "report_files").iterdir()) == sorted(Path(s).name for s in page.images)
    dice = [float(re.search(r"Dice ([\d.]+)", c).group(1)) for c in page.captions if "Dice" in c]
    assert len(dice) == 2 and dice == sorted(dice)  # worst first
    assert any("the 2 worst of 3" in t for t in page.texts)
    assert page.headings == ["Run", "Metrics", "Learning curves", "Validation subjects"]
    assert "val_dice (monitored)" in page.cells


def test_classification_run_report_shows_the_most_confidently_wrong_first(runs):
    run = runs["cls"]
    summary = read_summary(run)
    page = parse(run / "report.html")
    assert_pngs(run / "report.html", page)
    names = summary["class_names"]
    errors = []
    for caption in page.captions:
        match = re.search(r"p\(.*?\)=([\d.]+), label (\S+)", caption)
        if match:
            errors.append(abs(float(match.group(1)) - names.index(match.group(2))))
    assert len(errors) == summary["data"]["num_val"] and errors == sorted(errors, reverse=True)


def test_run_without_matplotlib_trains_and_warns_once(tmp_path, cache_dir):
    blocker = tmp_path / "no_matplotlib"
    (blocker / "matplotlib").mkdir(parents=True)
    (blocker / "matplotlib" / "__init__.py").write_text("raise ImportError('matplotlib is blocked for this test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")])}
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "brain3d.train", "task=regression", *tiny_overrides(cache_dir),
                           "trainer.report=true", f"hydra.run.dir={run}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    assert read_summary(run)["epochs_completed"] == 2 and not (run / "report.html").exists()
    assert (run / "train.log").read_text().count("could not write report.html") == 1


def test_predict_writes_a_report_of_its_outputs(runs, cache_dir, tmp_path):
    manifest = synthetic_cache_dir(Path(cache_dir) / "synthetic", 12, (32, 32, 32), 0) / "manifest.csv"
    out = tmp_path / "preds"
    proc = subprocess.run([sys.executable, "-m", "brain3d.predict",
                           f"checkpoint={runs['seg'] / 'checkpoints' / 'last.pt'}",
                           f"data.manifest={manifest}", f"output_dir={out}", "report_subjects=4", "progress=false",
                           "bootstrap_samples=50"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    page = parse(out / "report.html")
    assert_pngs(out / "report.html", page)
    assert len(page.images) == 4 and page.headings == ["Predictions", "Metrics", "Subjects"]
    dice = [float(re.search(r"Dice ([\d.]+)", c).group(1)) for c in page.captions]
    per_subject = json.loads((out / "metrics.json").read_text())
    assert dice == sorted(dice) and dice[0] <= per_subject["dice"]["value"] + 1e-3  # the worst of the 12 first
    assert any("the 4 worst of 12" in t for t in page.texts) and "dice" in page.cells


@pytest.mark.parametrize("interval,expected", [(3600, [1, 3]), (0, [1, 2, 3])])
def test_report_interval_draws_the_first_validation_and_always_the_last(interval, expected, tmp_path, cache_dir,
                                                                        monkeypatch):
    """trainer.report_interval_s: report.html is drawn after the first validation, then only once the interval
    has passed, and always after the last epoch, from its history (0: after every validation)."""
    from hydra import compose, initialize_config_dir

    from brain3d.cli import config_dir
    from brain3d.train import train

    drawn, draw = [], report.write_run_report
    monkeypatch.setattr(report, "write_run_report",
                        lambda run_dir, history, *a, **k: drawn.append(history[-1]["epoch"]) or draw(run_dir, history,
                                                                                                     *a, **k))
    run = tmp_path / "run"
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "task=regression", *tiny_overrides(cache_dir), "trainer.report=true",
            f"trainer.report_interval_s={interval}", "trainer.max_epochs=3", f"output_dir={run}"])
    train(cfg)
    assert drawn == expected
    assert "final (epoch 3)" in (run / "report.html").read_text() and len(read_summary(run)["history"]) == 3
