"""Does memory grow over many FSDP2 steps? Resident memory and live DTensorSpec objects, fused vs foreach AdamW.

    accelerate launch --config_file accelerate_configs/fsdp.yaml bench/fsdp2_memory.py --steps 2000

Fused AdamW on DTensor parameters was reported to leak a DTensorSpec per parameter per step in recent
PyTorch (pytorch #188174, torchtitan #3790), enough to exhaust memory in long runs. The non-finite
guard needs a fused optimizer (it skips an update through the optimizer's `found_inf` input), so
this measures the path the scripts take: the dual-task network sharded by Accelerate's FSDP2 path
(`common.distributed.use_fsdp_on_cpu` on CPU processes), the training step of `train_dual_task.py`
(autocast, backward, clipping, guard, optimizer, EMA) on random batches, for each optimizer in turn.
Every `--every` steps it reads this process's resident memory (/proc) and counts the DTensorSpec
objects alive; it prints, per optimizer, the readings after warm-up and at the end, and the growth
per 1,000 steps. Rank 0 prints; each rank measures its own process.
"""

import argparse
import gc
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accelerate import Accelerator  # noqa: E402
from torch.distributed.tensor._dtensor_spec import DTensorSpec  # noqa: E402

import train_dual_task as tdt  # noqa: E402
from common.distributed import use_fsdp_on_cpu  # noqa: E402
from common.ema import EMA  # noqa: E402
from common.guard import NonFiniteGuard  # noqa: E402


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def live_dtensor_specs() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on every live object touches deprecated torch module attributes
        warnings.simplefilter("ignore")
        return sum(isinstance(obj, DTensorSpec) for obj in gc.get_objects())


ARMS = {"fused AdamW + guard": (True, True), "fused AdamW": (True, False), "foreach AdamW": (False, False)}


def measure(accelerator, fused: bool, with_guard: bool, steps: int, every: int,
            batch: int) -> list[tuple[int, float, int]]:
    cfg = tdt.Config()
    torch.manual_seed(0)
    model = tdt.DualTaskNet(num_features=15, cfg=cfg)
    optimizer = torch.optim.AdamW(tdt.param_groups(model, cfg.weight_decay), lr=1e-3, fused=fused,
                                  foreach=None if fused else True)
    model, optimizer = accelerator.prepare(model, optimizer)
    loss_fn = tdt.AMNLLoss(cfg, accelerator.device, reduce=lambda losses: accelerator.reduce(losses, "mean"))
    ema = EMA(model.parameters(), decay=cfg.ema_decay)
    guard = NonFiniteGuard(accelerator, model, optimizer) if with_guard else None  # it needs a fused optimizer
    readings = []
    for step in range(1, steps + 1):
        x, rul, health = torch.randn(batch, cfg.window, 15), torch.rand(batch) * 125, torch.randint(0, 3, (batch,))
        with accelerator.autocast():
            rul_pred, health_logits = model(x)
        loss, _ = loss_fn(rul_pred.float(), rul / cfg.rul_cap, health_logits.float(), health)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        if guard:
            guard.record_loss(loss)
            guard.mask_nonfinite_update(grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update()
        if step % every == 0:
            if guard:
                guard.poll(step)
            readings.append((step, resident_mb(), live_dtensor_specs()))
    accelerator._models.clear()  # let the next arm start from its own model only
    accelerator._optimizers.clear()
    return readings


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=250, help="read memory every this many steps")
    parser.add_argument("--batch_size", type=int, default=8,
                        help="the leak reported is per parameter per step, not per sample")
    args = parser.parse_args()
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # mixed precision from the launch config (bf16)
    use_fsdp_on_cpu(accelerator)
    rows = []
    for name, (fused, with_guard) in ARMS.items():
        start = time.perf_counter()
        readings = measure(accelerator, fused, with_guard, args.steps, args.every, args.batch_size)
        # Growth over the second half: the first steps still fill the allocator's pools and autograd's caches.
        (s0, rss0, specs0), (s1, rss1, specs1) = readings[0], readings[-1]
        s_mid, rss_mid, _ = readings[len(readings) // 2]
        rows.append(f"| {name} | {rss0:.1f} @ {s0} | {rss_mid:.1f} @ {s_mid} | {rss1:.1f} @ {s1} | "
                    f"{(rss1 - rss_mid) * 1000 / (s1 - s_mid):+.2f} | {specs0} | {specs1} | "
                    f"{time.perf_counter() - start:.0f} |")
    if accelerator.is_main_process:
        print(f"\n{accelerator.distributed_type.value}, {accelerator.num_processes} processes, {accelerator.device}, "
              f"mixed precision {accelerator.mixed_precision}, batch {args.batch_size}, torch {torch.__version__}\n")
        print("| optimizer | RSS MB @ step | RSS MB @ step | RSS MB @ step | RSS MB per 1000 steps, 2nd half "
              "| DTensorSpecs first | DTensorSpecs last | seconds |")
        print("|---|---|---|---|---|---|---|---|")
        print("\n".join(rows))
    accelerator.end_training()


if __name__ == "__main__":
    main()
