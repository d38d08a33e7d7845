"""The commands' front door (brain3d.cli): --help texts, one-line answers with exit status 2 for a misspelt
key, an unknown option or a missing mandatory value, and trainer.progress=auto."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest

from brain3d import cli
from brain3d.errors import ConfigError
from brain3d.predict import HELP as PREDICT_HELP
from brain3d.predict import REQUIRED as PREDICT_REQUIRED
from brain3d.preprocess_cli import HELP as PREPROCESS_HELP
from brain3d.train import HELP as TRAIN_HELP

COMMANDS = {"brain3d-train": ("brain3d.train", "train", TRAIN_HELP, None),
            "brain3d-predict": ("brain3d.predict", "predict", PREDICT_HELP, PREDICT_REQUIRED),
            "brain3d-preprocess": ("brain3d.preprocess_cli", "preprocess_data", PREPROCESS_HELP, None)}


def run_command(module: str, args: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_gives_a_description_groups_and_examples(command, tmp_path):
    module = COMMANDS[command][0]
    proc = run_command(module, ["--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.startswith(f"{command}: ") and "is powered by Hydra" not in text
    examples = [line for line in text.split("Examples:", 1)[1].split("\n\n", 1)[0].splitlines()
                if f"{command} " in line]
    assert len(examples) >= 4, text
    if command == "brain3d-predict":  # only what predict reads: no training groups
        assert "checkpoint:" in text and "output_dir:" in text and "tta:" in text
        assert "optimizer" not in text and "backbone" not in text and "scheduler" not in text
    else:
        assert "task " in text and "classification" in text and "segmentation" in text


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_help_example_passes_the_command_line_check(command):
    """The examples are real commands: each composes (its paths need not exist for that)."""
    _, config_name, help_text, required = COMMANDS[command]
    for line in help_text.split("Examples:", 1)[1].split("\n\n", 1)[0].splitlines():
        words = shlex.split(line.split("  #", 1)[0])
        if command not in words:
            continue
        args = words[words.index(command) + 1:]
        assert cli.check_command_line(config_name, args, required) is None, line


def test_misspelt_key_names_the_nearest_valid_one_and_exits_2(tmp_path):
    proc = run_command("brain3d.train", ["trainer.max_epoch=3"], tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "trainer.max_epoch is not a config key; did you mean trainer.max_epochs?" in lines[0]
    assert "+trainer.max_epoch" not in proc.stderr and not (tmp_path / "outputs").exists()


def test_misspelt_key_in_a_sweep_and_under_a_chosen_group():
    assert "did you mean data.root?" in cli.check_command_line(
        "train", ["-m", "data=bids", "dat.root=x", "loss=dice,bce"])
    assert "did you mean data.patch_size?" in cli.check_command_line(
        "train", ["task=segmentation", "data.patch_sise=[32,32,32]"])
    assert cli.check_command_line("train", ["-m", "task=segmentation", "loss=dice,dice_bce", "+extra.key=1"]) is None


def test_unknown_option_lists_the_valid_ones():
    message = cli.check_command_line("train", ["task=clasification"])
    assert message == ("task=clasification is not an option of task; choose one of classification, multitask, "
                       "regression, segmentation (did you mean classification?)")


@pytest.mark.parametrize("args, missing", [
    (["data.manifest=m.csv", "checkpoint=x.pt"], ["output_dir"]),
    (["data.manifest=m.csv", "output_dir=out"], ["checkpoint"]),
])
def test_predict_without_output_dir_or_checkpoint_is_one_line(tmp_path, args, missing):
    proc = run_command("brain3d.predict", args, tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "Hydra's exception formatting" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("brain3d-predict: error: missing ")
    assert all(f"missing {key}: {key}=" in lines[0] for key in missing)


def test_progress_auto_is_bars_on_a_terminal_and_lines_in_a_file(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert cli.progress_mode("auto") == "bars"
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert cli.progress_mode("auto") == "lines"
    assert cli.progress_mode(True) == "bars" and cli.progress_mode(False) == "off"
    assert cli.progress_mode("lines") == "lines"
    with pytest.raises(ConfigError, match="progress='sometimes' is not one of auto"):
        cli.progress_mode("sometimes")
