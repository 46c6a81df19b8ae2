"""Train train_dual_task.py with its defaults and print a table of accuracy and time.

    python bench/accuracy.py                                   # FD001, seed 42: configs/fd001.yaml, 3 folds
                                                               # (about 8 minutes on 2 cores)
    python bench/accuracy.py --subsets FD001 FD003 --seeds 1 2 3
    python bench/accuracy.py --extra --epochs 10               # anything after --extra goes to the script

Each run is a separate process, exactly as a user would start it; `configs/<subset>.yaml` is used
when it exists (per-subset defaults). The validation split, the plateau/early stopping and the best
epoch use validation engines only; the test set is evaluated once per run, at the end.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def mean_std(values):
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subsets", nargs="+", default=["FD001"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[42])
    parser.add_argument("--output_dir", default="runs/bench_accuracy")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="arguments passed to the script")
    args = parser.parse_args()

    rows = []
    for subset in args.subsets:
        runs = []
        for seed in args.seeds:
            out = REPO / args.output_dir / f"{subset}_seed{seed}"  # an absolute --output_dir stays as it is
            config = REPO / "configs" / f"{subset.lower()}.yaml"
            cmd = [sys.executable, str(REPO / "train_dual_task.py"), "--data", subset, "--seed", str(seed),
                   "--output_dir", str(out), "--overwrite", "true"]
            cmd += ["--config", str(config)] if config.is_file() else []
            cmd += args.extra
            print("$", " ".join(cmd), flush=True)
            start = time.perf_counter()
            subprocess.run(cmd, check=True, cwd=REPO)
            result = per_model_means(json.loads((out / "results.json").read_text()))
            result["process_seconds"] = time.perf_counter() - start
            runs.append(result)
            print(f"  {subset} seed {seed}: test RMSE {result['test_rmse']:.2f} "
                  f"(one model: {result['model_test_rmse']:.2f}), "
                  f"score {result['test_score']:.0f}, best val RMSE {result['best_val_rmse']:.2f}, "
                  f"{result['process_seconds']:.0f} s", flush=True)
        rows.append((subset, runs))

    print("\n| subset | seeds | folds | test RMSE | PHM08 score | test RMSE of one model | best val RMSE | epochs run "
          "| wall time per run (s) | train samples/s | peak memory (MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for subset, runs in rows:
        cells = [mean_std([r[key] for r in runs])
                 for key in ["test_rmse", "test_score", "model_test_rmse", "best_val_rmse", "epochs_run",
                             "process_seconds", "train_samples_per_second", "peak_memory_mb"]]
        print(f"| {subset} | {len(runs)} | {runs[0]['folds']} | " + " | ".join(cells) + " |")


def per_model_means(result: dict) -> dict:
    """A fold ensemble's results.json holds the ensemble's test scores and each model's numbers under per_fold:
    per-model columns (validation, epochs, speed) are means over its models, and 'one model' is their mean test
    RMSE, the ensemble's baseline. A single model is its own baseline."""
    models = result.get("per_fold", [result])
    for key in ("best_val_rmse", "epochs_run", "train_samples_per_second"):
        result[key] = statistics.mean(m[key] for m in models)
    return result | {"model_test_rmse": statistics.mean(m["test_rmse"] for m in models), "folds": len(models)}


if __name__ == "__main__":
    main()
