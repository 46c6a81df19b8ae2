"""Atomic checkpoints: complete or invisible, the newest found without trusting folder names, old ones pruned."""

import dataclasses
import json

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from common.checkpoint import LoopState, check_fits, load_checkpoint, resolve_resume, save_checkpoint
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
    path = save_checkpoint(accelerator, tmp_path, LoopState(step=5), {"counter": counter}, Geometry())
    saved_weight = model.weight.detach().clone()

    with torch.no_grad():
        model.weight.zero_()
    fresh = Counter()
    state = LoopState()
    load_checkpoint(accelerator, path, state, {"counter": fresh}, Geometry())
    assert state.step == 5 and fresh.note == "saved" and torch.equal(fresh.value, torch.full((3,), 7.0))
    assert torch.equal(model.weight, saved_weight)
    assert optimizer.state_dict()["state"][0]["step"] == 1


def test_keeps_the_last_n_and_points_latest_at_the_newest(tmp_path, accelerator):
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    for step in [10, 20, 30, 40]:
        save_checkpoint(accelerator, tmp_path, LoopState(step=step), {}, Geometry(keep_checkpoints=2))
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["step_00000030", "step_00000040"]
    assert resolve_resume(tmp_path, "latest").name == "step_00000040"
    assert (tmp_path / "checkpoints" / "LATEST").read_text() == "step_00000040"
    del model


def test_the_best_checkpoint_is_kept_besides_the_last_n(tmp_path, accelerator):
    accelerator.prepare(torch.nn.Linear(2, 2))
    root = tmp_path / "checkpoints"
    for step, best in [(10, True), (20, False), (30, True), (40, False), (50, False), (60, False)]:
        save_checkpoint(accelerator, tmp_path, LoopState(step=step), {}, Geometry(keep_checkpoints=2), best=best)
        if step == 40:  # the best so far (30) is also one of the last two
            assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_00000030", "step_00000040"]
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_00000030", "step_00000050", "step_00000060"]
    assert (root / "BEST").read_text() == "step_00000030"
    assert resolve_resume(tmp_path, "latest").name == "step_00000060"


def test_an_interrupted_save_is_ignored(tmp_path, accelerator):
    accelerator.prepare(torch.nn.Linear(2, 2))
    save_checkpoint(accelerator, tmp_path, LoopState(step=10), {}, Geometry())
    root = tmp_path / "checkpoints"
    # A kill during the next save leaves a temporary folder (and maybe a folder without meta.json).
    (root / ".tmp_step_00000020").mkdir()
    (root / "step_00000030").mkdir()
    (root / "step_00000030" / "model.safetensors").write_bytes(b"half a file")
    assert resolve_resume(tmp_path, "latest").name == "step_00000010"
    # Even if LATEST is lost, the newest complete checkpoint is found by its meta.json step.
    (root / "LATEST").unlink()
    (root / "renamed_by_hand").mkdir()
    (root / "renamed_by_hand" / "meta.json").write_text(json.dumps({"step": 5, "num_processes": 1}))
    assert resolve_resume(tmp_path, "latest").name == "step_00000010"


def test_resolve_resume(tmp_path):
    assert resolve_resume(tmp_path, None) is None
    assert resolve_resume(tmp_path, "latest") is None  # nothing saved yet: start fresh
    with pytest.raises(UserError, match="not a complete checkpoint folder"):
        resolve_resume(tmp_path, str(tmp_path / "nope"))


def test_a_checkpoint_of_another_kind_of_launch_or_an_older_version_is_refused(tmp_path, accelerator):
    accelerator.prepare(torch.nn.Linear(2, 2))
    path = save_checkpoint(accelerator, tmp_path, LoopState(step=1), {}, Geometry())
    meta = json.loads((path / "meta.json").read_text())
    assert (meta["num_processes"], meta["sharded"]) == (1, False)
    (path / "meta.json").write_text(json.dumps(meta | {"num_processes": 2, "sharded": True}))
    with pytest.raises(UserError, match="written by an FSDP launch, this is a launch without FSDP .*; resume it with "
                                        "an FSDP launch"):
        check_fits(accelerator, path, Geometry())
    old_files = {"train_state_rank0.pt" if k == "train_state.pt" else k: v for k, v in meta["files"].items()}
    (path / "meta.json").write_text(json.dumps(meta | {"files": old_files}))
    with pytest.raises(UserError, match="written by an older version of this script"):
        check_fits(accelerator, path, Geometry())


@dataclasses.dataclass
class Geometry:  # the settings of a run that checkpoint.py reads
    batch_size: int = 4
    grad_accum_steps: int = 2
    keep_checkpoints: int = 2


def test_the_epoch_goes_on_from_the_same_sample_with_the_global_batch_split_otherwise_and_only_then(
        tmp_path, accelerator, capsys):
    """Stopped 6 micro-batches of 4 into an epoch (3 steps of 8): 24 samples are taken. The global batch of 8 split
    otherwise (--batch_size 8, or 2 with 4 accumulated) continues from sample 24, at step 3; another global batch
    (16) is refused before anything loads, with flags that keep it."""
    accelerator.prepare(torch.nn.Linear(2, 2))
    path = save_checkpoint(accelerator, tmp_path, LoopState(step=3, batches_done=6), {}, Geometry())
    assert json.loads((path / "meta.json").read_text())["samples_into_epoch"] == 24
    for geometry, batches_done in ((Geometry(), 6), (Geometry(8, 1), 3), (Geometry(2, 4), 12)):
        loop = LoopState()
        check_fits(accelerator, path, geometry)
        load_checkpoint(accelerator, path, loop, {}, geometry)
        assert (loop.batches_done, loop.step, accelerator.step) == (batches_done, 3, batches_done)
        line = (f"continued on 1; the global batch stays 8 (--batch_size {geometry.batch_size} x 1 x "
                f"--grad_accum_steps {geometry.grad_accum_steps}); the epoch goes on from sample 24, each sample once")
        assert (line in capsys.readouterr().out) == (geometry != Geometry())
    for geometry, fix in ((Geometry(8, 2), "--grad_accum_steps 1 with --batch_size 8"),
                          (Geometry(3, 1), "--batch_size 8 --grad_accum_steps 1")):
        new = geometry.batch_size * geometry.grad_accum_steps
        with pytest.raises(UserError, match=rf"trained with a global batch of 8 \(--batch_size 4 x 1 processes x "
                                            rf"--grad_accum_steps 2\), this run's would be {new}; .* e.g. {fix}$"):
            check_fits(accelerator, path, geometry)


def epoch_as_seen(num_samples: int, batch_size: int, processes: int, skip: int = 0, take: int | None = None) -> list:
    """The samples an epoch's prepared loaders give, step by step (rank 0's batch, then rank 1's ...), after skipping
    `skip` batches per process: Accelerate's own sharding, seeded sampler and skip, as the scripts run them."""
    from accelerate.data_loader import prepare_data_loader, skip_first_batches

    per_rank = []
    for rank in range(processes):
        torch.manual_seed(3)  # the sampler's seed: the scripts' set_seed before prepare
        loader = torch.utils.data.DataLoader(list(range(num_samples)), batch_size=batch_size, shuffle=True,
                                             generator=torch.Generator().manual_seed(3))
        loader = prepare_data_loader(loader, num_processes=processes, process_index=rank, put_on_device=False,
                                     use_seedable_sampler=True)
        loader.set_epoch(2)
        per_rank.append([b.tolist() for b in (skip_first_batches(loader, skip) if skip else loader)][:take])
    return [i for step in zip(*per_rank, strict=True) for batch in step for i in batch]


@settings(max_examples=40, deadline=None)
@given(st.integers(20, 300), st.integers(1, 16), st.integers(1, 3), st.integers(1, 4), st.data())
def test_a_position_kept_in_samples_continues_the_epoch_on_any_number_of_processes(num_samples, batch_size, processes,
                                                                                  new_processes, data):
    """What load_checkpoint does on another number of processes (or split of the global batch): it skips
    samples_into_epoch // (batch_size x processes) batches per process. Then the samples taken before and after
    are the epoch's shuffled order, each sample once; only Accelerate's usual padding of the last global batch (the
    epoch's first samples again, so that every process gets a full batch) repeats any."""
    rounds = -(-num_samples // (batch_size * processes))  # global batches of the old run
    done = data.draw(st.integers(0, rounds - 1))  # a mid-epoch checkpoint: the last round is never one
    samples = done * batch_size * processes
    fitting = [d for d in range(1, 4 * batch_size + 1) if samples % (d * new_processes) == 0]
    assume(fitting)  # (a real resume also keeps the global batch: test_the_epoch_goes_on_from_the_same...)
    new_batch = data.draw(st.sampled_from(fitting))
    before = epoch_as_seen(num_samples, batch_size, processes, take=done)
    after = epoch_as_seen(num_samples, new_batch, new_processes, skip=samples // (new_batch * new_processes))
    order = epoch_as_seen(num_samples, num_samples, 1)  # the whole shuffled epoch as one batch
    assert before == order[:samples]
    assert after[:num_samples - samples] == order[samples:]
    assert after[num_samples - samples:] == order[:len(after) - (num_samples - samples)]  # the padding only
    assert len(after) - (num_samples - samples) < new_batch * new_processes
