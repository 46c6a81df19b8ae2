"""The non-finite guard of both training loops: skip NaN/Inf updates, fall back to fp32 with an LR backoff, stop
if it persists.

* Every micro-batch's loss and every update's clipped gradient norm are checked on the device, and a
  non-finite update is skipped there, through the `found_inf` tensor that PyTorch's fused optimizers
  accept (GradScaler's mechanism): weights and moments stay untouched, with no host sync per step.
* The decision is the same on every process: the gradient norm is all-reduced already, and the loss
  flag is all-reduced too, so a NaN on one rank makes every rank skip.
* Under fp16 a GradScaler skip for inf gradients is loss scaling, not an event; a non-finite loss is.
  Under bf16/fp32 both a non-finite loss and a non-finite gradient norm are.
* `poll()` reads the device counters (one host sync) where the loop syncs anyway, at log intervals. On
  the first event the run goes on in fp32 for good and the base LR is multiplied by `backoff` (the loop
  multiplies its schedule by `lr_scale`); after `max_consecutive` non-finite updates in a row in fp32,
  it raises.

Turning mixed precision off mid-run takes more than `AutocastKwargs(enabled=False)`: `prepare()`
wrapped `model.forward` in its own autocast, which would win. `disable_mixed_precision` removes that
wrapper, turns off `accelerator.autocast()` and the GradScaler, resets FSDP2's mixed-precision policy
and upcasts half-precision weights and optimizer state.
"""

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy

from common.errors import NonFiniteTrainingError


def _inner_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer wraps the torch one


def disable_mixed_precision(accelerator, model) -> None:
    """Make every later forward and backward of `model` run in fp32, whatever `prepare()` set up."""
    unwrapped = accelerator.unwrap_model(model, keep_fp32_wrapper=True)
    # prepare() stored the original bound forward and put an autocast-wrapped one in the instance dict;
    # dropping both makes attribute lookup find the class's plain forward again.
    if unwrapped.__dict__.pop("_original_forward", None) is not None:
        unwrapped.__dict__.pop("forward", None)
    accelerator.native_amp = False  # accelerator.autocast() becomes a no-op
    accelerator.scaler = None  # accelerator.backward() stops scaling the loss
    for opt in accelerator._optimizers:
        opt.scaler = None  # AcceleratedOptimizer.step() stops going through the scaler
    with torch.no_grad():
        if any(isinstance(module, FSDPModule) for module in unwrapped.modules()):
            # FSDP2 keeps its own reference to each shard's storage; its Module._apply override (behind .to())
            # re-registers the converted shards, where swapping .data below would leave it gathering the old ones.
            unwrapped.to(torch.float32)
        else:  # .data in place: the tensors stay the same objects, which DDP's buffer list and the optimizer hold
            for tensor in list(unwrapped.parameters()) + list(unwrapped.buffers()):
                if tensor.dtype in (torch.float16, torch.bfloat16):
                    tensor.data = tensor.data.float()
        for opt in accelerator._optimizers:
            for state in _inner_optimizer(opt).state.values():
                for key, value in state.items():
                    if torch.is_tensor(value) and value.dtype in (torch.float16, torch.bfloat16):
                        state[key] = value.float()
    _fsdp2_compute_in_fp32(unwrapped)  # after the upcast: FSDP2 derives its dtypes from the shards'


def _fsdp2_compute_in_fp32(model) -> None:
    """FSDP2 casts parameters to its mixed-precision policy's dtype before every forward. torch has no public
    setter for it after `fully_shard`: this resets it where FSDP2 keeps it (each module's state and parameter
    group), loudly failing if a torch version keeps it elsewhere (a test checks the forward runs in fp32)."""
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()
        if not hasattr(state, "_mp_policy") or not hasattr(state, "_fsdp_param_group"):
            raise RuntimeError("this torch keeps FSDP2's mixed-precision policy elsewhere; common/guard.py cannot "
                               "switch it to fp32 (update _fsdp2_compute_in_fp32)")
        module.reshard()  # the unsharded copies (in the old dtype) are dropped; the shards keep theirs
        state._mp_policy = MixedPrecisionPolicy()
        group = state._fsdp_param_group
        if group is not None:
            group.mp_policy = MixedPrecisionPolicy()
            group._init_mp_dtypes()
            for fsdp_param in group.fsdp_params:  # all-gather buffers are cached in the old dtype: rebuild them
                fsdp_param.all_gather_outputs = []
                fsdp_param.__dict__.pop("_unsharded_param", None)


class NonFiniteGuard:
    def __init__(self, accelerator, model, optimizer, backoff: float = 0.5, max_consecutive: int = 5):
        if not getattr(_inner_optimizer(optimizer), "_step_supports_amp_scaling", False):
            raise ValueError("the non-finite guard skips updates through the optimizer's found_inf input; use a "
                             "fused optimizer, e.g. torch.optim.AdamW(..., fused=True)")
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.backoff = backoff
        self.max_consecutive = max_consecutive
        device = accelerator.device
        # Device-side counters: written every update without a host sync, read by poll().
        self.nonfinite_total = torch.zeros((), dtype=torch.int64, device=device)
        self.nonfinite_in_a_row = torch.zeros((), dtype=torch.int64, device=device)
        self._window_loss_finite = torch.ones((), dtype=torch.bool, device=device)
        # Host-side state: what has been acted on.
        self.events_handled = 0
        self.lr_scale = 1.0
        self.fallback_step: int | None = None

    def record_loss(self, loss: torch.Tensor) -> None:
        """Call after every micro-batch's backward: remembers whether any loss in this update was non-finite."""
        self._window_loss_finite &= torch.isfinite(loss.detach()).all()

    def mask_nonfinite_update(self, grad_norm: torch.Tensor) -> torch.Tensor:
        """Call on sync steps after clipping: makes the coming optimizer.step() a no-op if the update is bad.
        Returns the device bool "this update is finite", the same on every process."""
        finite = self._window_loss_finite.clone()
        self._window_loss_finite.fill_(True)
        if self.accelerator.scaler is None:  # under fp16 the scaler owns inf gradients
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a replicated DTensor, the same value on every rank
                grad_norm = grad_norm.full_tensor()
            finite &= torch.isfinite(grad_norm.detach().to(finite.device))
        if self.accelerator.num_processes > 1:
            flag = finite.to(torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = flag.bool()
        bad = (~finite).to(torch.int64)
        self.nonfinite_total += bad
        self.nonfinite_in_a_row.mul_(bad).add_(bad)
        # Fused optimizers skip the whole update (weights, moments, step count) when found_inf != 0.
        # Under fp16 the GradScaler sets found_inf itself; a non-finite loss gives it inf gradients too.
        _inner_optimizer(self.optimizer).found_inf = (~finite).float()
        return finite

    def poll(self, step: int) -> bool:
        """Act on events since the last poll (one host sync): on the first, fall back to fp32 and say so (every later
        poll that finds events counts the fp32 streak). Returns True if it just fell back."""
        total, in_a_row = (int(v) for v in torch.stack([self.nonfinite_total, self.nonfinite_in_a_row]).tolist())
        new_events = total - self.events_handled
        self.events_handled = total
        if new_events == 0:
            return False
        if self.fallback_step is None:
            self.fallback_step = step
            self.lr_scale *= self.backoff
            disable_mixed_precision(self.accelerator, self.model)
            self.nonfinite_in_a_row.zero_()  # count the fp32 streak from here
            self.accelerator.print(f"step {step}: non-finite loss/gradients; continuing in fp32 with the base LR "
                                   f"x{self.lr_scale:g}")
            return True
        if in_a_row >= self.max_consecutive:
            raise NonFiniteTrainingError(f"{in_a_row} consecutive non-finite updates in fp32 (at step {step}) after "
                                         f"the fallback at step {self.fallback_step}; lower --lr or check the data "
                                         f"for NaN/Inf, then resume from the last checkpoint")
        return False

    # Saved in train_state.pt by common/checkpoint.py (loaded with weights_only=True); the same on every process.
    def state_dict(self) -> dict:
        return {"nonfinite_total": self.nonfinite_total.cpu(), "nonfinite_in_a_row": self.nonfinite_in_a_row.cpu(),
                "events_handled": self.events_handled, "lr_scale": self.lr_scale, "fallback_step": self.fallback_step}

    def load_state_dict(self, state: dict) -> None:
        self.nonfinite_total.copy_(state["nonfinite_total"])
        self.nonfinite_in_a_row.copy_(state["nonfinite_in_a_row"])
        self.events_handled = state["events_handled"]
        self.lr_scale = state["lr_scale"]
        self.fallback_step = state["fallback_step"]
        if self.fallback_step is not None:  # a resumed run stays in fp32 once it fell back
            disable_mixed_precision(self.accelerator, self.model)
