"""brain3d.data.cache and brain3d-preprocess: hits are memmaps of the same arrays, changed files or
settings are never served stale, copies of a file share its entry, concurrent fillers leave one complete
entry, fill_cache counts, BRAIN3D_CACHE_DIR sets the cache root."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import brain3d.data.cache as cache
from brain3d.data.cache import cache_key, cache_paths, cached_volume, default_cache_root, ensure_cached, file_identity
from brain3d.data.nifti import load_mask, load_nifti_with_grid, save_nifti
from brain3d.data.preprocess import preprocess_volume
from brain3d.data.synthetic import make_phantom, make_synthetic_dataset
from brain3d.preprocess_cli import fill_cache

from tests.conftest import CONFIG_DIR

SETTINGS = {"mode": "spacing", "spacing": [4.0, 4.0, 4.0], "crop_foreground": True, "foreground_margin": 1,
            "shape": [24, 24, 24], "normalization": "zscore"}


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.fixture()
def subject(tmp_path) -> tuple[Path, Path]:
    image, mask = make_phantom((32, 32, 32), 1, 50.0, np.random.default_rng(0))  # 6 mm voxels
    mask[10:14, 10:14, 10:14] = 1
    affine = np.diag([6.0, 6.0, 6.0, 1.0])
    return (save_nifti(image, affine, tmp_path / "sub" / "img.nii.gz"),
            save_nifti(mask, affine, tmp_path / "sub" / "mask.nii.gz", dtype=np.uint8))


def _direct(image_path, mask_path, settings):
    data, _, grid = load_nifti_with_grid(image_path)
    mask = load_mask(mask_path)[0] if mask_path else None
    return preprocess_volume(data, grid.voxel_size_mm, settings, mask)


def test_miss_then_hit_returns_identical_read_only_memmaps(subject, tmp_path):
    image_path, mask_path = subject
    root = tmp_path / "cache"
    image, mask, info = cached_volume(image_path, mask_path, SETTINGS, root)
    key = cache_key(image_path, mask_path, SETTINGS)
    paths = cache_paths(key, root)
    assert paths.image == root / key[:2] / f"{key}.image.npy"
    assert _files(root) == sorted([paths.image, paths.mask, paths.meta])
    meta = json.loads(paths.meta.read_text())
    assert meta["image"]["path"] == str(image_path.resolve()) and meta["info"] == info.to_dict()

    image2, mask2, info2 = cached_volume(image_path, mask_path, SETTINGS, root)
    for arr in (image, mask, image2, mask2):
        assert isinstance(arr, np.memmap) and not arr.flags.writeable
    assert image2.dtype == np.float32 and mask2.dtype == np.uint8 and info2 == info
    np.testing.assert_array_equal(image2, image)
    np.testing.assert_array_equal(mask2, mask)
    ref_image, ref_mask, ref_info = _direct(image_path, mask_path, SETTINGS)
    np.testing.assert_array_equal(image2, ref_image)
    np.testing.assert_array_equal(mask2, ref_mask)
    assert ref_info == info and ensure_cached(image_path, mask_path, SETTINGS, root) == (key, True)
    # no mask: another entry, mask None
    image3, mask3, _ = cached_volume(image_path, None, SETTINGS, root)
    assert mask3 is None and cache_key(image_path, None, SETTINGS) != key
    np.testing.assert_array_equal(image3, image)


def test_rewritten_or_touched_file_is_not_served_stale(subject, tmp_path):
    image_path, mask_path = subject
    root = tmp_path / "cache"
    old, _, _ = cached_volume(image_path, mask_path, SETTINGS, root)
    old = np.array(old)
    key = cache_key(image_path, mask_path, SETTINGS)
    # rewrite with other content (and a distinct mtime, whatever the filesystem's timestamp resolution)
    new_image, _ = make_phantom((32, 32, 32), 0, 70.0, np.random.default_rng(9))
    mtime = image_path.stat().st_mtime_ns
    save_nifti(new_image, np.diag([6.0, 6.0, 6.0, 1.0]), image_path)
    os.utime(image_path, ns=(mtime + 10**9, mtime + 10**9))
    new_key = cache_key(image_path, mask_path, SETTINGS)
    assert new_key != key
    assert ensure_cached(image_path, mask_path, SETTINGS, root) == (new_key, False)
    new, _, _ = cached_volume(image_path, mask_path, SETTINGS, root)
    np.testing.assert_array_equal(new, _direct(image_path, mask_path, SETTINGS)[0])
    assert not np.array_equal(new, old)
    # touching the mask alone (same content, new mtime) keeps the key: keys follow content, not mtimes
    os.utime(mask_path, ns=(mtime + 2 * 10**9, mtime + 2 * 10**9))
    assert ensure_cached(image_path, mask_path, SETTINGS, root) == (new_key, True)


def test_a_copy_elsewhere_has_the_same_key_and_is_a_hit(subject, tmp_path, monkeypatch):
    """Data copied to a job's scratch (new path, new mtime) reuses the entries its original filled."""
    image_path, mask_path = subject
    root = tmp_path / "cache"
    image, mask, _ = cached_volume(image_path, mask_path, SETTINGS, root)
    key = cache_key(image_path, mask_path, SETTINGS)
    scratch = tmp_path / "scratch" / "job1"
    scratch.mkdir(parents=True)
    image_copy, mask_copy = Path(shutil.copy(image_path, scratch)), Path(shutil.copy(mask_path, scratch))
    later = image_path.stat().st_mtime_ns + 5 * 10**9
    for p in (image_copy, mask_copy):
        os.utime(p, ns=(later, later))  # a distinct mtime, whatever the filesystem's timestamp resolution
    assert cache_key(image_copy, mask_copy, SETTINGS) == key
    assert file_identity(image_copy) == file_identity(image_path)

    def no_recompute(*args, **kwargs):
        raise AssertionError("a copy must be served from the cache, not preprocessed again")

    monkeypatch.setattr(cache, "preprocess_volume", no_recompute)
    assert ensure_cached(image_copy, mask_copy, SETTINGS, root) == (key, True)
    image2, mask2, _ = cached_volume(image_copy, mask_copy, SETTINGS, root)
    np.testing.assert_array_equal(image2, image)
    np.testing.assert_array_equal(mask2, mask)
    assert len(list(root.rglob("*.json"))) == 1


def _write_with_same_mtime(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` keeping its mtime, as ``rsync -t`` does (temp file, then rename)."""
    st = path.stat()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, path)


def test_a_changed_byte_or_size_is_another_key(tmp_path):
    """Same path, same size, same mtime, one data byte changed at a sampled position: another key."""
    volume = np.random.default_rng(3).normal(size=(48, 48, 48)).astype(np.float32)  # ~432 KiB: sampled
    path = save_nifti(volume, np.diag([2.0, 2.0, 2.0, 1.0]), tmp_path / "big.nii")
    original = path.read_bytes()
    ranges = cache._sample_ranges(len(original))
    assert len(ranges) > 2 and sum(length for _, length in ranges) < len(original) // 2  # not a full read
    key = cache_key(path, None, SETTINGS)
    offset = ranges[len(ranges) // 2][0] + 100  # inside an interior sample, far past the 352-byte header
    changed = bytearray(original)
    changed[offset] ^= 0xFF
    _write_with_same_mtime(path, bytes(changed))
    assert path.stat().st_size == len(original)
    assert cache_key(path, None, SETTINGS) != key
    _write_with_same_mtime(path, original)  # back to the original content: the original key
    assert cache_key(path, None, SETTINGS) == key
    _write_with_same_mtime(path, original + b"\0" * 16)  # another size
    assert cache_key(path, None, SETTINGS) != key


def test_identity_is_memoized_until_the_file_changes(subject, monkeypatch):
    """A repeated key costs a stat, not a read; a touch re-reads (and keeps the identity)."""
    image_path, _ = subject
    reads = []
    real = cache._content_hash
    monkeypatch.setattr(cache, "_content_hash", lambda path, size: reads.append(path) or real(path, size))
    cache._memo_identity.cache_clear()
    first = file_identity(image_path)
    assert file_identity(image_path) == first and len(reads) == 1
    later = image_path.stat().st_mtime_ns + 10**9
    os.utime(image_path, ns=(later, later))
    assert file_identity(image_path) == first and len(reads) == 2


@pytest.mark.parametrize("data", ["synthetic", "nifti", "bids", "msd"])
def test_brain3d_cache_dir_sets_the_cache_root(data, tmp_path, monkeypatch):
    monkeypatch.setenv("BRAIN3D_CACHE_DIR", str(tmp_path / "scratch_cache"))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"data={data}"])
        overridden = compose("train", overrides=[f"data={data}", f"data.cache_dir={tmp_path / 'x'}"])
    assert cfg.data.cache_dir == str(tmp_path / "scratch_cache") == str(default_cache_root())
    assert overridden.data.cache_dir == str(tmp_path / "x")  # an explicit data.cache_dir still wins
    monkeypatch.delenv("BRAIN3D_CACHE_DIR")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"data={data}"])
    assert Path(cfg.data.cache_dir).expanduser() == default_cache_root() == Path.home() / ".cache" / "brain3d"


def test_changed_settings_are_another_entry(subject, tmp_path):
    image_path, mask_path = subject
    root = tmp_path / "cache"
    a, _, info_a = cached_volume(image_path, mask_path, SETTINGS, root)
    other = {**SETTINGS, "shape": [20, 20, 20], "normalization": "percentile"}
    assert cache_key(image_path, mask_path, other) != cache_key(image_path, mask_path, SETTINGS)
    assert ensure_cached(image_path, mask_path, other, root)[1] is False
    b, _, info_b = cached_volume(image_path, mask_path, other, root)
    assert b.shape == info_b.output_shape == (20, 20, 20) and 0.0 <= b.min() and b.max() <= 1.0
    assert a.shape == (24, 24, 24)
    # equivalent spellings are the same entry
    same = OmegaConf.create({**SETTINGS, "spacing": [4, 4, 4], "name": "x"})
    assert ensure_cached(image_path, mask_path, same, root)[1] is True


def test_unreadable_entry_is_rebuilt(subject, tmp_path):
    image_path, mask_path = subject
    root = tmp_path / "cache"
    ref, _, _ = cached_volume(image_path, mask_path, SETTINGS, root)
    ref = np.array(ref)
    paths = cache_paths(cache_key(image_path, mask_path, SETTINGS), root)
    paths.image.write_bytes(b"")  # e.g. lost in a crash
    image, _, _ = cached_volume(image_path, mask_path, SETTINGS, root)
    np.testing.assert_array_equal(image, ref)


def _racing_filler(image_path, mask_path, root, barrier, queue):
    """Child process: preprocess, then wait until the other child has preprocessed too, then write."""
    # A forked child must not enter torch's OpenMP pool the parent already started (it would hang
    # forever); torch's DataLoader workers and brain3d-preprocess workers do the same.
    torch.set_num_threads(1)
    real = cache.preprocess_volume

    def slow_preprocess(*args, **kwargs):
        result = real(*args, **kwargs)
        barrier.wait(timeout=60)  # both processes have missed the key and are about to write
        return result

    cache.preprocess_volume = slow_preprocess
    try:
        key, hit = ensure_cached(image_path, mask_path, SETTINGS, root)
        image, mask, _ = cached_volume(image_path, mask_path, SETTINGS, root)
        queue.put((hit, float(np.asarray(image, dtype=np.float64).sum()), int(mask.sum())))
    except BaseException as err:  # report instead of hanging the parent
        queue.put(repr(err))
        raise


def test_two_processes_filling_the_same_key_leave_one_complete_entry(subject, tmp_path):
    image_path, mask_path = subject
    root = tmp_path / "cache"
    ctx = multiprocessing.get_context("fork")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_racing_filler, args=(image_path, mask_path, root, barrier, queue), daemon=True)
             for _ in range(2)]
    for p in procs:
        p.start()
    try:
        results = [queue.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=30)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    assert all(isinstance(r, tuple) for r in results), results
    assert [r[0] for r in results] == [False, False]  # both really missed
    assert results[0][1:] == results[1][1:]
    key = cache_key(image_path, mask_path, SETTINGS)
    paths = cache_paths(key, root)
    assert _files(root) == sorted([paths.image, paths.mask, paths.meta])  # no temp files left
    assert not [p for p in root.rglob("*tmp*")]
    image, mask, _ = cached_volume(image_path, mask_path, SETTINGS, root)
    ref_image, ref_mask, _ = _direct(image_path, mask_path, SETTINGS)
    np.testing.assert_array_equal(image, ref_image)
    np.testing.assert_array_equal(mask, ref_mask)


def _compose(manifest: Path, cache_root: Path, num_workers: int = 2):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["task=segmentation", "data=nifti", f"data.manifest={manifest}",
                                          "trainer.progress=false", f"data.cache_dir={cache_root}"])
    OmegaConf.set_struct(cfg, False)
    cfg.preprocess = dict(SETTINGS)
    cfg.num_workers = num_workers
    return cfg


def test_fill_cache_misses_first_then_hits(tmp_path):
    manifest = make_synthetic_dataset(tmp_path / "data", 6, (32, 32, 32))
    cfg = _compose(manifest, tmp_path / "cache")
    first = fill_cache(cfg)
    assert (first["subjects"], first["hits"], first["misses"]) == (6, 0, 6) and first["seconds"] > 0
    second = fill_cache(cfg)
    assert (second["subjects"], second["hits"], second["misses"]) == (6, 6, 0)
    root = tmp_path / "cache" / "preprocessed"
    assert len(list(root.rglob("*.json"))) == 6 and len(list(root.rglob("*.mask.npy"))) == 6
    assert not [p for p in root.rglob("*tmp*")]
    image = tmp_path / "data" / "images" / "sub-0003_T1w.nii.gz"
    mask = tmp_path / "data" / "masks" / "sub-0003_lesion.nii.gz"
    assert ensure_cached(image, mask, SETTINGS, root)[1] is True


def test_preprocess_cli_runs_as_a_hydra_app(tmp_path):
    manifest = make_synthetic_dataset(tmp_path / "data", 2, (16, 16, 16))
    args = ["task=classification", "data=nifti", f"data.manifest={manifest}", f"data.cache_dir={tmp_path / 'c'}",
            "preprocess=spacing", "preprocess.spacing=[2,2,2]", "data.shape=[8,8,8]", "+num_workers=1",
            "trainer.progress=false", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run([sys.executable, "-m", "brain3d.preprocess_cli", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (stats["subjects"], stats["misses"]) == (2, 2)
    assert len(list((tmp_path / "c" / "preprocessed").rglob("*.image.npy"))) == 2
    bad = subprocess.run([sys.executable, "-m", "brain3d.preprocess_cli", *args[:-4], "+preprocess={mode:cubic}",
                          f"hydra.run.dir={tmp_path / 'run2'}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "preprocess.mode='cubic'" in bad.stderr
