"""``data.batch_size=auto`` (brain3d.memory_probe): the search, the probe step, and a run that uses them."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir

from brain3d import memory_probe
from brain3d.errors import ConfigError
from brain3d.memory_probe import device_memory_budget, largest_fitting_batch, peak_step_bytes
from brain3d.models.model import build_model
from brain3d.train import build_loss

from tests.conftest import CONFIG_DIR, read_summary, run_train, tiny_overrides

MB = 2**20


def linear_need(batch: int) -> int:
    """A simulated device: 100 MB of weights and workspace, 30 MB per volume."""
    return (100 + 30 * batch) * MB


def test_largest_fitting_batch_is_the_largest_under_the_budget():
    batch, trials = largest_fitting_batch(linear_need, 400 * MB, maximum=64)
    assert batch == 10  # 100 + 30 * 10 = 400 MB
    assert [b for b, _ in trials] == [1, 2, 4, 8, 16, 12, 10, 11]  # doubling, then bisection
    assert dict(trials)[10] == 400 * MB
    assert largest_fitting_batch(linear_need, 400 * MB, maximum=6)[0] == 6  # capped: the maximum fits
    assert largest_fitting_batch(linear_need, 10_000 * MB, maximum=5)[1][-1] == (5, linear_need(5))


def test_a_batch_out_of_memory_counts_as_not_fitting():
    batch, trials = largest_fitting_batch(lambda b: None if b > 3 else linear_need(b), 10_000 * MB)
    assert batch == 3
    assert (4, None) in trials


def test_even_batch_one_over_the_budget_is_a_config_error_naming_budget_and_need():
    with pytest.raises(ConfigError) as err:
        largest_fitting_batch(linear_need, 50 * MB)
    text = str(err.value)
    assert "130 MB" in text and "50 MB" in text
    assert "data.shape" in text and "data.patch_size" in text and "trainer.grad_checkpointing=true" in text
    with pytest.raises(ConfigError, match="ran out of memory"):
        largest_fitting_batch(lambda b: None, 50 * MB)


def test_a_trial_predicted_beyond_the_safe_limit_is_not_run():
    tried = []

    def need(batch: int) -> int:
        tried.append(batch)
        return linear_need(batch)

    batch, trials = largest_fitting_batch(need, 900 * MB, maximum=64, safe_limit_bytes=1_000 * MB)
    assert batch == 26  # 100 + 30 * 26 = 880 MB
    assert (32, None) in trials and 32 not in tried  # 1060 MB predicted from batches 8 and 16: not run
    assert all(linear_need(b) <= 1_000 * MB for b in tried)


def test_device_memory_budget_is_a_share_of_the_available_ram_on_cpu():
    budget, reason = device_memory_budget("cpu", 0.5)
    full, _ = device_memory_budget("cpu", 1.0, reserved_bytes=0)
    assert 0 < budget <= full
    assert "available RAM" in reason and "0.5" in reason
    reserved, reason = device_memory_budget("cpu", 1.0, reserved_bytes=full // 2)
    assert reserved <= full - full // 2 + 64 * MB and "resident data" in reason
    with pytest.raises(ValueError, match="batch_size_max_fraction"):
        device_memory_budget("cpu", 1.5)


def tiny_model(task: str, width: float = 0.125) -> tuple[torch.nn.Module, torch.nn.Module]:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"task={task}", f"backbone.width={width}"])
    torch.manual_seed(0)
    return build_model(cfg.backbone, cfg.task.head, head_name=task), build_loss(cfg)


@pytest.mark.parametrize("in_process", [True, False], ids=["clear_refs", "forked_child"])
def test_peak_step_bytes_grows_with_the_batch_on_cpu(in_process, monkeypatch):
    if not in_process:  # the fallback where /proc/self/clear_refs cannot be written
        monkeypatch.setattr(memory_probe, "_can_reset_peak_rss", lambda: False)
    model, loss_fn = tiny_model("segmentation")
    shape = (1, 64, 64, 64)  # ~50 MB per volume in fp32: well above the allocator's noise of a few MB
    peak_step_bytes(model, loss_fn, "segmentation", shape, 1, "cpu")  # warm-up: the first step's one-time allocations
    needs = [peak_step_bytes(model, loss_fn, "segmentation", shape, b, "cpu") for b in (1, 2, 4)]
    assert all(isinstance(n, int) and n > 0 for n in needs)
    if in_process:
        assert needs[0] < needs[1] < needs[2], [n / MB for n in needs]
    else:  # one thread (the forked child's): batch 1 may run a convolution kernel with a workspace of its own
        assert max(needs[0], needs[1]) < needs[2], [n / MB for n in needs]


@pytest.mark.parametrize("task", ["classification", "regression", "segmentation"])
def test_probe_leaves_the_model_and_the_random_state_unchanged(task):
    model, loss_fn = tiny_model(task)
    model.eval()
    weights = {k: v.clone() for k, v in model.state_dict().items()}  # BatchNorm running statistics included
    rng = torch.get_rng_state()
    need = peak_step_bytes(model, loss_fn, task, (1, 32, 32, 32), 2, "cpu", amp_dtype=torch.bfloat16,
                           channels_last=True)
    assert need is not None and need >= 0
    assert not model.training  # still in eval mode
    assert all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert torch.equal(torch.get_rng_state(), rng)  # the run's random stream goes on as without a probe


def test_peak_step_bytes_refuses_a_bad_shape_or_batch():
    model, loss_fn = tiny_model("regression")
    with pytest.raises(ValueError, match=r"\(C, D, H, W\)"):
        peak_step_bytes(model, loss_fn, "regression", (32, 32, 32), 1, "cpu")
    with pytest.raises(ValueError, match="batch_size"):
        peak_step_bytes(model, loss_fn, "regression", (1, 32, 32, 32), 0, "cpu")


# fp32, (N, C, D, H, W) layout, 64^3: the same kernels on any CPU, and per-volume memory far above the noise
AUTO = ["task=segmentation", "data.batch_size=auto", "data.batch_size_max=4", "data.shape=[64,64,64]",
        "trainer.precision=fp32", "trainer.channels_last=false", "trainer.max_epochs=1"]


@pytest.mark.slow  # probes several batch sizes, then trains and resumes (~18 s)
def test_auto_batch_size_fits_a_simulated_budget_and_a_resume_keeps_it(tmp_path, cache_dir):
    # the real budget (the available RAM): the largest batch up to data.batch_size_max
    first = tmp_path / "auto"
    run_train([*tiny_overrides(cache_dir), *AUTO, f"hydra.run.dir={first}"], cwd=tmp_path)
    chosen = read_summary(first)["batch_size"]
    assert chosen["mode"] == "auto" and 1 <= chosen["value"] <= 4
    assert chosen["budget_mb"] > 0 and chosen["peak_memory_mb"] <= chosen["budget_mb"]
    trials = dict(chosen["trials"])
    assert trials[1] is not None and trials[4] is not None

    # a simulated device between what batches 2 and 4 needed: a smaller batch, within that budget
    budget_mb = (trials[2] + trials[4]) / 2
    small = tmp_path / "small"
    proc = run_train([*tiny_overrides(cache_dir), *AUTO, f"+data.batch_size_budget_mb={budget_mb}",
                      f"hydra.run.dir={small}"], cwd=tmp_path)
    limited = read_summary(small)["batch_size"]
    assert limited["mode"] == "auto" and 1 <= limited["value"] < 4, limited
    assert limited["budget_mb"] == pytest.approx(budget_mb, abs=0.1)
    assert limited["peak_memory_mb"] <= budget_mb
    assert all(peak is None or peak > budget_mb for batch, peak in limited["trials"] if batch > limited["value"])
    assert f"data.batch_size=auto: {limited['value']} (peak" in proc.stdout + proc.stderr

    # resuming the first run (the config still says auto) keeps its batch, whatever the memory now
    resumed = run_train([*tiny_overrides(cache_dir), *AUTO, "trainer.max_epochs=2", "trainer.resume=auto",
                         f"+data.batch_size_budget_mb={budget_mb}", f"hydra.run.dir={first}"], cwd=tmp_path)
    summary = read_summary(first)
    assert summary["epochs_completed"] == 2
    assert summary["batch_size"]["value"] == chosen["value"]
    assert "as found when the run began" in resumed.stdout + resumed.stderr


@pytest.mark.slow  # 8-17 s on 2 fp32 CPU cores: the default suite stays under 10 minutes
def test_fixed_batch_size_is_recorded_as_fixed(tmp_path, cache_dir):
    run_dir = tmp_path / "fixed"
    run_train([*tiny_overrides(cache_dir), "trainer.max_epochs=1", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert read_summary(run_dir)["batch_size"] == {"value": 2, "mode": "fixed", "peak_memory_mb": None,
                                                   "budget_mb": None, "budget_reason": None, "trials": []}
