import torch

from common.ema import EMA


def test_ema_matches_a_hand_computation():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    ema = EMA(list(model.parameters()) + [frozen], decay=0.9, warmup=False)
    assert len(ema.shadow) == 2  # trainable parameters only
    expected = [p.detach().clone() for p in model.parameters()]
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        expected = [0.9 * e + 0.1 * p.detach() for e, p in zip(expected, model.parameters())]
    for avg, exp in zip(ema.shadow, expected):
        torch.testing.assert_close(avg, exp, rtol=0, atol=1e-6)


def test_ema_warmup_decay_grows_towards_the_target():
    ema = EMA(torch.nn.Linear(2, 2).parameters(), decay=0.999, warmup=True)
    decays = []
    for _ in range(3):
        decays.append(ema.current_decay())
        ema.update()
    assert decays == [1 / 10, 2 / 11, 3 / 12]


def test_swapped_in_evaluates_with_the_average_and_restores_exactly():
    model = torch.nn.Linear(4, 1)
    ema = EMA(model.parameters(), decay=0.5, warmup=False)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    training_weight = model.weight.detach().clone()
    with ema.swapped_in():
        torch.testing.assert_close(model.weight.detach(), ema.shadow[0])
        assert not torch.equal(model.weight, training_weight)
    assert torch.equal(model.weight, training_weight)


def test_state_dict_round_trip():
    model = torch.nn.Linear(4, 1)
    ema = EMA(model.parameters(), decay=0.9)
    ema.update()
    state = ema.state_dict()
    other = EMA(torch.nn.Linear(4, 1).parameters(), decay=0.5)
    other.load_state_dict(state)
    assert other.num_updates == 1 and other.decay == 0.9
    for a, b in zip(ema.shadow, other.shadow):
        assert torch.equal(a, b)
