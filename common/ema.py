"""Exponential moving average of model weights, safe for DDP and FSDP2's sharded parameters (both training scripts).

The average is kept for trainable parameters only (for LoRA: just the adapters) and updated in place
on each process's local data with one fused `torch._foreach_lerp_`: with FSDP2 each rank averages
its own shard and nothing is gathered until the model or a checkpoint is saved. No host synchronisation
happens in `update()`, so it costs almost nothing per step.
"""

from contextlib import contextmanager

import torch

from common.distributed import local, part_of, whole


class EMA:
    """`ema = decay * ema + (1 - decay) * weights` after every optimizer step.

    With `warmup=True` the decay starts small and grows as (1 + n) / (10 + n) towards `decay`, so
    the average is not dominated by the random initial weights early in a run.
    """

    def __init__(self, parameters, decay: float = 0.999, warmup: bool = True):
        self.parameters = [p for p in parameters if p.requires_grad]
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow = [local(p).detach().clone().float() for p in self.parameters]

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self) -> None:
        weight = 1.0 - self.current_decay()
        current = [local(p).detach().float() for p in self.parameters]  # .float() copies only half precision
        torch._foreach_lerp_(self.shadow, current, weight)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self) -> None:
        """Overwrite the parameters with the averaged weights."""
        torch._foreach_copy_([local(p) for p in self.parameters], self.shadow)

    @contextmanager
    def swapped_in(self):
        """Evaluate with the averaged weights, then put the training weights back exactly."""
        backup = [local(p).detach().clone() for p in self.parameters]
        self.copy_to()
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([local(p) for p in self.parameters], backup)

    # Saved in checkpoints as whole tensors (gathered from the shards: every process calls state_dict), so that a
    # run can resume on another number of processes; each process loads its own part.
    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates,
                "shadow": [whole(p, avg).to("cpu", copy=True) for p, avg in zip(self.parameters, self.shadow)]}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        for p, avg, saved in zip(self.parameters, self.shadow, state["shadow"], strict=True):
            avg.copy_(part_of(p, saved))
