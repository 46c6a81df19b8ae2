"""What the harness costs: train_dual_task.train() with every feature on vs a bare PyTorch loop.

    python bench/overhead.py                     # 40 steps per arm, 5 alternating rounds
    python bench/overhead.py --steps 100 --rounds 7

Both arms use the same model architecture and initial weights, the same windows, fused AdamW and
batch size. The full arm is the script's own `train()`: Accelerate (accumulate, autocast,
backward, clip_grad_norm_), the AMNL loss, the non-finite guard, EMA, LR schedule, metrics logging
at its interval, the progress bar, and the checkpoint written when --max_steps stops it. The bare
arm is `loss.backward(); optimizer.step()` with MSE + cross-entropy. Arms alternate in one process
so that machine noise hits both; the table reports the median seconds per step.
"""

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from accelerate import Accelerator, DataLoaderConfiguration  # noqa: E402

import train_dual_task as tdt  # noqa: E402
from common.ema import EMA  # noqa: E402
from common.guard import NonFiniteGuard  # noqa: E402
from common.preemption import Preemption  # noqa: E402
from common.run_log import MetricsLog, Run  # noqa: E402


def bare_loop(model, loader, steps: int, lr: float) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    model.train()
    start, done = time.perf_counter(), 0
    while done < steps:
        for x, rul, health in loader:
            rul_pred, health_logits = model(x)
            loss = F.mse_loss(rul_pred, rul / 125) + F.cross_entropy(health_logits, health)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done += 1
            if done == steps:
                break
    return (time.perf_counter() - start) / steps


def full_loop(cfg, accelerator, initial_state, splits, workdir: Path) -> float:
    model = tdt.DualTaskNet(splits["train"].x.shape[-1], cfg)
    model.load_state_dict(initial_state)
    optimizer = torch.optim.AdamW(tdt.param_groups(model, cfg.weight_decay), lr=cfg.lr, fused=True)
    loaders = {name: tdt.make_loader(splits[name], cfg.batch_size * (1 if name == "train" else 4), name == "train",
                                     cfg.seed) for name in ("train", "val", "val_cut")}
    model, optimizer, *prepared = accelerator.prepare(model, optimizer, *loaders.values())
    loaders = dict(zip(loaders, prepared))
    loss_fn = tdt.AMNLLoss(cfg, accelerator.device, reduce=lambda losses: accelerator.reduce(losses, "mean"))
    ema = EMA(model.parameters(), decay=cfg.ema_decay)
    guard = NonFiniteGuard(accelerator, model, optimizer, cfg.nan_lr_backoff, cfg.max_nonfinite_in_a_row)
    workdir.mkdir(parents=True)
    run = Run(workdir, MetricsLog(accelerator, workdir), Preemption())
    start = time.perf_counter()
    tdt.train(cfg, accelerator, model, optimizer, loaders, loss_fn, ema, guard, tdt.TrainState(), run)
    return (time.perf_counter() - start) / cfg.max_steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per arm and round (< one epoch)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    cfg = tdt.Config(max_steps=args.steps, epochs=1)
    splits, _ = tdt.load_splits(cfg, tdt.read_runs(cfg))
    if args.steps >= len(splits["train"].rul) // cfg.batch_size:
        sys.exit("--steps must stay below one epoch, so that no end-of-epoch evaluation is timed")
    torch.manual_seed(cfg.seed)
    initial_state = copy.deepcopy(tdt.DualTaskNet(splits["train"].x.shape[-1], cfg).state_dict())
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    bare_model = tdt.DualTaskNet(splits["train"].x.shape[-1], cfg).to(accelerator.device)
    bare_loader = tdt.make_loader(splits["train"], cfg.batch_size, shuffle=True, seed=cfg.seed)

    bare_times, full_times = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            bare_model.load_state_dict(initial_state)
            bare_times.append(bare_loop(bare_model, bare_loader, args.steps, cfg.lr))
            full_times.append(full_loop(cfg, accelerator, initial_state, splits, Path(tmp) / f"round{r}"))
            print(f"round {r + 1}: bare {bare_times[-1] * 1e3:.1f} ms/step, full {full_times[-1] * 1e3:.1f} ms/step",
                  flush=True)
    bare, full = statistics.median(bare_times), statistics.median(full_times)
    print(f"\n| arm | median ms/step | steps x rounds |\n|---|---|---|\n"
          f"| bare PyTorch loop | {bare * 1e3:.1f} | {args.steps} x {args.rounds} |\n"
          f"| train_dual_task.train() | {full * 1e3:.1f} | {args.steps} x {args.rounds} |")
    print(f"\noverhead ratio (full / bare): {full / bare:.3f}  on {accelerator.device}, "
          f"{torch.get_num_threads()} threads, batch {cfg.batch_size}")


if __name__ == "__main__":
    main()
