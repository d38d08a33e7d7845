"""Memory-resident data (data.resident): the same batches as the DataLoader worker path, clear refusals when
the data do not fit, and a deferred finiteness check that still names the step and the subjects."""

from __future__ import annotations

import logging

import pytest
import torch
from omegaconf import OmegaConf

from brain3d import engine
from brain3d.data import resident as R
from brain3d.data.dataset import VolumeDataset
from brain3d.data.loaders import build_loaders
from brain3d.data.manifest import load_manifest
from brain3d.data.sampling import iter_from
from brain3d.data.synthetic import make_synthetic_dataset
from brain3d.errors import ConfigError
from brain3d.losses import MSELoss
from brain3d.tasks import single_task

from tests.conftest import read_summary, run_train, tiny_overrides
from tests.test_engine import TinyRegressor, batches, data

SHAPE = {"mode": "resize", "shape": [32, 32, 32]}


@pytest.fixture(scope="module")
def subjects(tmp_path_factory):
    root = tmp_path_factory.mktemp("resident")
    manifest = make_synthetic_dataset(root / "data", num_subjects=10, shape=(32, 32, 32), seed=3)
    return load_manifest(manifest, "segmentation").subjects, root / "cache"


def data_cfg(resident: str, num_workers: int = 2, batch_size: int = 3):
    return OmegaConf.create({"resident": resident, "resident_max_fraction": 0.5, "num_workers": num_workers,
                             "batch_size": batch_size})


def epoch_batches(loader, epoch: int, seed: int = 0):
    """One epoch as brain3d.train starts it: the sampler told the epoch and its shuffle seed."""
    loader.batch_sampler.set_epoch(epoch, shuffle_seed=seed * 100_003 + epoch)
    return list(loader)


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x["subject_id"] == list(y["subject_id"])
        for key in ("image", "target"):
            assert x[key].dtype == y[key].dtype == torch.float32
            assert x[key].shape == y[key].shape
            assert torch.equal(x[key], y[key]), key


@pytest.mark.parametrize("patch_size", [None, (16, 16, 16)], ids=["whole_volumes", "patches"])
def test_resident_batches_equal_the_worker_path_over_epochs(subjects, patch_size):
    subject_list, cache_dir = subjects
    device = torch.device("cpu")
    made = {}
    for mode in ("off", "host"):
        train_set = VolumeDataset(subject_list[:8], "segmentation", SHAPE, cache_dir, patch_size, 0.5, seed=5)
        val_set = VolumeDataset(subject_list[8:], "segmentation", SHAPE, cache_dir)
        train_loader, val_loader, residence = build_loaders(train_set, val_set, data_cfg(mode), device, seed=0,
                                                            val_batch_size=2, progress=False)
        assert residence.mode == mode
        epochs = [epoch_batches(train_loader, epoch) for epoch in (0, 1, 2)]
        made[mode] = (epochs, list(val_loader), train_loader)
    workers, resident = made["off"], made["host"]
    assert workers[2].num_workers == 2 and workers[2].persistent_workers  # workers outlive the epoch
    for epoch in range(3):
        assert_same_batches(resident[0][epoch], workers[0][epoch])
    assert_same_batches(resident[1], workers[1])  # validation: sequential batches of 2
    # the epochs differ (shuffle and, for patches, the crops), so the epoch did reach the workers
    assert [b["subject_id"] for b in workers[0][0]] != [b["subject_id"] for b in workers[0][1]]
    if patch_size:
        assert resident[0][0][0]["image"].shape == (3, 1, 16, 16, 16)


def test_resident_loader_starts_mid_epoch_without_gathering_the_skipped_batches(subjects):
    subject_list, cache_dir = subjects
    train_set = VolumeDataset(subject_list[:8], "segmentation", SHAPE, cache_dir)
    val_set = VolumeDataset(subject_list[8:], "segmentation", SHAPE, cache_dir)
    loader, _, _ = build_loaders(train_set, val_set, data_cfg("auto", batch_size=2), torch.device("cpu"), seed=0,
                                 val_batch_size=2, progress=False)
    loader.batch_sampler.set_epoch(1, shuffle_seed=7)
    full = [b["subject_id"] for b in loader]
    loader.batch_sampler.set_epoch(1, shuffle_seed=7)
    gathered = []
    original = loader.store.batch
    loader.store.batch = lambda indices: gathered.append(list(indices)) or original(indices)
    assert [b["subject_id"] for b in iter_from(loader, 2)] == full[2:]
    assert len(gathered) == len(full) - 2 and len(loader) == 4


def test_padding_crop_matches_extract_patch():
    from brain3d.data.patches import extract_patch

    volume = torch.arange(1 * 5 * 6 * 7, dtype=torch.float32).reshape(1, 5, 6, 7)
    for start in [(0, 0, 0), (2, 3, 1), (4, 5, 6)]:
        expected = extract_patch(volume.numpy(), start, (4, 4, 4))
        assert torch.equal(R.crop(volume, start, (4, 4, 4)), torch.from_numpy(expected))


def test_explicit_residence_that_does_not_fit_is_refused_with_sizes(subjects, monkeypatch):
    subject_list, cache_dir = subjects
    train_set = VolumeDataset(subject_list[:8], "segmentation", SHAPE, cache_dir)
    val_set = VolumeDataset(subject_list[8:], "segmentation", SHAPE, cache_dir)
    monkeypatch.setattr(R, "available_bytes", lambda where: 100_000)  # 0.1 MB free; the data need 1.6 MB
    with pytest.raises(ConfigError, match=r"data.resident=device: the training and validation volumes need "
                                          r"1.6 MB, more than data.resident_max_fraction=0.5 of the 0.1 MB"):
        build_loaders(train_set, val_set, data_cfg("device"), torch.device("cpu"), seed=0, val_batch_size=2,
                      progress=False)
    with pytest.raises(ConfigError, match=r"data.resident='gpu' is not one of auto, device, host, off"):
        build_loaders(train_set, val_set, data_cfg("gpu"), torch.device("cpu"), 0, 2, progress=False)


def test_auto_falls_back_to_workers_when_the_data_do_not_fit(subjects, monkeypatch, caplog):
    subject_list, cache_dir = subjects
    train_set = VolumeDataset(subject_list[:8], "segmentation", SHAPE, cache_dir)
    val_set = VolumeDataset(subject_list[8:], "segmentation", SHAPE, cache_dir)
    monkeypatch.setattr(R, "available_bytes", lambda where: 100_000)
    with caplog.at_level(logging.INFO, logger="brain3d.data"):
        loader, _, residence = build_loaders(train_set, val_set, data_cfg("auto", num_workers=0), torch.device("cpu"),
                                             seed=0, val_batch_size=2, progress=False)
    assert residence.mode == "off" and isinstance(loader, torch.utils.data.DataLoader)
    assert "DataLoader with 0 persistent worker process(es)" in caplog.text and "exceed 0.5" in caplog.text


def test_budget_exceeded_while_loading_unknown_shapes_raises(subjects):
    subject_list, cache_dir = subjects
    spacing = {"mode": "spacing", "spacing": None, "shape": None}  # shapes known only once preprocessed
    dataset = VolumeDataset(subject_list[:4], "segmentation", spacing, cache_dir, patch_size=(16, 16, 16))
    assert R.estimated_bytes([dataset]) is None
    expected = r"4 volumes need about [0-9.]+ (MB|GiB) in memory, more than the [0-9.]+ MB allowed"
    with pytest.raises(R.ResidentMemoryError, match=expected):
        R.ResidentVolumes(dataset, torch.device("cpu"), budget=10_000, progress=False)


def test_deferred_finiteness_check_names_the_first_bad_step_and_its_subjects():
    images, targets = data(8)
    images[4, 0, 0, 0, 0] = float("nan")  # batch 3 of 4 (batches of 2)
    model = TinyRegressor()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    with pytest.raises(engine.NonFiniteLossError,
                       match=r"epoch 1, step 3/4; subjects in the batch: \['sub-4', 'sub-5'\]"):
        engine.train_one_epoch(model, batches(images, targets, 2), MSELoss(), optimizer, scheduler, scaler,
                               single_task("regression"), torch.device("cpu"), None, epoch=1, progress=False,
                               sync_every=10)  # read back only at the epoch's end


def test_settled_loss_sum_equals_the_per_step_sum():
    images, targets = data(8)
    results = []
    for sync_every in (1, 3):
        torch.manual_seed(0)
        model = TinyRegressor()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        stats = engine.train_one_epoch(model, batches(images, targets, 2), MSELoss(), optimizer, scheduler,
                                       torch.amp.GradScaler("cpu", enabled=False), single_task("regression"),
                                       torch.device("cpu"), None, epoch=1, progress=False, sync_every=sync_every)
        results.append(stats["loss"])
    assert results[0] == results[1] > 0


@pytest.mark.slow  # 8-17 s on 2 fp32 CPU cores: the default suite stays under 10 minutes
def test_worker_path_and_resident_path_train_the_same_run(tmp_path, cache_dir):
    common = ["task=segmentation", *tiny_overrides(cache_dir), "trainer.max_epochs=2"]
    run_train([*common, "data.resident=off", "data.num_workers=2", f"hydra.run.dir={tmp_path / 'workers'}"],
              cwd=tmp_path)
    proc = run_train([*common, "data.resident=auto", f"hydra.run.dir={tmp_path / 'resident'}"], cwd=tmp_path)
    log_text = (tmp_path / "resident" / "train.log").read_text()
    assert "held in host RAM, batches gathered by index" in log_text, proc.stdout
    assert "persistent worker process(es)" in (tmp_path / "workers" / "train.log").read_text()
    drop = {"train_volumes_per_second", "train_data_wait_fraction"}  # timings differ between runs
    a = [{k: v for k, v in h.items() if k not in drop} for h in read_summary(tmp_path / "workers")["history"]]
    b = [{k: v for k, v in h.items() if k not in drop} for h in read_summary(tmp_path / "resident")["history"]]
    assert a == b


def test_prefetcher_yields_every_batch_in_order_and_reraises_errors():
    source = [{"image": torch.full((1, 2), float(i)), "subject_id": [f"sub-{i}"]} for i in range(7)]
    out = list(R.Prefetcher(iter(source), torch.device("cpu"), depth=2))
    assert [b["subject_id"] for b in out] == [b["subject_id"] for b in source]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(out, source))

    def failing():
        yield source[0]
        raise OSError("truncated file sub-1")
    batches = iter(R.Prefetcher(failing(), torch.device("cpu")))
    assert next(batches)["subject_id"] == ["sub-0"]
    with pytest.raises(OSError, match="truncated file sub-1"):
        next(batches)


def test_prefetcher_thread_stops_when_the_consumer_leaves_early():
    import threading
    endless = ({"image": torch.zeros(1), "i": i} for i in range(10**9))
    batches = iter(R.Prefetcher(endless, torch.device("cpu"), depth=1))
    assert next(batches)["i"] == 0
    batches.close()  # e.g. a stop signal ended the epoch
    assert not any(t.name == "brain3d-prefetch" and t.is_alive() for t in threading.enumerate())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_host_resident_batches_reach_the_gpu_equal(subjects):
    subject_list, cache_dir = subjects
    train_set = VolumeDataset(subject_list[:8], "segmentation", SHAPE, cache_dir)
    val_set = VolumeDataset(subject_list[8:], "segmentation", SHAPE, cache_dir)
    cpu_loader, _, _ = build_loaders(train_set, val_set, data_cfg("host"), torch.device("cpu"), 0, 2, progress=False)
    gpu_loader, _, residence = build_loaders(train_set, val_set, data_cfg("host"), torch.device("cuda"), 0, 2,
                                             progress=False)
    assert residence.device.type == "cpu"
    for a, b in zip(epoch_batches(cpu_loader, 0), epoch_batches(gpu_loader, 0)):
        assert b["image"].is_cuda and torch.equal(a["image"], b["image"].cpu())


def test_unreadable_file_while_loading_into_memory_names_the_file(subjects, tmp_path):
    import dataclasses
    import shutil

    subject_list, _ = subjects
    broken = tmp_path / "broken_T1w.nii.gz"
    shutil.copy(subject_list[0].image, broken)
    broken.write_bytes(broken.read_bytes()[:200])  # truncated .gz, as a copy interrupted half-way
    train = [dataclasses.replace(subject_list[0], image=broken), *subject_list[1:4]]
    train_set = VolumeDataset(train, "segmentation", SHAPE, tmp_path / "cache")
    val_set = VolumeDataset(subject_list[8:], "segmentation", SHAPE, tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"reading the volumes into memory: truncated or damaged .*broken_T1w"):
        build_loaders(train_set, val_set, data_cfg("auto", num_workers=0), torch.device("cpu"), 0, 2, progress=False)
