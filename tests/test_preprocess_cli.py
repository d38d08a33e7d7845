"""brain3d-preprocess's config: the training config plus a declared ``preprocess_workers`` (no ``+num_workers=``)."""

from __future__ import annotations

import logging

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from brain3d.hardware import usable_cpus
from brain3d.preprocess_cli import fill_cache, resolve_workers
from brain3d.train import ConfigError

from tests.conftest import CONFIG_DIR, tiny_overrides


def compose_preprocess(overrides: list[str], config_name: str = "preprocess_data"):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name, overrides=overrides)


def test_config_is_the_training_config_plus_a_declared_worker_count():
    cfg = compose_preprocess(["task=segmentation", "preprocess=spacing"])
    assert cfg.preprocess_workers == "auto"
    own = OmegaConf.to_container(cfg)
    own.pop("preprocess_workers")
    assert own == OmegaConf.to_container(compose_preprocess(["task=segmentation", "preprocess=spacing"], "train"))
    assert compose_preprocess(["preprocess_workers=3"]).preprocess_workers == 3  # no "+": the key is declared
    preset = compose_preprocess(["experiment=lesion_patches"])  # presets reach it too: same cache entries as the run
    assert (preset.task.name, preset.preprocess.mode, preset.preprocess_workers) == ("segmentation", "spacing", "auto")


@pytest.mark.parametrize("value,jobs,expected", [("auto", 1000, None), (None, 1000, None), (1, 5, 1), (8, 3, 3)])
def test_worker_count_auto_int_and_capped_by_the_subjects(value, jobs, expected):
    cfg = OmegaConf.create({"preprocess_workers": value})
    assert resolve_workers(cfg, jobs) == (expected if expected is not None else min(usable_cpus(), jobs))


@pytest.mark.parametrize("value", [0, -2, "many", True, 1.5])
def test_bad_worker_count_is_a_config_error(value):
    with pytest.raises(ConfigError, match=rf"preprocess_workers={value!r}: expected auto .* or an integer >= 1"):
        resolve_workers(OmegaConf.create({"preprocess_workers": value}), 4)


def test_undeclared_num_workers_still_wins_with_a_warning(caplog):
    cfg = OmegaConf.create({"preprocess_workers": "auto", "num_workers": 2})
    with caplog.at_level(logging.WARNING, logger="brain3d.preprocess"):
        assert resolve_workers(cfg, 10) == 2
    assert "use preprocess_workers=2" in caplog.text
    assert resolve_workers(OmegaConf.create({"num_workers": 1}), 10) == 1  # a config composed from train.yaml


def test_fill_cache_with_one_worker(tmp_path, caplog):
    cfg = compose_preprocess([*tiny_overrides(tmp_path / "cache"), "data.num_subjects=3", "data.shape=[16,16,16]",
                              "preprocess_workers=1"])
    with caplog.at_level(logging.INFO, logger="brain3d.preprocess"):
        stats = fill_cache(cfg)
    assert (stats["subjects"], stats["hits"], stats["misses"]) == (3, 0, 3)
    assert "(1 worker processes)" in caplog.text
    assert len(list((tmp_path / "cache" / "preprocessed").rglob("*.image.npy"))) == 3
    assert fill_cache(cfg)["hits"] == 3
