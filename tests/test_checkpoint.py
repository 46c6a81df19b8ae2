"""Atomic checkpoints: complete or invisible, the newest found without trusting folder names, old ones pruned."""

import json

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from common.checkpoint import find_latest_checkpoint, load_checkpoint, resolve_resume, save_checkpoint
from common.errors import UserError


class Counter:
    def __init__(self):
        self.value = torch.zeros(3)
        self.note = "start"

    def state_dict(self):
        return {"value": self.value.clone(), "note": self.note}

    def load_state_dict(self, state):
        self.value, self.note = state["value"], state["note"]


@pytest.fixture
def accelerator():
    AcceleratorState._reset_state(True)
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(True)


def test_save_load_round_trip_restores_model_optimizer_and_state(tmp_path, accelerator):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    counter = Counter()
    counter.value += 7
    counter.note = "saved"
    path = save_checkpoint(accelerator, tmp_path, step=5, state={"counter": counter})
    saved_weight = model.weight.detach().clone()

    with torch.no_grad():
        model.weight.zero_()
    fresh = Counter()
    meta = load_checkpoint(accelerator, path, {"counter": fresh})
    assert meta["step"] == 5 and fresh.note == "saved" and torch.equal(fresh.value, torch.full((3,), 7.0))
    assert torch.equal(model.weight, saved_weight)
    assert optimizer.state_dict()["state"][0]["step"] == 1


def test_keeps_the_last_n_and_points_latest_at_the_newest(tmp_path, accelerator):
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    for step in [10, 20, 30, 40]:
        save_checkpoint(accelerator, tmp_path, step, {}, keep_last=2)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["step_00000030", "step_00000040"]
    assert find_latest_checkpoint(tmp_path).name == "step_00000040"
    del model


def test_the_best_checkpoint_is_kept_besides_the_last_n(tmp_path, accelerator):
    accelerator.prepare(torch.nn.Linear(2, 2))
    root = tmp_path / "checkpoints"
    for step, best in [(10, True), (20, False), (30, True), (40, False), (50, False), (60, False)]:
        save_checkpoint(accelerator, tmp_path, step, {}, keep_last=2, best=best)
        if step == 40:  # the best so far (30) is also one of the last two
            assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_00000030", "step_00000040"]
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_00000030", "step_00000050", "step_00000060"]
    assert (root / "BEST").read_text() == "step_00000030"
    assert find_latest_checkpoint(tmp_path).name == "step_00000060"


def test_an_interrupted_save_is_ignored(tmp_path, accelerator):
    accelerator.prepare(torch.nn.Linear(2, 2))
    save_checkpoint(accelerator, tmp_path, 10, {})
    root = tmp_path / "checkpoints"
    # A kill during the next save leaves a temporary folder (and maybe a folder without meta.json).
    (root / ".tmp_step_00000020").mkdir()
    (root / "step_00000030").mkdir()
    (root / "step_00000030" / "model.safetensors").write_bytes(b"half a file")
    assert find_latest_checkpoint(tmp_path).name == "step_00000010"
    # Even if LATEST is lost, the newest complete checkpoint is found by its meta.json step.
    (root / "LATEST").unlink()
    (root / "renamed_by_hand").mkdir()
    (root / "renamed_by_hand" / "meta.json").write_text(json.dumps({"step": 5, "num_processes": 1}))
    assert find_latest_checkpoint(tmp_path).name == "step_00000010"


def test_resolve_resume(tmp_path):
    assert resolve_resume(tmp_path, None) is None
    assert resolve_resume(tmp_path, "latest") is None  # nothing saved yet: start fresh
    with pytest.raises(UserError, match="not a complete checkpoint folder"):
        resolve_resume(tmp_path, str(tmp_path / "nope"))


def test_a_checkpoint_from_another_world_size_is_refused(tmp_path, accelerator):
    accelerator.prepare(torch.nn.Linear(2, 2))
    path = save_checkpoint(accelerator, tmp_path, 1, {})
    (path / "meta.json").write_text(json.dumps({"step": 1, "num_processes": 2}))
    with pytest.raises(UserError, match="written by 2 processes"):
        load_checkpoint(accelerator, path, {})


class Payload:
    """What a tampered checkpoint could smuggle in: unpickling it would run code."""

    def __reduce__(self):
        return (print, ("this ran while loading a checkpoint",))


def test_loop_state_is_loaded_with_weights_only(tmp_path, accelerator):
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    path = save_checkpoint(accelerator, tmp_path, 1, {"counter": Counter()})
    torch.save({"counter": {"value": Payload(), "note": "x"}}, path / "train_state_rank0.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        load_checkpoint(accelerator, path, {"counter": Counter()})
    del model
