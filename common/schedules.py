"""Learning-rate (and weight-decay) schedules as stateless functions of the step, for both training scripts; and
a warning when a run is too short to train or validate.

The loop writes `base_lr * factor(step)` into the optimizer's param groups itself (as nanoGPT's
`get_lr` does), so a resumed run only needs the step to be back on the same curve, and an LR
backoff that scales `base_lr` is never overwritten by a scheduler object.

Convention: `factor(n)` is the factor for the update that takes the model from n to n+1 completed
updates, matching `transformers.get_cosine_schedule_with_warmup`'s `lr_lambda(n)`. Loops that want
a non-zero LR on their very first update call it with `n + 1` or start the warmup above zero.
"""

import math

from common.errors import warn


def linear_warmup(step: int, warmup_steps: int, start_factor: float = 0.0) -> float:
    """Ramp linearly from `start_factor` at step 0 to 1.0 at `warmup_steps`, then stay at 1.0."""
    if step >= warmup_steps:
        return 1.0
    return start_factor + (1.0 - start_factor) * step / warmup_steps


def warmup_cosine(
    step: int, warmup_steps: int, total_steps: int, start_factor: float = 0.0, final_factor: float = 0.0
) -> float:
    """Linear warmup, then a half cosine from 1.0 down to `final_factor` at `total_steps` (held after)."""
    if step < warmup_steps:
        return linear_warmup(step, warmup_steps, start_factor)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_factor + (1.0 - final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float) -> None:
    """Write one learning rate into every param group (groups scale it by an optional `lr_scale`)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def warn_if_short(total_steps: int, steps_per_epoch: int, max_steps: int, untrained: str, unvalidated: str) -> None:
    """Legal but surprising: no training at all (what happens then: `untrained`), or --max_steps ending it
    before the first epoch's validation (`unvalidated`)."""
    if total_steps == 0:
        warn(f"--epochs 0: nothing is trained; {untrained}")
    elif total_steps < steps_per_epoch:
        warn(f"--max_steps {max_steps} ends training before the first epoch ({steps_per_epoch} steps) finishes: "
             f"{unvalidated}")
