"""The dual-task script's own pieces: LR and weight-decay schedules, plateau, AMNL, PHM08, parameter groups."""

import math

import pytest
import torch

from train_dual_task import (
    AMNLLoss,
    Config,
    DualTaskNet,
    TrainState,
    lr_at,
    milestone_factor,
    param_groups,
    phm08_score,
    step_plateau,
)


def test_lr_warms_up_from_a_tenth_then_follows_cosine_or_plateau():
    cfg = Config(lr=1e-3, warmup_epochs=2, min_lr_factor=0.01)
    state = TrainState()
    assert lr_at(0, cfg, state, steps_per_epoch=10, total_steps=100, lr_scale=1.0) == pytest.approx(1e-4)
    assert lr_at(10, cfg, state, 10, 100, 1.0) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert lr_at(20, cfg, state, 10, 100, 1.0) == pytest.approx(1e-3)
    assert lr_at(100, cfg, state, 10, 100, 1.0) == pytest.approx(1e-5)
    assert lr_at(20, cfg, state, 10, 100, lr_scale=0.5) == pytest.approx(5e-4)  # the guard's backoff
    plateau = Config(lr=1e-3, warmup_epochs=2, scheduler="plateau", min_lr_factor=0.01)
    state.plateau_factor = 0.25
    assert lr_at(50, plateau, state, 10, 100, 1.0) == pytest.approx(2.5e-4)
    state.plateau_factor = 1e-4
    assert lr_at(50, plateau, state, 10, 100, 1.0) == pytest.approx(1e-5)  # floored at min_lr_factor


def test_plateau_cuts_the_lr_after_patience_bad_epochs():
    cfg = Config(plateau_patience=2, plateau_factor=0.5)
    state = TrainState()
    for rmse in [20.0, 18.0, 18.5, 19.0]:  # two bad epochs: still within patience
        step_plateau(state, rmse, cfg)
    assert state.plateau_factor == 1.0 and state.plateau_best == 18.0
    step_plateau(state, 18.2, cfg)  # the third bad epoch
    assert state.plateau_factor == 0.5 and state.plateau_bad_epochs == 0
    step_plateau(state, 17.0, cfg)
    assert state.plateau_best == 17.0 and state.plateau_factor == 0.5


def test_adaptive_weight_decay():
    cfg = Config()
    factors = [milestone_factor(e, cfg.wd_decay_epochs, cfg.wd_decay_factors) for e in [0, 99, 100, 199, 200, 500]]
    assert factors == [1, 1, 0.5, 0.5, 0.1, 0.1]


def test_no_weight_decay_on_biases_and_norm_weights():
    model = DualTaskNet(14, Config(gru_layers=1))
    decay, no_decay = param_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert id(model.norm.weight) in no_decay_ids and id(model.rul_head[0].bias) in no_decay_ids
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_amnl_divides_each_task_by_its_running_average():
    loss_fn = AMNLLoss(Config(amnl_decay=0.9, failure_weight=0.0, rul_loss_weight=0.5), device="cpu")
    rul_pred, rul_true = torch.tensor([0.5, 0.5]), torch.tensor([0.0, 1.0])  # MSE 0.25
    logits, labels = torch.zeros(2, 3), torch.tensor([0, 2])  # cross-entropy ln 3
    total, parts = loss_fn(rul_pred, rul_true, logits, labels)
    torch.testing.assert_close(parts, torch.tensor([0.25, math.log(3)]))
    assert total.item() == pytest.approx(1.0)  # first step: each loss divided by itself (bias-corrected)
    total, _ = loss_fn(rul_pred * 2, rul_true, logits, labels)  # RUL loss now 0.5
    avg_rul = (0.9 * 0.1 * 0.25 + 0.1 * 0.5) / (1 - 0.9**2)
    assert total.item() == pytest.approx(0.5 * 0.5 / avg_rul + 0.5 * 1.0, rel=1e-5)
    # A NaN batch does not poison the averages.
    before = loss_fn.averages.clone()
    loss_fn(torch.tensor([float("nan"), 0.0]), rul_true, logits, labels)
    assert loss_fn.averages[0] == before[0] and torch.isfinite(loss_fn.averages).all()


def test_amnl_counts_only_the_updates_that_happened_and_resume_keeps_the_count():
    """A non-finite first batch leaves the averages at zero and must not advance the bias correction: the next
    (finite) batch is then the first real update, so each loss is divided by itself again (total 1.0, not the
    1.9 that a counter of 2 would give: 0.1 x / (1 - 0.9**2) = 0.53 x)."""
    cfg = Config(amnl_decay=0.9, failure_weight=0.0, rul_loss_weight=0.5)
    loss_fn = AMNLLoss(cfg, device="cpu")
    rul_pred, rul_true = torch.tensor([0.5, 0.5]), torch.tensor([0.0, 1.0])  # MSE 0.25
    logits, labels = torch.zeros(2, 3), torch.tensor([0, 2])  # cross-entropy ln 3
    total, _ = loss_fn(torch.tensor([float("nan"), 0.5]), rul_true, logits.log(), labels)  # both losses non-finite
    assert not torch.isfinite(total) and loss_fn.averages.tolist() == [0.0, 0.0]
    total, _ = loss_fn(rul_pred, rul_true, logits, labels)
    assert total.item() == pytest.approx(1.0)
    resumed = AMNLLoss(cfg, device="cpu")
    resumed.load_state_dict(loss_fn.state_dict())
    avg_rul = (0.9 * 0.1 * 0.25 + 0.1 * 0.5) / (1 - 0.9**2)  # the second real update: RUL loss 0.5
    for fn in (loss_fn, resumed):
        total, _ = fn(rul_pred * 2, rul_true, logits, labels)
        assert total.item() == pytest.approx(0.5 * 0.5 / avg_rul + 0.5 * 1.0, rel=1e-5)
    # One task non-finite, the other not: each task counts its own updates.
    loss_fn = AMNLLoss(cfg, device="cpu")
    loss_fn(torch.tensor([float("nan"), 0.5]), rul_true, logits, labels)
    assert loss_fn.updates.tolist() == [0.0, 1.0]
    total, _ = loss_fn(rul_pred, rul_true, logits, labels)
    health_avg = (0.9 * 0.1 * math.log(3) + 0.1 * math.log(3)) / (1 - 0.9**2)
    assert total.item() == pytest.approx(0.5 * 1.0 + 0.5 * math.log(3) / health_avg, rel=1e-5)


def test_failure_weighting_emphasises_errors_near_the_end_of_life():
    loss_fn = AMNLLoss(Config(failure_weight=1.0), device="cpu")
    logits, labels = torch.zeros(2, 3), torch.tensor([0, 2])
    _, near_failure = loss_fn(torch.tensor([0.1, 1.0]), torch.tensor([0.0, 1.0]), logits, labels)
    _, healthy = loss_fn(torch.tensor([0.0, 0.9]), torch.tensor([0.0, 1.0]), logits, labels)
    assert near_failure[0] > healthy[0]  # the same 0.1 error costs more at RUL 0 than at the cap


def test_phm08_score_penalises_late_predictions_more():
    true = torch.tensor([50.0])
    assert phm08_score(true + 10, true) == pytest.approx(math.exp(1) - 1)
    assert phm08_score(true - 13, true) == pytest.approx(math.exp(1) - 1)
    assert phm08_score(true + 10, true) > phm08_score(true - 10, true)
    assert phm08_score(true, true) == 0.0
    # Some 900 cycles late (a large --rul_cap, an untrained model) overflows float32: no score, not Infinity,
    # which would make results.json invalid JSON (a hypothesis draw of test_bad_input.py found it).
    assert phm08_score(true + 1_000, true) is None and phm08_score(true + 800, true) > 1e34
