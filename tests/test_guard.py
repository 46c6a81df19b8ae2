"""The non-finite guard on a real Accelerator (CPU, bf16 autocast; fp16 with a GradScaler set up below Accelerate):
skip, turn mixed precision off, back off, stop; what the fallback does to a frozen base; resume after it."""

from dataclasses import dataclass

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from common.checkpoint import LoopState, load_checkpoint, save_checkpoint
from common.guard import NonFiniteGuard, NonFiniteTrainingError
from common.schedules import set_lr, warmup_cosine


@pytest.fixture
def setup():
    AcceleratorState._reset_state(True)
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    guard = NonFiniteGuard(accelerator, model, optimizer, backoff=0.5, max_consecutive=3)
    activation_dtypes = []
    model[0].register_forward_hook(lambda module, inputs, output: activation_dtypes.append(output.dtype))
    yield accelerator, model, optimizer, guard, activation_dtypes
    AcceleratorState._reset_state(True)


def train_step(accelerator, model, optimizer, guard, inject=None):
    x = torch.randn(16, 4)
    with accelerator.autocast():
        loss = model(x).float().pow(2).mean()
    if inject == "loss":
        loss = loss * float("nan")
    accelerator.backward(loss)
    guard.record_loss(loss)
    if inject == "grad":
        model[2].weight.grad[0, 0] = float("inf")
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)
    finite = guard.mask_nonfinite_update(grad_norm)
    optimizer.step()
    optimizer.zero_grad()
    return bool(finite)


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("inject", ["loss", "grad"])
def test_nonfinite_update_is_skipped_then_the_run_continues_in_fp32_with_backed_off_lr(setup, inject):
    accelerator, model, optimizer, guard, dtypes = setup
    base_lr, warmup, total = 0.01, 2, 20

    assert train_step(accelerator, model, optimizer, guard) is True
    assert guard.poll(step=1) is False
    assert dtypes[-1] == torch.bfloat16  # mixed precision really on before the event

    before = weights(model)
    adam_steps = optimizer.state[next(model.parameters())]["step"].clone()
    assert train_step(accelerator, model, optimizer, guard, inject=inject) is False
    after = weights(model)
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "the non-finite update must be skipped"
    assert all(torch.isfinite(p).all() for p in after)
    assert torch.equal(optimizer.state[next(model.parameters())]["step"], adam_steps)  # moments untouched too

    assert guard.poll(step=2) is True
    assert guard.fallback_step == 2 and guard.lr_scale == 0.5
    set_lr(optimizer, base_lr * guard.lr_scale * warmup_cosine(2, warmup, total))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * base_lr * warmup_cosine(2, warmup, total))

    assert train_step(accelerator, model, optimizer, guard) is True
    assert dtypes[-1] == torch.float32  # after the fallback the forward runs in fp32, autocast or not
    assert not all(torch.equal(a, b) for a, b in zip(after, weights(model)))  # and training goes on
    assert guard.poll(step=3) is False and guard.lr_scale == 0.5  # the backoff is applied once


def test_persistent_nonfinite_updates_in_fp32_stop_the_run(setup):
    accelerator, model, optimizer, guard, _ = setup
    train_step(accelerator, model, optimizer, guard, inject="loss")
    assert guard.poll(step=1) is True
    train_step(accelerator, model, optimizer, guard, inject="loss")
    train_step(accelerator, model, optimizer, guard, inject="loss")
    assert guard.poll(step=3) is False  # 2 in a row in fp32: not yet
    train_step(accelerator, model, optimizer, guard, inject="loss")
    with pytest.raises(NonFiniteTrainingError, match="3 consecutive non-finite updates in fp32"):
        guard.poll(step=4)


def test_a_finite_step_resets_the_streak(setup):
    accelerator, model, optimizer, guard, _ = setup
    train_step(accelerator, model, optimizer, guard, inject="loss")
    guard.poll(step=1)
    for step in range(2, 8):  # alternate: never 3 in a row
        train_step(accelerator, model, optimizer, guard, inject="loss" if step % 2 else None)
        guard.poll(step)
    assert int(guard.nonfinite_total) == 4


def test_resumed_guard_state_keeps_the_run_in_fp32(setup):
    accelerator, model, optimizer, guard, dtypes = setup
    train_step(accelerator, model, optimizer, guard, inject="loss")
    guard.poll(step=1)
    state = guard.state_dict()

    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.01, fused=True)
    fresh, fresh_opt = accelerator.prepare(fresh, fresh_opt)
    resumed = NonFiniteGuard(accelerator, fresh, fresh_opt)
    seen = []
    fresh[0].register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    resumed.load_state_dict(state)
    assert resumed.fallback_step == 1 and resumed.lr_scale == 0.5
    with accelerator.autocast():
        fresh(torch.randn(2, 4))
    assert seen == [torch.float32]


def test_guard_needs_an_optimizer_that_can_skip_on_the_device():
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), foreach=True)
    with pytest.raises(ValueError, match="fused=True"):
        NonFiniteGuard(accelerator, model, optimizer)


def fp16_accelerator() -> Accelerator:
    """The fp16 path as Accelerate builds it on a GPU (fp16 autocast, a GradScaler), on a CPU: Accelerate
    refuses fp16 there (it would run fp32), so the test sets it up below it, as Accelerator.__init__ does."""
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=True)
    AcceleratorState._shared_state["_mixed_precision"] = "fp16"
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler("cpu")
    return accelerator


class ToFloat(torch.nn.Module):
    def forward(self, x):  # what peft does between a frozen half-precision layer and an fp32 LoRA one
        return x.float()


def frozen_then_trainable(frozen_dtype: torch.dtype) -> torch.nn.Module:
    """A frozen half-precision layer (a base) feeding a trainable fp32 one (an adapter)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), ToFloat(), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    model[0].requires_grad_(False).to(frozen_dtype)
    return model


@dataclass
class RunSettings:  # what common/checkpoint.py reads of a run's Config
    batch_size: int = 16
    grad_accum_steps: int = 1
    keep_checkpoints: int = 2


def fp16_run(folder, steps: int, stop_at: int | None = None, resume=None, frozen_dtype=torch.float16):
    """`steps` updates under fp16 with a GradScaler, the loss made NaN at update 2; stopped at `stop_at` with a
    checkpoint, or resumed from `resume`. Returns the weights, the guard and the frozen layer's dtype."""
    accelerator = fp16_accelerator()
    model = frozen_then_trainable(frozen_dtype)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01, fused=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    guard = NonFiniteGuard(accelerator, model, optimizer)
    state = LoopState()
    if resume is not None:
        load_checkpoint(accelerator, resume, state, {"guard": guard}, RunSettings())
    while state.step < steps:
        torch.manual_seed(100 + state.step)  # the same batch at the same update, whatever ran before
        with accelerator.autocast():
            loss = model(torch.randn(16, 4).to(model[0].weight.dtype)).float().pow(2).mean()
        accelerator.backward(loss * float("nan") if state.step == 1 else loss)
        guard.record_loss(loss * float("nan") if state.step == 1 else loss)
        guard.mask_nonfinite_update(accelerator.clip_grad_norm_(model.parameters(), 1.0))
        optimizer.step()
        optimizer.zero_grad()
        state.step += 1
        guard.poll(state.step)
        if state.step == stop_at:
            save_checkpoint(accelerator, folder, state, {"guard": guard}, RunSettings())
            break
    return [p.detach().float().clone() for p in model.parameters()], guard, next(model.parameters()).dtype


def test_a_run_that_fell_back_from_fp16_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    """After the fallback the GradScaler is gone, so the checkpoint has no scaler.pt; a resumed fp16 run has a
    GradScaler again: it must switch to its fallback before Accelerate loads its state (it asked for scaler.pt)."""
    straight, guard, _ = fp16_run(tmp_path / "straight", steps=5)
    assert guard.fallback_step == 2
    _, stopped, _ = fp16_run(tmp_path / "killed", steps=5, stop_at=3)
    assert stopped.fallback_step == 2 and not list((tmp_path / "killed").rglob("scaler.pt"))
    resumed, guard, _ = fp16_run(tmp_path / "killed", steps=5, resume=tmp_path / "killed/checkpoints/step_00000003")
    assert guard.fallback_step == 2 and guard.lr_scale == 0.5
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))


@pytest.mark.parametrize("frozen, after", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.bfloat16)])
def test_the_fallback_keeps_a_frozen_bf16_base_and_moves_a_frozen_fp16_one_to_bf16(tmp_path, frozen, after):
    """A frozen base does not learn and bf16 has fp32's range: upcasting a 7B base would double its memory for
    nothing. fp16's range is the likely culprit: an fp16 base goes to bf16 (native here). The trainable layer
    computes in fp32 from the fallback on, and training goes on, with finite weights."""
    if frozen == torch.bfloat16:
        AcceleratorState._reset_state(True)
        accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    else:
        accelerator = fp16_accelerator()
    model = frozen_then_trainable(frozen)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01, fused=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    guard = NonFiniteGuard(accelerator, model, optimizer)
    outputs = []
    model[3].register_forward_hook(lambda module, inputs, output: outputs.append(output.dtype))
    trained = []
    for step in range(1, 5):
        with accelerator.autocast():
            loss = model(torch.randn(16, 4).to(model[0].weight.dtype)).float().pow(2).mean()
        loss = loss * float("nan") if step == 2 else loss
        accelerator.backward(loss)
        guard.record_loss(loss)
        guard.mask_nonfinite_update(accelerator.clip_grad_norm_(model.parameters(), 1.0))
        optimizer.step()
        optimizer.zero_grad()
        guard.poll(step)
        trained.append(model[3].weight.detach().clone())
    assert guard.fallback_step == 2 and model[0].weight.dtype == after and model[3].weight.dtype == torch.float32
    assert outputs[:2] == [{torch.bfloat16: torch.bfloat16, torch.float16: torch.float16}[frozen]] * 2
    assert outputs[2:] == [torch.float32, torch.float32]  # the adapter without autocast, in fp32
    assert not torch.equal(trained[2], trained[3]) and torch.isfinite(trained[3]).all()
