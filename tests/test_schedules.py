import math

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup

from common.schedules import linear_warmup, set_lr, warmup_cosine


def test_warmup_cosine_equals_transformers_where_the_shapes_match():
    warmup, total = 7, 50
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hf = get_cosine_schedule_with_warmup(opt, num_warmup_steps=warmup, num_training_steps=total)
    for step in range(total + 1):  # past the end transformers climbs back up; ours holds the floor
        assert warmup_cosine(step, warmup, total) == pytest.approx(hf.lr_lambdas[0](step), abs=1e-12)


def test_warmup_cosine_values():
    assert warmup_cosine(0, 10, 110, start_factor=0.1) == pytest.approx(0.1)
    assert warmup_cosine(5, 10, 110, start_factor=0.1) == pytest.approx(0.55)
    assert warmup_cosine(10, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110) == pytest.approx(0.5)  # half way through the cosine
    assert warmup_cosine(110, 10, 110, final_factor=0.01) == pytest.approx(0.01)
    assert warmup_cosine(500, 10, 110, final_factor=0.01) == pytest.approx(0.01)  # held after the end
    # strictly decreasing after warmup
    values = [warmup_cosine(s, 10, 110) for s in range(10, 111)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_linear_warmup_and_no_warmup():
    assert linear_warmup(0, 4, 0.0) == 0.0
    assert linear_warmup(2, 4, 0.0) == 0.5
    assert linear_warmup(4, 4, 0.0) == 1.0
    assert linear_warmup(0, 0, 0.1) == 1.0  # zero warmup steps: full LR at once
    assert warmup_cosine(0, 0, 10) == 1.0
    assert warmup_cosine(5, 0, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_set_lr_writes_every_group_with_its_scale():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b], "lr_scale": 0.1}], lr=1.0)
    set_lr(opt, 0.02)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.02, 0.002])
