"""The non-finite guard of both training loops: skip NaN/Inf updates, turn mixed precision off with an LR
backoff, stop if it persists.

* Every micro-batch's loss and every update's clipped gradient norm are checked on the device, and a
  non-finite update is skipped there, through the `found_inf` tensor that PyTorch's fused optimizers
  accept (GradScaler's mechanism): weights and moments stay untouched, with no host sync per step.
* The decision is the same on every process: the gradient norm is all-reduced already, and the loss
  flag is all-reduced too, so a NaN on one rank makes every rank skip.
* Under fp16 a GradScaler skip for inf gradients is loss scaling, not an event; a non-finite loss is.
  Under bf16/fp32 both a non-finite loss and a non-finite gradient norm are.
* `poll()` reads the device counters (one host sync) where the loop syncs anyway, at log intervals. On
  the first event mixed precision goes off for good and the base LR is multiplied by `backoff` (the loop
  multiplies its schedule by `lr_scale`); after `max_consecutive` non-finite updates in a row, it raises.

The fallback fits the machine the run started on: trainable weights and their optimizer state in fp32, no
autocast, no loss scaling; a frozen base keeps bf16 (fp32's exponent range, and it does not learn) or fp32,
and a frozen fp16 base (fp16's range is the usual culprit) goes to bf16 where the device has it natively,
else to fp32 once it is known to fit. fp32 matmuls may then use TF32 on a GPU (fp32's range; the line
says so). Turning mixed precision off mid-run takes more than `AutocastKwargs(enabled=False)`:
`prepare()` wrapped `model.forward` in its own autocast, which would win; `disable_mixed_precision`
removes that wrapper, turns off `accelerator.autocast()` and the GradScaler, and resets FSDP2's
mixed-precision policy.
"""

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy

from common.errors import NonFiniteTrainingError


def _inner_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer wraps the torch one


def frozen_fp16_target(device) -> torch.dtype:
    """What a frozen fp16 base becomes in the fallback: bf16 where the device has it natively, else fp32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float32
    return torch.bfloat16


def disable_mixed_precision(accelerator, model) -> str:
    """No more autocast or loss scaling for `model`, whatever `prepare()` set up: trainable weights and optimizer
    state in fp32, a frozen base as the module docstring says. Returns the dtypes now in use, for the line."""
    unwrapped = accelerator.unwrap_model(model, keep_fp32_wrapper=True)
    # prepare() stored the original bound forward and put an autocast-wrapped one in the instance dict;
    # dropping both makes attribute lookup find the class's plain forward again.
    if unwrapped.__dict__.pop("_original_forward", None) is not None:
        unwrapped.__dict__.pop("forward", None)
    accelerator.native_amp = False  # accelerator.autocast() becomes a no-op
    accelerator.scaler = None  # accelerator.backward() stops scaling the loss
    for opt in accelerator._optimizers:
        opt.scaler = None  # AcceleratedOptimizer.step() stops going through the scaler
    half = (torch.float16, torch.bfloat16)
    frozen_fp16 = frozen_fp16_target(accelerator.device)
    targets = {}  # tensor -> the dtype it becomes
    for tensor in [*unwrapped.parameters(), *unwrapped.buffers()]:
        trainable = isinstance(tensor, torch.nn.Parameter) and tensor.requires_grad
        if tensor.dtype in half and (trainable or tensor.dtype == torch.float16):
            targets[tensor] = torch.float32 if trainable else frozen_fp16
    fsdp2 = any(isinstance(module, FSDPModule) for module in unwrapped.modules())
    if fsdp2 and targets:  # FSDP2 converts whole units only (its Module._apply re-registers the shards)
        targets = {tensor: torch.float32 for tensor in unwrapped.parameters() if tensor.dtype in half}
    _check_it_fits(accelerator.device, targets)
    with torch.no_grad():
        if fsdp2 and targets:
            unwrapped.to(torch.float32)
        for tensor, dtype in targets.items() if not fsdp2 else ():
            tensor.data = tensor.data.to(dtype)  # in place: DDP's buffer list and the optimizer hold these objects
        for opt in accelerator._optimizers:
            for state in _inner_optimizer(opt).state.values():
                for key, value in state.items():
                    if torch.is_tensor(value) and value.dtype in half:
                        state[key] = value.float()
    _fsdp2_without_mixed_precision(unwrapped)  # after the conversion: FSDP2 derives its dtypes from the shards'
    if accelerator.device.type == "cuda" and torch.cuda.get_device_capability(accelerator.device) >= (8, 0):
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32's range, tensor-core speed
    kept = sorted({str(p.dtype).removeprefix("torch.") for p in unwrapped.parameters() if not p.requires_grad})
    tf32 = ", TF32 matmuls" if torch.backends.cuda.matmul.allow_tf32 and accelerator.device.type == "cuda" else ""
    return f"trainable weights fp32{', frozen ' + '/'.join(kept) if kept else ''}{tf32}"


def _check_it_fits(device, targets: dict) -> None:
    """On a GPU, the fallback's larger copies must fit in what is free, or the run stops with one line."""
    extra = sum(t.numel() * (torch.finfo(dtype).bits - torch.finfo(t.dtype).bits) // 8 for t, dtype in targets.items())
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    if free is not None and extra > free:
        raise NonFiniteTrainingError(f"after a non-finite update the weights would need {extra / 2**30:.1f} GiB "
                                     f"more in fp32, {free / 2**30:.1f} GiB are free; load the base with "
                                     f"--model_dtype bf16 (or fp32), then resume from the last checkpoint")


def _fsdp2_without_mixed_precision(model) -> None:
    """FSDP2 casts parameters to its mixed-precision policy's dtype before every forward. torch has no public
    setter for it after `fully_shard`: this resets it where FSDP2 keeps it (each module's state and parameter
    group), loudly failing if a torch version keeps it elsewhere (a test checks the forward's dtypes)."""
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()
        if not hasattr(state, "_mp_policy") or not hasattr(state, "_fsdp_param_group"):
            raise RuntimeError("this torch keeps FSDP2's mixed-precision policy elsewhere; common/guard.py cannot "
                               "turn it off (update _fsdp2_without_mixed_precision)")
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
            dtypes = disable_mixed_precision(self.accelerator, self.model)
            self.nonfinite_in_a_row.zero_()  # count the streak without mixed precision from here
            self.accelerator.print(f"step {step}: non-finite loss/gradients; continuing without mixed precision "
                                   f"({dtypes}) with the base LR x{self.lr_scale:g}")
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
