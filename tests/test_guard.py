"""The non-finite guard on a real Accelerator (CPU, bf16 autocast): skip, fall back to fp32, back off, stop."""

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

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
