"""brain3d-export: TorchScript (and ONNX) that compute brain3d's forward and run without brain3d, the JSON that
says what a caller does before and after, weights-only files that brain3d-predict and trainer.init_from read,
and one-line errors."""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from brain3d import cli, export, transfer
from brain3d.checkpoint import load_checkpoint, save_checkpoint
from brain3d.data.preprocess import validate_settings
from brain3d.data.synthetic import synthetic_cache_dir
from brain3d.models.model import build_model
from brain3d.predict import predict
from brain3d.tasks import build_task_set, head_configs, task_set_from_checkpoint

from tests.conftest import CONFIG_DIR

TASKS = ("classification", "regression", "segmentation")


def run_export(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """``brain3d-export`` as a user runs it (``python -m`` so the test uses this interpreter)."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "brain3d.export", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"brain3d-export {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def brain3d_model(checkpoint: Path) -> tuple[torch.nn.Module, dict]:
    """brain3d's own model of a checkpoint (as brain3d-predict rebuilds it), in eval mode."""
    state = load_checkpoint(checkpoint)
    model = build_model(state["config"]["backbone"], head_configs(state["config"]["task"]))
    model.load_state_dict(state["model"])
    return model.eval(), state


def export_config(**values) -> OmegaConf:
    """configs/export.yaml with ``values`` set (the Hydra part left out), for calling export.export directly."""
    cfg = OmegaConf.load(CONFIG_DIR / "export.yaml")
    for key in ("defaults", "hydra"):
        cfg.pop(key)
    return OmegaConf.merge(cfg, {k: str(v) if isinstance(v, Path) else v for k, v in values.items()})


@pytest.fixture(scope="module")
def trained(tiny_runs, cache_dir) -> dict[str, Path]:
    """best.pt of one tiny run per task (conftest's tiny_runs), and the synthetic manifest they were trained on."""
    runs = {task: tiny_runs[task] / "checkpoints" / "best.pt" for task in TASKS}
    runs["manifest"] = synthetic_cache_dir(Path(cache_dir) / "synthetic", 12, (32, 32, 32), 0) / "manifest.csv"
    return runs


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> dict[str, Path]:
    """Each task's best.pt exported to TorchScript: segmentation by the brain3d-export command, the others by
    the function it runs (export.export; a subprocess each would add ~4 s of imports for the same code)."""
    root = tmp_path_factory.mktemp("exported")
    paths = {task: root / f"{task}.pt" for task in TASKS}
    proc = run_export([f"checkpoint={trained['segmentation']}", "format=torchscript",
                       f"output={paths['segmentation']}"], cwd=root)
    assert "matches brain3d's forward" in proc.stdout + proc.stderr
    assert sorted(p.name for p in root.iterdir()) == ["segmentation.json", "segmentation.pt"]  # no log, no .hydra/
    for task in ("classification", "regression"):
        export.export(export_config(checkpoint=trained[task], output=paths[task]))
    return paths


def predict_in_process(checkpoint: Path, manifest: Path, output_dir: Path) -> list[dict]:
    """brain3d-predict's predict() on a composed predict.yaml (the command without its ~4 s of start-up)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("predict", overrides=[f"checkpoint={checkpoint}", f"data.manifest={manifest}",
                                            f"output_dir={output_dir}", "device=cpu", "progress=false",
                                            "report_subjects=0"])
    predict(cfg)
    return list(csv.DictReader(open(output_dir / "predictions.csv")))


@pytest.mark.parametrize("task", TASKS)
def test_torchscript_matches_brain3d_forward_on_random_input(task, trained, exported):
    model, _ = brain3d_model(trained[task])
    traced = torch.jit.load(str(exported[task])).eval()
    generator = torch.Generator().manual_seed(7)
    shapes = [(1, 1, 32, 32, 32), (3, 1, 32, 32, 32)]
    if task == "segmentation":  # any size divisible by 16, not only the traced one
        shapes.append((1, 1, 48, 32, 64))
    for shape in shapes:
        x = torch.randn(shape, generator=generator)
        with torch.no_grad():
            expected, actual = model(x)[task], traced(x)
        assert isinstance(actual, torch.Tensor) and actual.shape == expected.shape
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("task", TASKS)
def test_json_holds_the_checkpoints_preprocessing_heads_and_scaling(task, trained, exported):
    info = json.loads(exported[task].with_suffix(".json").read_text())
    state = load_checkpoint(trained[task])
    config = state["config"]
    assert info["format"] == "torchscript" and info["file"] == f"{task}.pt" and info["task"] == task
    assert info["input"]["shape"] == [1, 1, 32, 32, 32] and info["input"]["dtype"] == "float32"
    assert info["input"]["channels"] == [config["data"]["image_col"]] == ["image"]
    preprocessing = info["preprocessing"]
    assert {k: preprocessing[k] for k in validate_settings(config["preprocess"])} == validate_settings(
        config["preprocess"])
    for key in ("mode", "shape", "normalization", "percentiles", "spacing", "crop_foreground"):
        assert preprocessing[key] == config["preprocess"][key], key
    assert preprocessing["orientation"] == "RAS" and preprocessing["steps"]
    assert info["output_order"] == [task]
    (head,) = info["outputs"]
    assert head["name"] == task and head["kind"] == task and "apply" in head
    if task == "classification":
        assert head["class_names"] == state["class_names"] and head["positive_class"] == state["class_names"][1]
        assert head["threshold"] == 0.5 and "sigmoid" in head["apply"]
    if task == "regression":
        assert head["target_mean"] == state["target_mean"] and head["target_std"] == state["target_std"]
        assert state["target_std"] != 1.0 and head["column"] == "age"
        assert head["bias_correction"] == state["bias_correction"]
    if task == "segmentation":
        assert "divisible by 16" in info["input"]["spatial"] and info["sliding_window"] is None
    # the same text travels inside the TorchScript file
    extra = {"brain3d.json": ""}
    torch.jit.load(str(exported[task]), _extra_files=extra)
    assert json.loads(extra["brain3d.json"]) == info


def test_json_of_a_patch_trained_model_says_to_run_sliding_windows(trained, tmp_path):
    state = load_checkpoint(trained["segmentation"])
    state["config"]["data"]["patch_size"] = [16, 32, 16]
    state["config"]["trainer"]["sw_overlap"] = 0.25
    info = export.sidecar(state, "torchscript", tmp_path / "m.pt", "ckpt.pt", export.input_shape(state["config"]),
                          0.5, "cpu")
    assert info["input"]["shape"] == [1, 1, 16, 32, 16]  # traced on a patch
    assert info["sliding_window"]["patch_size"] == [16, 32, 16] and info["sliding_window"]["overlap"] == 0.25
    assert "sliding windows" in info["input"]["spatial"]


def test_json_says_which_flips_validation_averaged(trained, tmp_path):
    state = load_checkpoint(trained["regression"])
    shape = export.input_shape(state["config"])
    assert export.sidecar(state, "torchscript", tmp_path / "m.pt", "c.pt", shape, 0.5, "cpu")["flip_averaging"] is None
    state["config"]["trainer"]["val_flip_axes"] = [0]
    flips = export.sidecar(state, "torchscript", tmp_path / "m.pt", "c.pt", shape, 0.5, "cpu")["flip_averaging"]
    assert flips["axes"] == [0] and "left-right" in flips["how"]


def test_regression_json_turns_the_output_into_target_units(trained, exported):
    """The JSON's recipe (output * target_std + target_mean) gives what brain3d's RegressionTask.decode gives."""
    info = json.loads(exported["regression"].with_suffix(".json").read_text())
    head = info["outputs"][0]
    traced = torch.jit.load(str(exported["regression"])).eval()
    model, state = brain3d_model(trained["regression"])
    x = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(3))
    decode = task_set_from_checkpoint(state)["regression"].decode
    with torch.no_grad():
        torch.testing.assert_close(traced(x) * head["target_std"] + head["target_mean"],
                                   decode(model(x)["regression"]), atol=1e-3, rtol=0)


def test_torchscript_runs_in_a_python_without_brain3d(trained, exported, tmp_path):
    model, _ = brain3d_model(trained["segmentation"])
    x = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(5))
    torch.save(x, tmp_path / "x.pt")
    script = ("import sys; sys.modules['brain3d'] = None\n"  # any import of brain3d now fails
              "import torch\n"
              f"m = torch.jit.load({str(exported['segmentation'])!r}).eval()\n"
              f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
              "with torch.no_grad(): y = m(x)\n"
              f"torch.save(y, {str(tmp_path / 'y.pt')!r})\n"
              "assert sys.modules['brain3d'] is None and not [k for k in sys.modules if k.startswith('brain3d.')]\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), model(x)["segmentation"], atol=1e-4, rtol=0)


def test_weights_file_is_small_and_predicts_as_the_checkpoint(trained, tmp_path):
    checkpoint = trained["classification"]
    weights = tmp_path / "weights.pt"
    result = export.export(export_config(checkpoint=checkpoint, format="weights", output=weights))
    assert result["json"] is None and not weights.with_suffix(".json").exists()
    last = checkpoint.parent / "last.pt"
    assert weights.stat().st_size < 0.5 * last.stat().st_size
    state, full = load_checkpoint(weights), load_checkpoint(checkpoint)
    assert not {"optimizer", "scheduler", "scaler", "rng", "train_weights", "ema"} & set(state)
    assert state["weights_only"] is True and state["config"] == full["config"]
    assert all(torch.equal(state["model"][k], v) for k, v in full["model"].items())
    for key in ("task", "class_names", "target_mean", "target_std", "tasks", "train_subject_ids"):
        assert state[key] == full[key], key
    predictions = {name: predict_in_process(path, trained["manifest"], tmp_path / name)
                   for name, path in (("full", checkpoint), ("weights", weights))}
    assert predictions["weights"] == predictions["full"] and len(predictions["full"]) == 12
    assert {"probability", "predicted_class"} <= set(predictions["weights"][0])
    # trainer.init_from reads it as it reads a checkpoint
    loaded = transfer.load_init_checkpoint(weights, full["config"]["backbone"])
    assert loaded["config"] == full["config"]
    # ...but it cannot be resumed (no optimizer state): one line that names init_from instead
    from brain3d.errors import ConfigError
    from brain3d.train import load_resume_state
    with pytest.raises(ConfigError, match=r"holds weights only .* trainer.init_from="):
        load_resume_state(weights, full["config"], torch.device("cpu"))


def test_weights_file_can_leave_out_the_training_subjects(trained, tmp_path):
    export.export(export_config(checkpoint=trained["regression"], format="weights", output=tmp_path / "w.pt",
                                keep_subject_ids=False))
    state = load_checkpoint(tmp_path / "w.pt")
    assert state["train_subject_ids"] is None and state["target_mean"] == load_checkpoint(
        trained["regression"])["target_mean"]


def test_multitask_export_returns_the_heads_in_the_order_the_json_names(tmp_path):
    """A multi-task checkpoint (built, not trained): a tuple of logits in task.heads order."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["task=multitask", "debug=fast"])
    config = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("backbone", "task", "data", "preprocess")}
    torch.manual_seed(0)
    model = build_model(config["backbone"], head_configs(config["task"])).eval()
    tasks = build_task_set(cfg.task)
    tasks["age"].target_mean, tasks["age"].target_std = 50.0, 12.0
    save_checkpoint({"model": model.state_dict(), "config": config, "task": "multitask", "tasks": tasks.state()},
                    tmp_path / "mt.pt")
    result = export.export(export_config(checkpoint=tmp_path / "mt.pt", output=tmp_path / "mt.pt.ts"))
    info = json.loads(Path(result["json"]).read_text())
    assert info["output_order"] == ["sex", "age", "lesion"] == [o["name"] for o in info["outputs"]]
    assert info["outputs"][1]["target_mean"] == 50.0 and info["outputs"][1]["target_std"] == 12.0
    traced = torch.jit.load(result["output"])
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        outputs, expected = traced(x), model(x)
    assert isinstance(outputs, tuple) and len(outputs) == 3
    for name, output in zip(info["output_order"], outputs):
        torch.testing.assert_close(output, expected[name], atol=1e-4, rtol=0)


def test_an_export_that_differs_from_brain3d_is_refused_and_not_written(trained, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "TOLERANCE", -1.0)  # no difference passes
    with pytest.raises(export.ExportError, match="differs from brain3d's forward"):
        export.export(export_config(checkpoint=trained["classification"], output=tmp_path / "m.pt"))
    assert list(tmp_path.iterdir()) == []


def check_onnx(task: str, checkpoint: Path, folder: Path, shapes) -> None:
    """Export ``checkpoint`` to ONNX and compare onnxruntime's outputs with brain3d's forward at ``shapes``."""
    for package in ("onnx", "onnxscript"):
        pytest.importorskip(package)
    ort = pytest.importorskip("onnxruntime")
    output = folder / f"{task}.onnx"
    result = export.export(export_config(checkpoint=checkpoint, format="onnx", output=output))
    assert result["max_difference"] is not None and result["max_difference"] <= 1e-4  # checked before writing
    info = json.loads(output.with_suffix(".json").read_text())
    assert info["format"] == "onnx" and info["output_order"] == [task]
    model, _ = brain3d_model(checkpoint)
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"] and [o.name for o in session.get_outputs()] == [task]
    for shape in shapes:
        x = torch.randn(shape)
        (actual,) = session.run(None, {"image": x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(actual), model(x)[task], atol=1e-4, rtol=0)


def test_onnx_matches_brain3d_forward(trained, tmp_path):
    check_onnx("classification", trained["classification"], tmp_path, [(1, 1, 32, 32, 32), (3, 1, 32, 32, 32)])


@pytest.mark.slow  # ~10 s: torch.export reasons about three symbolic spatial sizes
def test_onnx_segmentation_takes_any_size_divisible_by_16(trained, tmp_path):
    check_onnx("segmentation", trained["segmentation"], tmp_path, [(1, 1, 32, 32, 32), (2, 1, 48, 32, 64)])


def test_bad_command_lines_are_one_line_with_exit_2(trained, tmp_path):
    proc = run_export(["checkpoint=missing.pt", f"output={tmp_path / 'm.pt'}"], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "brain3d-export: error: checkpoint=missing.pt: no such file (a best.pt or last.pt written by brain3d-train)"]
    assert list(tmp_path.iterdir()) == []  # nothing written, no Hydra folder either
    # the same check answers every other mistake (test_the_command_line_check_names_the_key), e.g. the format
    args = [f"checkpoint={trained['classification']}", "format=tflite", f"output={tmp_path / 'm.pt'}"]
    assert cli.check_command_line("export", args, export.REQUIRED, export.config_problem) == (
        "format=tflite is not one of torchscript, onnx, weights")


def test_the_command_line_check_names_the_key(trained, tmp_path, monkeypatch):
    def problem(*args):
        return cli.check_command_line("export", list(args), export.REQUIRED, export.config_problem)

    ckpt = f"checkpoint={trained['classification']}"
    assert problem(ckpt).startswith("missing output: output=FILE")
    assert problem(ckpt, "output=no/such/folder/m.pt") == (
        "output=no/such/folder/m.pt: the folder no/such/folder does not exist")
    assert problem(ckpt, f"output={tmp_path}").startswith(f"output={tmp_path} is a folder")
    assert problem(ckpt, f"output={tmp_path / 'm.json'}").startswith(f"output={tmp_path / 'm.json'}: the .json name")
    assert problem(ckpt, f"output={tmp_path / 'm.pt'}", "device=tpu") == "device=tpu is not one of cpu, cuda"
    assert problem(ckpt, f"output={tmp_path / 'm.pt'}", "formt=onnx").startswith(
        "formt is not a config key; did you mean format?")
    assert problem(ckpt, f"output={tmp_path / 'm.pt'}") is None
    real_find_spec = export.importlib.util.find_spec
    monkeypatch.setattr(export.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("onnx", "onnxscript") else real_find_spec(name, *a))
    assert problem(ckpt, "format=onnx", f"output={tmp_path / 'm.onnx'}") == (
        "format=onnx needs onnx and onnxscript (not installed): pip install brain3d[export]")


def test_help_describes_the_command_and_its_examples_compose():
    assert export.HELP.startswith("brain3d-export: ") and "checkpoint:" in export.HELP and "format:" in export.HELP
    examples = [line for line in export.HELP.split("Examples:", 1)[1].split("\n\n", 1)[0].splitlines()
                if "brain3d-export " in line]
    assert len(examples) >= 4
    for line in examples:
        words = shlex.split(line)
        assert cli.check_command_line("export", words[1:], export.REQUIRED) is None, line


def test_json_of_a_multi_class_head_says_softmax_and_argmax_over_k_plus_1_channels():
    """task.num_classes=3: the sidecar names K+1 channels, softmax and argmax, not the binary sigmoid/threshold."""
    from brain3d.tasks import MultiClassSegmentationTask, SegmentationTask

    multi = MultiClassSegmentationTask("tissue", "mask", num_classes=3, label_names=["csf", "gm", "wm"])
    entry = export.head_entry(multi, threshold=0.5)
    assert entry["shape"] == "(B, 4, D, H, W)" and entry["num_classes"] == 3
    assert entry["label_names"] == ["csf", "gm", "wm"] and "threshold" not in entry
    assert "softmax" in entry["apply"] and "argmax" in entry["apply"] and "sigmoid" not in entry["apply"]
    binary = export.head_entry(SegmentationTask("lesion", "mask"), threshold=0.4)
    assert binary["shape"] == "(B, 1, D, H, W)" and binary["threshold"] == 0.4 and "sigmoid" in binary["apply"]
