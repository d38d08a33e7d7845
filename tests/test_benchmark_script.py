"""scripts/benchmark_train.py --end-to-end runs on a tiny setting and prints every row of its table."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow  # times three loops end to end (~9 s)
def test_end_to_end_benchmark_prints_ceiling_loop_and_monai_rows(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "benchmark_train.py"), "--end-to-end", "--shapes", "32", "--width",
         "0.125", "--subjects", "8", "--epochs", "2", "--workers", "0", "--monai-workers", "0", "--resident", "auto",
         "off", "--repeats", "1", "--work-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {line.split("|")[0].strip(): line for line in proc.stdout.splitlines() if line.count("|") == 5}
    assert "compute-only train step (ceiling)" in rows
    assert "brain3d-train (data.resident=auto: device)" in rows
    assert "brain3d-train (data.resident=off: off)" in rows
    assert "MONAI CacheDataset + DataLoader" in rows
    ratio = float(rows["compute-only train step (ceiling)"].split("|")[2])
    assert ratio == 1.0
    paired = r"brain3d \(data.resident=auto: device\) / MONAI CacheDataset \+ DataLoader: \d+\.\d\dx"
    assert re.search(paired, proc.stdout)
