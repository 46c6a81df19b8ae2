"""The benchmark scripts run end to end and print their tables (tiny settings: this checks they work, not speed)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_accuracy_bench_prints_a_table_row_per_subset(tmp_path, small_cmapss):
    proc = subprocess.run(
        [sys.executable, "bench/accuracy.py", "--subsets", "FD001", "--seeds", "1", "2", "--output_dir", str(tmp_path),
         "--extra", "--epochs", "1", "--batch_size", "1024", "--conv_channels", "8", "--hidden_size", "8", "--gru_layers", "1",
         "--data_dir", str(small_cmapss)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=True)
    header, rule, row = proc.stdout.strip().splitlines()[-3:]
    assert header.startswith("| subset | seeds | test RMSE |") and "peak memory (MB)" in header
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:2] == ["FD001", "2"] and len(cells) == len(header.strip("|").split("|"))
    assert all("±" in c for c in cells[2:4])  # mean ± std over the two seeds


def test_overhead_bench_prints_the_ratio():
    proc = subprocess.run([sys.executable, "bench/overhead.py", "--steps", "3", "--rounds", "1"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=True)
    ratio = float(proc.stdout.split("overhead ratio (full / bare):")[1].split()[0])
    assert 0.2 < ratio < 20
