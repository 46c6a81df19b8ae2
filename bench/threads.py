"""How train_dual_task.py holds up on a busy machine: PyTorch's default CPU threads vs fewer, alone and beside
one competing CPU-bound PyTorch process.

    python bench/threads.py                      # FD001, 2 epochs per run, threads: default and 1
    python bench/threads.py --threads 0 1 2 --epochs 3

Each run is `python train_dual_task.py --epochs N --num_threads T` in its own process (0: PyTorch's default,
one thread per core). "busy" runs it while another process multiplies matrices with PyTorch's default threads
(as another training job would). The table shows the wall time of the run and its training throughput
(results.json). Run it on an otherwise idle machine.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMPETITOR = "import torch\na = torch.randn(512, 512)\nwhile True:\n    a = (a @ a).tanh()\n"


def one_run(threads: int, epochs: int, busy: bool, workdir: Path, extra: list[str]) -> dict:
    competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR]) if busy else None
    try:
        time.sleep(2 if busy else 0)  # the competitor is up to speed
        out = workdir / f"t{threads}_{'busy' if busy else 'alone'}"
        start = time.perf_counter()
        subprocess.run([sys.executable, "train_dual_task.py", "--epochs", str(epochs), "--num_threads", str(threads),
                        "--output_dir", str(out), *extra], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
    finally:
        if competitor:
            competitor.kill()
            competitor.wait()
    results = json.loads((out / "results.json").read_text())
    return {"threads": threads or "default", "machine": "busy" if busy else "alone", "seconds": seconds,
            "samples_per_second": results["train_samples_per_second"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", nargs="+", type=int, default=[0, 1], help="--num_threads values (0: default)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="arguments passed to the script")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for busy in (False, True):
            for threads in args.threads:
                rows.append(one_run(threads, args.epochs, busy, Path(workdir), args.extra))
                print(rows[-1], flush=True)
    print("\n| --num_threads | machine | wall time (s) | training samples/s |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['threads']} | {r['machine']} | {r['seconds']:.0f} | {r['samples_per_second']:,.0f} |")


if __name__ == "__main__":
    main()
