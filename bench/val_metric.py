"""Which validation score predicts the test score: all windows of the validation engines, or those engines cut
like test engines (--val_metric windows / cut)? Prints the rank correlation between validation and test RMSE
across runs, for each score.

    python bench/val_metric.py                                     # FD003, 2 settings x 6 seeds, 15 epochs
    python bench/val_metric.py --subsets FD001 FD003 --seeds 1 2 3 --epochs 20

An analysis, not a training protocol: each run is train_dual_task.train() in this process, and whenever the
loop scores the validation engines (EMA weights swapped in), this script also scores the test engines with the
same weights, so that one run gives, for every epoch, both validation scores and the test score. For each
score, the epoch it would select (its minimum over all epochs: early stopping is off here) gives a
(validation RMSE, test RMSE) pair per run. The training scripts themselves evaluate the test set once.
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402

import train_dual_task as tdt  # noqa: E402
from common.config import parse_config  # noqa: E402
from common.ema import EMA  # noqa: E402
from common.guard import NonFiniteGuard  # noqa: E402
from common.preemption import Preemption  # noqa: E402
from common.run_log import MetricsLog, Run  # noqa: E402

SETTINGS = {"defaults": [], "lr 2e-3": ["--lr", "2e-3"]}


def spearman(a, b) -> float:
    """Rank correlation (no ties expected among float RMSEs)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def one_run(argv: list[str], workdir: Path) -> list[dict]:
    """Train as the script does; return per epoch {windows, cut, test} RMSE of the EMA weights."""
    cfg = parse_config(tdt.Config, argv)
    if cfg.num_threads:  # as the script's main() does (--num_threads 0: PyTorch's default)
        torch.set_num_threads(cfg.num_threads)
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=True)
    tdt.set_seed(cfg.seed)
    splits, _ = tdt.load_splits(cfg, tdt.read_runs(cfg))
    model = tdt.DualTaskNet(splits["train"].x.shape[-1], cfg)
    optimizer = torch.optim.AdamW(tdt.param_groups(model, cfg.weight_decay), lr=cfg.lr, fused=True)
    loaders = {name: tdt.make_loader(splits[name], cfg.batch_size if name == "train" else 4 * cfg.batch_size,
                                     shuffle=name == "train", seed=cfg.seed)
               for name in ("train", "val", "val_cut", "test")}
    model, optimizer, *prepared = accelerator.prepare(model, optimizer, *loaders.values())
    loaders = dict(zip(loaders, prepared))
    loss_fn = tdt.AMNLLoss(cfg, accelerator.device, reduce=lambda losses: accelerator.reduce(losses, "mean"))
    ema = EMA(model.parameters(), decay=cfg.ema_decay)
    guard = NonFiniteGuard(accelerator, model, optimizer, cfg.nan_lr_backoff, cfg.max_nonfinite_in_a_row)
    epochs, real_evaluate = [], tdt.evaluate

    def evaluate_with_test(model_, loader, accelerator_, rul_cap):
        scores = real_evaluate(model_, loader, accelerator_, rul_cap)
        if loader is loaders["val"]:  # once per epoch, with the EMA weights swapped in
            epochs.append({"windows": scores["rmse"],
                           "test": real_evaluate(model_, loaders["test"], accelerator_, rul_cap)["rmse"]})
        elif loader is loaders["val_cut"]:
            epochs[-1]["cut"] = scores["rmse"]
        return scores

    tdt.evaluate = evaluate_with_test
    try:
        run = Run(workdir, MetricsLog(accelerator, workdir), Preemption())
        tdt.train(cfg, accelerator, model, optimizer, loaders, loss_fn, ema, guard, tdt.TrainState(), run)
    finally:
        tdt.evaluate = real_evaluate
    return epochs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subsets", nargs="+", default=["FD003"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5, 6])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="arguments passed to every run")
    args = parser.parse_args()

    pairs = {"windows": [], "cut": []}  # (subset, setting, seed, val RMSE at its best epoch, test RMSE there)
    for subset in args.subsets:
        config = Path(__file__).resolve().parents[1] / "configs" / f"{subset.lower()}.yaml"
        for setting, setting_args in SETTINGS.items():
            for seed in args.seeds:
                argv = (["--config", str(config)] if config.is_file() else []) + [
                    "--data", subset, "--seed", str(seed), "--epochs", str(args.epochs),
                    "--early_stopping_patience", str(args.epochs), *setting_args, *args.extra]
                with tempfile.TemporaryDirectory() as workdir:
                    epochs = one_run(argv, Path(workdir))
                line = f"{subset} {setting} seed {seed}:"
                for metric in pairs:
                    best = min(epochs, key=lambda e, m=metric: e[m])
                    pairs[metric].append((subset, setting, seed, best[metric], best["test"]))
                    line += (f" {metric}: val {best[metric]:.2f} -> test {best['test']:.2f} "
                             f"(epoch {epochs.index(best) + 1});")
                print(line, flush=True)

    print("\n| subset | validation score | runs | rank correlation, val vs test RMSE "
          "| test RMSE of the selected epochs |")
    print("|---|---|---|---|---|")
    for subset in args.subsets:  # per subset: their RMSEs live on different scales
        for metric, rows in pairs.items():
            val, test = zip(*[(r[3], r[4]) for r in rows if r[0] == subset])
            print(f"| {subset} | {metric} | {len(val)} | {spearman(val, test):.2f} | {statistics.mean(test):.2f} ± "
                  f"{statistics.stdev(test) if len(test) > 1 else 0:.2f} |")


if __name__ == "__main__":
    main()
