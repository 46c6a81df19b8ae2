"""The bad-input contract, for both scripts, tested on generated input (hypothesis) and on each class of problem.

Bad input (a setting outside its domain, a corrupt data file, manifest, image or checkpoint, a model
that is not one) ends a run with exit code 2 and exactly one `error: <problem>; <fix>` line on stderr,
no traceback, and nothing the user owns changed: an existing run folder stays byte-identical. Values
inside the domains either run or are refused the same way (or, if training diverges, exit 3 with one
line): never a traceback.

The runs call each script's `main()` in this process, through the same `exit_on_user_error` as the
command line, on small data (10 C-MAPSS training engines; 32 screenshots and a tiny LLaVA).
"""

import contextlib
import dataclasses
import io
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import predict_dual_task
import predict_llava
import train_dual_task
import train_llava
from common.config import IDENTIFIER, NON_EMPTY, field_type
from common.errors import exit_on_user_error

REPO = Path(__file__).resolve().parents[1]
SCALE = 10 if os.environ.get("HYPOTHESIS_PROFILE") == "explore" else 1  # more examples when exploring
UNIQUE = itertools.count()  # folder names for the examples of one test (they share its tmp_path)


# ----------------------------------------------------------------------------------------------
# Running a script as the command line does, and the contract
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]


def run(script, *args) -> Outcome:
    """script.main(args) in this process, as `python script.py args` would run it: exit code and output."""
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            exit_on_user_error(lambda: script.main([str(a) for a in args]))
    except SystemExit as exit_:
        code = exit_.code
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        torch.set_num_threads(threads)
    return Outcome(code, out.getvalue(), err.getvalue())


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its bytes: equal snapshots mean nothing was changed, added or removed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} \
        if folder.exists() else {}


def assert_refused(outcome: Outcome, *, untouched: Path | None = None, before: dict | None = None, match: str = ""):
    assert outcome.code == 2, (outcome.code, outcome.stderr[-3000:])
    assert "Traceback" not in outcome.stderr
    assert len(outcome.error_lines) == 1, outcome.stderr[-3000:]
    problem_and_fix = outcome.error_lines[0].removeprefix("error: ")
    assert "; " in problem_and_fix, f"no fix after the problem: {problem_and_fix}"
    assert re.search(match, problem_and_fix), problem_and_fix
    if untouched is not None:
        assert snapshot(untouched) == before, "a refused run changed the folder"


def assert_ran_or_refused(outcome: Outcome, output_dir: Path):
    """Inside the domains: the run finishes with finite results, or stops with one clear line."""
    assert "Traceback" not in outcome.stderr
    if outcome.code == 0:
        results = json.loads((output_dir / "results.json").read_text(), parse_constant=lambda c: pytest.fail(c))
        assert all(math.isfinite(v) for v in results.values() if isinstance(v, float)), results
    else:
        assert outcome.code in (2, 3), (outcome.code, outcome.stderr[-3000:])
        assert len(outcome.error_lines) == 1 and "; " in outcome.error_lines[0], outcome.stderr[-3000:]


# ----------------------------------------------------------------------------------------------
# Values inside and outside each setting's domain, drawn from the Config declarations
# ----------------------------------------------------------------------------------------------

BOOL_WORDS = {"true", "yes", "1", "on", "false", "no", "0", "off"}
words = st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), min_size=1, max_size=12)


def _number_text(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def outside(cls, name: str) -> st.SearchStrategy[str]:
    """Command-line text for a value that field `name` must refuse (for a list: one bad item among good ones)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    scalar, is_list, optional = field_type(cls, f)
    domain, choices = f.metadata.get("domain"), f.metadata.get("choices")
    if scalar is bool:
        bad = words.filter(lambda w: w.lower() not in BOOL_WORDS)
    elif choices:
        bad = words.filter(lambda w: w not in choices and w.lower() not in ("none", "null"))
    elif domain is NON_EMPTY:
        bad = st.sampled_from([" ", "  ", "\t"])
    elif domain is IDENTIFIER:
        bad = words.filter(lambda w: re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", w) is None and "," not in w)
    else:  # numeric: past either bound, not finite, or not a number of the right type
        number = st.integers if scalar is int else st.floats
        edges = [number(max_value=domain.low - (0 if domain.low_open else 1e-9 if scalar is float else 1))]
        if domain.high != math.inf:
            edges.append(number(min_value=domain.high + (0 if domain.high_open else 1e-9 if scalar is float else 1)))
        bad = st.one_of(*[e.map(_number_text) for e in edges],
                        st.sampled_from(["nan", "inf", "-inf", "1e999", "ten", "1,5" if not is_list else "x"]),
                        st.just("2.5") if scalar is int else st.nothing())
        bad = bad.filter(lambda text: not (optional and text.lower() in ("none", "null")))
    if is_list:
        return bad.filter(lambda w: "," not in w and w.strip() != "").map(lambda w: w)
    return bad


def inside(cls, name: str, caps: dict) -> st.SearchStrategy[str]:
    """Command-line text for a value inside field `name`'s domain (numbers up to `caps[name]`, to stay quick)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    scalar, is_list, _ = field_type(cls, f)
    domain, choices = f.metadata.get("domain"), f.metadata.get("choices")
    if scalar is bool:
        item = st.sampled_from(["true", "false"])
    elif choices:
        item = st.sampled_from(choices)
    elif domain is IDENTIFIER:
        item = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
    elif domain is NON_EMPTY:
        item = words.filter(lambda w: w.strip() and not w.startswith("-") and "," not in w)
    else:
        high = min(domain.high, caps.get(name, 10**9))
        if scalar is int:
            low = math.floor(domain.low) + (1 if domain.low_open else 0)
            item = st.integers(low, int(high) - (1 if domain.high_open and high == domain.high else 0)).map(str)
        else:
            item = st.floats(domain.low, high, exclude_min=domain.low_open, allow_infinity=False,
                             exclude_max=domain.high_open and high == domain.high).map(repr)
    if is_list:
        return st.lists(item, max_size=4).map(",".join)
    return item


def fields_of(cls, skip=()) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name not in skip]


SCRIPTS = [train_dual_task, train_llava, predict_dual_task, predict_llava]
REQUIRED = {predict_dual_task: {"run_dir": "run", "data": "x.txt"}, predict_llava: {"run_dir": "run", "data": "x"}}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_every_setting_has_a_domain_and_its_default_is_inside(script):
    cls = script.Config
    for f in dataclasses.fields(cls):
        scalar, _, _ = field_type(cls, f)
        assert scalar is bool or f.metadata.get("domain") or f.metadata.get("choices"), f"--{f.name} has no domain"
    cls(**REQUIRED.get(script, {}))  # the defaults pass their own checks (a predict script needs its run and data)


@settings(max_examples=40 * SCALE)
@given(data=st.data())
def test_the_predict_scripts_refuse_every_out_of_domain_setting_with_one_line(tmp_path, data):
    script = data.draw(st.sampled_from([predict_dual_task, predict_llava]), label="script")
    name = data.draw(st.sampled_from(fields_of(script.Config)), label="setting")
    value = data.draw(outside(script.Config, name), label="value")
    required = [arg for key, default in REQUIRED[script].items() if key != name for arg in (f"--{key}", default)]
    outcome = run(script, *required, f"--{name}", value, "--output", tmp_path / "p" if name != "output" else value)
    assert_refused(outcome, match=re.escape(name))
    assert not (tmp_path / "p").exists()


# ----------------------------------------------------------------------------------------------
# train_dual_task.py on 10 training engines
# ----------------------------------------------------------------------------------------------

TINY_NET = ["--conv_channels", 8, "--hidden_size", 8, "--gru_layers", 1, "--batch_size", 64, "--log_every", 1]


def dual_args(data: Path, output_dir: Path, *extra):
    return ["--data", f"{data}/FD001", *TINY_NET, "--output_dir", output_dir, *extra]


@pytest.fixture(scope="module")
def finished_dual_run(small_cmapss, tmp_path_factory) -> Path:
    """A finished run with several checkpoints (2 epochs of 23 steps, one every 5 steps, all kept)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    outcome = run(train_dual_task, *dual_args(small_cmapss, out, "--epochs", 2, "--checkpoint_every", 5,
                                               "--keep_checkpoints", 100))
    assert outcome.code == 0, outcome.stderr[-3000:]
    return out


@settings(max_examples=100 * SCALE)
@given(data=st.data())
def test_dual_task_refuses_every_out_of_domain_setting_and_leaves_the_run_alone(finished_dual_run, data):
    name = data.draw(st.sampled_from(fields_of(train_dual_task.Config)), label="setting")
    value = data.draw(outside(train_dual_task.Config, name), label="value")
    before = snapshot(finished_dual_run)
    outcome = run(train_dual_task, "--output_dir", finished_dual_run, "--resume_from", "latest", f"--{name}", value)
    assert_refused(outcome, untouched=finished_dual_run, before=before, match=re.escape(name))


DUAL_CAPS = {"conv_channels": 64, "hidden_size": 64, "gru_layers": 3, "epochs": 2, "max_steps": 30,
             "kernel_size": 16}


@settings(max_examples=15 * SCALE)
@given(data=st.data())
def test_dual_task_runs_or_refuses_every_in_domain_setting(small_cmapss, tmp_path, data):
    name = data.draw(st.sampled_from(fields_of(train_dual_task.Config, skip=("output_dir", "resume_from"))),
                     label="setting")
    value = data.draw(inside(train_dual_task.Config, name, DUAL_CAPS), label="value")
    out = tmp_path / f"run{next(UNIQUE)}"
    outcome = run(train_dual_task, *dual_args(small_cmapss, out, "--epochs", 1, "--max_steps", 3), f"--{name}", value)
    assert_ran_or_refused(outcome, out)


def corrupt_text(data, text: str) -> bytes:
    """One of the ways a data file goes bad: cut short, garbage bytes, a bad value, a row lost or moved."""
    lines = text.splitlines(keepends=True)
    how = data.draw(st.sampled_from(["truncate", "bytes", "token", "drop", "duplicate", "swap", "columns", "empty"]),
                    label="corruption")
    if how == "truncate":
        return text.encode()[: data.draw(st.integers(0, len(text) - 1))]
    if how == "bytes":
        at = data.draw(st.integers(0, len(text) - 1))
        return text.encode()[:at] + data.draw(st.binary(min_size=1, max_size=16)) + text.encode()[at:]
    if how == "empty":
        return b""
    i, j = data.draw(st.integers(0, len(lines) - 1)), data.draw(st.integers(0, len(lines) - 1))
    if how == "token":
        tokens = lines[i].split()
        tokens[data.draw(st.integers(0, len(tokens) - 1))] = data.draw(
            st.sampled_from(["nan", "inf", "-1", "1e999", "x", "", "0.5", "-0"]))
        lines[i] = " ".join(tokens) + "\n"
    elif how == "drop":
        del lines[i]
    elif how == "duplicate":
        lines.insert(j, lines[i])
    elif how == "swap":
        lines[i], lines[j] = lines[j], lines[i]
    elif how == "columns":
        lines[i] = " ".join(lines[i].split()[: data.draw(st.integers(0, 30))]) + "\n"
    return "".join(lines).encode()


@settings(max_examples=25 * SCALE)
@given(data=st.data())
def test_dual_task_refuses_corrupt_data_files_before_writing_anything(small_cmapss, tmp_path, data):
    folder = tmp_path / f"data{next(UNIQUE)}"
    shutil.copytree(small_cmapss, folder)
    victim = folder / data.draw(st.sampled_from(["train_FD001.txt", "test_FD001.txt", "RUL_FD001.txt"]), label="file")
    victim.write_bytes(corrupt_text(data, victim.read_text()))
    out = folder / "run"
    outcome = run(train_dual_task, *dual_args(folder, out, "--max_steps", 2))
    assert_ran_or_refused(outcome, out)
    if outcome.code == 2:
        assert not out.exists(), "a refused run created its output folder"


@pytest.mark.parametrize("setting, value", [
    ("hidden_size", 16), ("gru_layers", 2), ("window", 20), ("sensors", "2,3,4"), ("seed", 1),
    ("cycle_feature", "false"), ("data", "FD002"), ("health_thresholds", "60,20"),
])
def test_dual_task_resume_with_settings_that_do_not_fit_is_refused(finished_dual_run, small_cmapss, setting, value):
    before = snapshot(finished_dual_run)
    outcome = run(train_dual_task, *dual_args(small_cmapss, finished_dual_run, "--resume_from", "latest"),
                  f"--{setting}", value)
    assert_refused(outcome, untouched=finished_dual_run, before=before,
                   match=rf"was trained with --{setting} .*; resume with --{setting} ")


@settings(max_examples=12 * SCALE)
@given(data=st.data())
def test_a_damaged_newest_checkpoint_is_skipped_and_the_run_still_ends_bit_identical(finished_dual_run, small_cmapss,
                                                                                      tmp_path, data):
    """Resuming the finished run after damaging its newest checkpoint: it warns, goes back to the newest intact
    checkpoint, trains the steps again and ends with exactly the same weights."""
    out = tmp_path / f"run{next(UNIQUE)}"
    shutil.copytree(finished_dual_run, out)
    newest = max((out / "checkpoints").glob("step_*"))
    victim = newest / data.draw(st.sampled_from(sorted(p.name for p in newest.iterdir())), label="file")
    original = victim.read_bytes()
    how = data.draw(st.sampled_from(["truncate", "flip", "delete"] if victim.name != "meta.json" else ["truncate"]))
    if how == "truncate":
        victim.write_bytes(original[: data.draw(st.integers(0, len(original) - 1))])
    elif how == "flip":
        at = data.draw(st.integers(0, len(original) - 1))
        victim.write_bytes(original[:at] + bytes([original[at] ^ 0xFF]) + original[at + 1:])
    else:
        victim.unlink()
    outcome = run(train_dual_task, *dual_args(small_cmapss, out, "--epochs", 2, "--checkpoint_every", 5,
                                              "--keep_checkpoints", 100, "--resume_from", "latest"))
    assert outcome.code == 0, outcome.stderr[-3000:]
    assert f"warning: checkpoint {newest} is damaged" in outcome.stderr
    assert (out / "model.safetensors").read_bytes() == (finished_dual_run / "model.safetensors").read_bytes()


def test_a_damaged_checkpoint_named_by_path_is_refused_with_the_intact_one_named(finished_dual_run, small_cmapss,
                                                                                  tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_dual_run, out)
    newest, *older = sorted((out / "checkpoints").glob("step_*"), reverse=True)
    (newest / "optimizer.bin").write_bytes((newest / "optimizer.bin").read_bytes()[:100])
    before = snapshot(out)
    outcome = run(train_dual_task, *dual_args(small_cmapss, out, "--resume_from", newest))
    assert_refused(outcome, untouched=out, before=before,
                   match=r"optimizer.bin has 100 bytes, .* were written; "
                         rf"pass --resume_from {re.escape(str(older[0]))}")


@pytest.mark.parametrize("bad", ["binary", "latin-1", "folder", "not a mapping"])
def test_a_config_file_that_is_not_yaml_text_is_one_line(tmp_path, bad):
    path = tmp_path / "config.yaml"
    if bad == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    elif bad == "latin-1":
        path.write_bytes("question: caf\xe9\n".encode("latin-1"))
    elif bad == "folder":
        path.mkdir()
    else:
        path.write_text("[1, 2]\n")
    for script in (train_dual_task, train_llava):
        assert_refused(run(script, "--config", path, "--output_dir", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_one_training_engine_or_no_engine_left_for_training_names_the_split(small_cmapss, tmp_path):
    table = np.loadtxt(small_cmapss / "train_FD001.txt")
    shutil.copytree(small_cmapss, tmp_path / "one")
    np.savetxt(tmp_path / "one" / "train_FD001.txt", table[table[:, 0] == 1], fmt="%g")
    assert_refused(run(train_dual_task, *dual_args(tmp_path / "one", tmp_path / "out")),
                   match=r"has 1 unit\(s\) and --val_fraction 0.2 holds out 1 for validation, leaving none to train on")
    assert_refused(run(train_dual_task, *dual_args(small_cmapss, tmp_path / "out", "--val_fraction", "0.99")),
                   match=r"has 10 unit\(s\) and --val_fraction 0.99 holds out 10")


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_refused_overwrite_keeps_the_old_run_and_an_accepted_one_replaces_it(finished_dual_run, small_cmapss,
                                                                              tmp_path, overwrite):
    out = tmp_path / "run"
    shutil.copytree(finished_dual_run, out)
    (out / "notes.txt").write_text("the user's own file")
    before = snapshot(out)
    assert_refused(run(train_dual_task, *dual_args(small_cmapss, out, "--overwrite", "true", "--window", 1000)),
                   untouched=out, before=before, match="fewer than --window 1000")
    if overwrite:
        outcome = run(train_dual_task, *dual_args(small_cmapss, out, "--overwrite", "true", "--max_steps", 3))
        assert outcome.code == 0, outcome.stderr[-3000:]
        # The old run's outputs are gone (no stale checkpoint to resume by mistake); the user's file is not.
        assert [p.name for p in (out / "checkpoints").glob("step_*")] == ["step_00000003"]
        assert json.loads((out / "results.json").read_text())["optimizer_steps"] == 3
        assert (out / "notes.txt").read_text() == "the user's own file"


# ----------------------------------------------------------------------------------------------
# Finishing and signals: a run that trained to the end resumes to its final phase only
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stop", ["max_steps at an epoch end", "early stopping"])
def test_resuming_a_run_that_finished_training_trains_no_more(small_cmapss, tmp_path, stop):
    args = ["--max_steps", 23, "--epochs", 3] if stop == "max_steps at an epoch end" else \
        ["--epochs", 6, "--early_stopping_patience", 1, "--lr", 1.0, "--warmup_epochs", 0]  # stops after epoch 2
    first = run(train_dual_task, *dual_args(small_cmapss, tmp_path / "run", *args))
    assert first.code == 0, first.stderr[-3000:]
    weights = (tmp_path / "run" / "model.safetensors").read_bytes()
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    if stop == "early stopping":
        assert results["epochs_run"] < 6, "the run did not stop early; the test needs another setting"
    again = run(train_dual_task, *dual_args(small_cmapss, tmp_path / "run", *args, "--resume_from", "latest"))
    assert again.code == 0, again.stderr[-3000:]
    resumed = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (resumed["optimizer_steps"], resumed["epochs_run"]) == (results["optimizer_steps"], results["epochs_run"])
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == weights


@pytest.mark.parametrize("script", ["dual_task", "llava"])
def test_sigterm_during_the_final_evaluation_finishes_it_and_exits_0(script, small_cmapss, llava_inputs, tmp_path,
                                                                    monkeypatch):
    module = train_dual_task if script == "dual_task" else train_llava
    args = dual_args(small_cmapss, tmp_path / "plain", "--epochs", 1) if script == "dual_task" else \
        llava_args(llava_inputs, tmp_path / "plain", "--test_data", llava_inputs[1] / "test.jsonl")
    plain = run(module, *args)
    assert plain.code == 0, plain.stderr[-3000:]
    real_evaluate, calls = module.evaluate, {"n": 0}

    def evaluate_with_a_signal_at_the_end(*a, **k):
        calls["n"] += 1
        if calls["n"] == (2 if script == "dual_task" else 3):  # after training: the test set
            signal.raise_signal(signal.SIGTERM)
        return real_evaluate(*a, **k)

    monkeypatch.setattr(module, "evaluate", evaluate_with_a_signal_at_the_end)
    signalled = run(module, *[str(a).replace("plain", "signalled") for a in args])
    assert signalled.code == 0 and "received SIGTERM" in signalled.stderr, signalled.stderr[-3000:]
    a, b = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("plain", "signalled"))
    timing = {"wall_seconds", "peak_memory_mb", "train_samples_per_second"}
    assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}


KILL_IN_FINAL_PHASE = """
import os, signal, sys
import torch
torch.set_num_threads(1)  # as in the in-process runs it is compared with
sys.path.insert(0, {repo!r})
import {module} as script
real, calls = script.evaluate, {{"n": 0}}
def evaluate(*a, **k):
    calls["n"] += 1
    if calls["n"] == {call}:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **k)
script.evaluate = evaluate
script.exit_on_user_error(lambda: script.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("script", ["dual_task", "llava"])
def test_a_kill_during_the_final_phase_resumes_to_the_same_end(script, small_cmapss, llava_inputs, tmp_path):
    """SIGKILL while scoring the test set: --resume_from latest skips the finished training and ends identically."""
    module, call = ("train_dual_task", 2) if script == "dual_task" else ("train_llava", 3)
    args = dual_args(small_cmapss, tmp_path / "plain", "--epochs", 1) if script == "dual_task" else \
        llava_args(llava_inputs, tmp_path / "plain", "--test_data", llava_inputs[1] / "test.jsonl")
    assert run(sys.modules[module], *args).code == 0
    killer = tmp_path / "killer.py"
    killer.write_text(KILL_IN_FINAL_PHASE.format(repo=str(REPO), module=module, call=call))
    killed = [str(a).replace("plain", "killed") for a in args]
    proc = subprocess.run([sys.executable, killer, *killed], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    resumed = run(sys.modules[module], *killed, "--resume_from", "latest")
    assert resumed.code == 0, resumed.stderr[-3000:]
    a, b = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("plain", "killed"))
    timing = {"wall_seconds", "peak_memory_mb", "train_samples_per_second"}
    assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}


# ----------------------------------------------------------------------------------------------
# train_llava.py on 32 screenshots with a tiny LLaVA
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llava_inputs(tmp_path_factory):
    from tools.make_synthetic_screenshots import make_dataset
    from tools.make_tiny_llava import build_tiny_llava

    root = tmp_path_factory.mktemp("llava_inputs")
    return build_tiny_llava(root / "model"), make_dataset(root / "data", {"train": 16, "val": 8, "test": 8}, seed=1)


def llava_args(inputs, output_dir, *extra):
    model, data = inputs
    return ["--model", model, "--train_data", data / "train.jsonl", "--val_data", data / "val.jsonl",
            "--output_dir", output_dir, "--num_workers", 0, "--batch_size", 8, "--eval_batch_size", 8,
            "--grad_accum_steps", 1, "--epochs", 1, "--lr", 1e-3, *extra]


@pytest.fixture(scope="module")
def finished_llava_run(llava_inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished_llava") / "run"
    outcome = run(train_llava, *llava_args(llava_inputs, out, "--checkpoint_every", 1, "--keep_checkpoints", 10))
    assert outcome.code == 0, outcome.stderr[-3000:]
    return out


@settings(max_examples=100 * SCALE)
@given(data=st.data())
def test_llava_refuses_every_out_of_domain_setting_and_leaves_the_run_alone(finished_llava_run, data):
    name = data.draw(st.sampled_from(fields_of(train_llava.Config)), label="setting")
    value = data.draw(outside(train_llava.Config, name), label="value")
    before = snapshot(finished_llava_run)
    outcome = run(train_llava, "--output_dir", finished_llava_run, "--resume_from", "latest", f"--{name}", value)
    assert_refused(outcome, untouched=finished_llava_run, before=before, match=re.escape(name))


LLAVA_CAPS = {"lora_r": 16, "lora_alpha": 64, "num_workers": 1, "num_threads": 2, "epochs": 1, "max_steps": 2,
              "batch_size": 16, "eval_batch_size": 16}


@settings(max_examples=12 * SCALE)
@given(data=st.data())
def test_llava_runs_or_refuses_every_in_domain_setting(llava_inputs, tmp_path, data):
    skip = ("output_dir", "resume_from", "model", "merge")
    name = data.draw(st.sampled_from(fields_of(train_llava.Config, skip=skip)), label="setting")
    value = data.draw(inside(train_llava.Config, name, LLAVA_CAPS), label="value")
    if name in ("train_data", "val_data", "test_data"):
        value = str(tmp_path / value.replace("/", "_"))  # a new path, not one under the repo
    out = tmp_path / f"run{next(UNIQUE)}"
    outcome = run(train_llava, *llava_args(llava_inputs, out, "--max_steps", 1), f"--{name}", value)
    assert_ran_or_refused(outcome, out)


def corrupt_manifest(data, text: str) -> tuple[bytes, str]:
    """A manifest gone bad in one of several ways (a BOM and a blank line are harmless ones); returns it and how."""
    lines = text.splitlines()
    i = data.draw(st.integers(0, len(lines) - 1))
    how = data.draw(st.sampled_from(["latin-1", "bytes", "json", "label", "path", "bom", "blank", "array"]))
    if how == "latin-1":
        return "\n".join(lines[:i] + ['{"path": "caf\xe9.png", "label": 1}'] + lines[i:]).encode("latin-1"), how
    if how == "bytes":
        return "\n".join(lines).encode()[:i * 20] + data.draw(st.binary(min_size=1, max_size=8)), how
    if how == "bom":
        return "\ufeff".encode() + "\n".join(lines).encode(), how
    record = json.loads(lines[i])
    if how == "json":
        lines[i] = lines[i][: data.draw(st.integers(1, len(lines[i]) - 1))]
    elif how == "label":
        record["label"] = data.draw(st.sampled_from([2, -1, "1", None, True, 0.5, [1]]))
        lines[i] = json.dumps(record)
    elif how == "path":
        record["path"] = data.draw(st.sampled_from(["missing.png", "", ".", "/", 5, None, "train.jsonl"]))
        lines[i] = json.dumps(record)
    elif how == "blank":
        lines.insert(i, "   ")
    else:
        lines[i] = json.dumps([record])
    return ("\n".join(lines) + "\n").encode(), how


@settings(max_examples=20 * SCALE)
@given(data=st.data())
def test_llava_refuses_corrupt_manifests_before_writing_anything(llava_inputs, finished_llava_run, tmp_path, data):
    model, images = llava_inputs
    manifest = images / f"corrupt{next(UNIQUE)}.jsonl"
    corrupted, how = corrupt_manifest(data, (images / "train.jsonl").read_text())
    manifest.write_bytes(corrupted)
    skip = data.draw(st.sampled_from(["true", "false"]), label="skip_bad_images")
    out = tmp_path / f"run{next(UNIQUE)}"
    try:
        outcome = run(train_llava, *llava_args(llava_inputs, out, "--train_data", manifest, "--max_steps", 1,
                                               "--skip_bad_images", skip))
    finally:
        manifest.unlink()
    assert_ran_or_refused(outcome, out)
    if outcome.code == 2:
        assert not out.exists(), "a refused run created its output folder"
    if how in ("bom", "blank"):  # harmless: the run goes on as with the clean manifest
        assert outcome.code == 0, outcome.stderr[-3000:]
    elif outcome.code == 0:  # the bad line was skipped, and said so
        assert skip == "true" and "warning: skipping" in outcome.stderr, outcome.stderr[-3000:]


def corrupt_image(data, original: bytes) -> bytes:
    how = data.draw(st.sampled_from(["truncate", "bytes", "flip", "empty", "text"]), label="image corruption")
    if how == "truncate":
        return original[: data.draw(st.integers(0, len(original) - 1))]
    if how == "bytes":
        return data.draw(st.binary(min_size=1, max_size=64))
    if how == "flip":
        at = data.draw(st.integers(0, len(original) - 1))
        return original[:at] + bytes([original[at] ^ 0xFF]) + original[at + 1:]
    if how == "empty":
        return b""
    return b"<html>not an image</html>"


@settings(max_examples=20 * SCALE)
@given(data=st.data())
def test_llava_names_a_corrupt_image_in_one_line_or_skips_it(llava_inputs, tmp_path, data):
    _, images = llava_inputs
    copy = tmp_path / f"data{next(UNIQUE)}"
    shutil.copytree(images, copy)
    split = data.draw(st.sampled_from(["train", "val"]), label="split")
    record = json.loads(data.draw(st.sampled_from((copy / f"{split}.jsonl").read_text().splitlines())))
    victim = copy / record["path"]
    victim.write_bytes(corrupt_image(data, victim.read_bytes()))
    skip = data.draw(st.sampled_from(["true", "false"]), label="skip_bad_images")
    out = copy / "run"
    outcome = run(train_llava, *llava_args((llava_inputs[0], copy), out, "--max_steps", 1, "--skip_bad_images", skip))
    assert_ran_or_refused(outcome, out)
    if outcome.code == 2:
        assert "cannot read image" in outcome.error_lines[0] and victim.name in outcome.error_lines[0]
    if outcome.code == 0 and skip == "true" and "warning: skipping" in outcome.stdout:
        pytest.fail("warnings belong on stderr")


def test_llava_resume_with_another_lora_rank_or_a_damaged_adapter_checkpoint(finished_llava_run, llava_inputs,
                                                                             tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_llava_run, out)
    before = snapshot(out)
    assert_refused(run(train_llava, *llava_args(llava_inputs, out, "--resume_from", "latest", "--lora_r", 4)),
                   untouched=out, before=before, match=r"was trained with --lora_r 8, this run asks for 4")
    checkpoints = sorted((out / "checkpoints").glob("step_*"))
    weights = checkpoints[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    resumed = run(train_llava, *llava_args(llava_inputs, out, "--resume_from", "latest", "--checkpoint_every", 1,
                                           "--keep_checkpoints", 10))
    assert resumed.code == 0, resumed.stderr[-3000:]
    assert f"warning: checkpoint {checkpoints[-1]} is damaged (its file model.safetensors has" in resumed.stderr
    a, b = ((p / "adapter/adapter_model.safetensors").read_bytes() for p in (finished_llava_run, out))
    assert a == b


@pytest.mark.parametrize("case", ["dual-task run folder", "truncated weights", "not a model type we train"])
def test_a_model_that_is_not_a_whole_llava_checkpoint_is_one_line(llava_inputs, finished_dual_run, tmp_path, case):
    model, _ = llava_inputs
    if case == "dual-task run folder":
        bad = finished_dual_run
    else:
        bad = tmp_path / "model"
        shutil.copytree(model, bad)
        if case == "truncated weights":
            (bad / "model.safetensors").write_bytes((bad / "model.safetensors").read_bytes()[:5000])
        else:
            config = json.loads((bad / "config.json").read_text())
            (bad / "config.json").write_text(json.dumps(config | {"model_type": "bert"}))
    message = {"dual-task run folder": "is not a model folder \\(it has no config.json\\)",
               "truncated weights": "model.safetensors is damaged", "not a model type we train": "'bert' model"}[case]
    assert_refused(run(train_llava, *llava_args(llava_inputs, tmp_path / "out", "--model", bad)), match=message)
    assert not (tmp_path / "out").exists()


def test_synthetic_data_is_never_written_into_a_users_folder(llava_inputs, tmp_path):
    """The demo (tools/demo.py) and a typo in --train_data next to the user's own manifests: refused, and not one
    file added or changed."""
    from tools import demo
    from tools.make_synthetic_screenshots import make_dataset
    from tools.make_tiny_llava import build_tiny_llava

    users = tmp_path / "my_data"
    shutil.copytree(llava_inputs[1], users)
    before = snapshot(users)
    outcome = run(demo, *llava_args(llava_inputs, tmp_path / "out", "--train_data", users / "trian.jsonl"))
    assert_refused(outcome, match="writes train.jsonl, val.jsonl and test.jsonl only into a new or empty folder")
    assert snapshot(users) == before and not (tmp_path / "out").exists()
    for make in (lambda: make_dataset(users, {"train": 2}), lambda: build_tiny_llava(users)):
        with pytest.raises(FileExistsError, match="not an empty folder"):
            make()
    assert snapshot(users) == before


def test_a_one_class_validation_set_is_refused_up_front_or_scored_without_a_crash(llava_inputs, tmp_path):
    _, images = llava_inputs
    lines = (images / "val.jsonl").read_text().splitlines()
    only_injections = tmp_path / "val_injections.jsonl"
    only_injections.write_text("".join(line.replace('"path": "', f'"path": "{images}/') + "\n"
                                       for line in lines if '"label": 1' in line))
    for metric, kind in (("auroc", "benign"), ("f1", "prompt-injection")):
        manifest = only_injections if metric == "auroc" else tmp_path / "val_benign.jsonl"
        if metric == "f1":
            manifest.write_text("".join(line.replace('"path": "', f'"path": "{images}/') + "\n"
                                        for line in lines if '"label": 0' in line))
        assert_refused(run(train_llava, *llava_args(llava_inputs, tmp_path / "out", "--val_data", manifest,
                                                    "--best_metric", metric)),
                       match=f"the validation set has no {kind} images, so its {metric} is undefined")
    assert not (tmp_path / "out").exists()
    # Every validation image passes its header check but cannot be decoded (JPEGs cut short), and is skipped.
    cut = tmp_path / "cut"
    cut.mkdir()
    records = []
    for i, line in enumerate(lines):
        record = json.loads(line)
        jpeg = io.BytesIO()
        Image.open(images / record["path"]).convert("RGB").save(jpeg, format="JPEG")
        (cut / f"{i}.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
        records.append({"path": f"{i}.jpg", "label": record["label"]})
    (cut / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    outcome = run(train_llava, *llava_args(llava_inputs, tmp_path / "skipped", "--val_data", cut / "val.jsonl",
                                           "--skip_bad_images", "true"))
    assert outcome.code == 0, outcome.stderr[-3000:]
    assert ("auroc is undefined on the 0 readable images" in outcome.stderr
            and "warning: skipping unreadable" in outcome.stderr)
    results = json.loads((tmp_path / "skipped" / "results.json").read_text())
    assert results["val_num_samples"] == 0 and results["val_auroc"] is None and results["skipped_bad_images"] == 8


@pytest.mark.parametrize("case", ["output is a folder", "output exists", "output is the input", "no detector.json"])
def test_predict_refuses_outputs_it_must_not_write_and_adapters_it_cannot_use(finished_llava_run, llava_inputs,
                                                                             tmp_path, case):
    model, images = llava_inputs
    run_dir = tmp_path / "run"
    shutil.copytree(finished_llava_run, run_dir)
    output = {"output is a folder": tmp_path, "output exists": run_dir / "results.json",
              "output is the input": images / "val.jsonl", "no detector.json": tmp_path / "p.jsonl"}[case]
    if case == "no detector.json":
        (run_dir / "adapter" / "detector.json").unlink()
    before, inputs_before = snapshot(run_dir), snapshot(images)
    message = {"output is a folder": "is a folder; name the file to write",
               "output exists": "exists; pass --overwrite true",
               "output is the input": "is one of this run.s inputs",
               "no detector.json": "detector.json is missing"}[case]
    assert_refused(run(predict_llava, "--model", model, "--run_dir", run_dir, "--data",
                       images / "val.jsonl", "--output", output, "--num_workers", 0),
                   untouched=run_dir, before=before, match=message)
    assert snapshot(images) == inputs_before


def test_warnings_go_to_stderr_and_the_error_line_comes_first(llava_inputs, tmp_path):
    _, images = llava_inputs
    manifest = tmp_path / "train.jsonl"
    manifest.write_text((images / "train.jsonl").read_text().replace('"path": "', f'"path": "{images}/') +
                        '{"path": "nowhere.png", "label": 1}\n')
    outcome = run(train_llava, *llava_args(llava_inputs, tmp_path / "out", "--train_data", manifest,
                                           "--skip_bad_images", "true", "--max_steps", 1))
    assert outcome.code == 0 and "warning:" not in outcome.stdout
    assert "warning: skipping " in outcome.stderr and "nowhere.png" in outcome.stderr
    # A bad answer word is found from the tokenizer alone: the error is the first line on stderr.
    proc = subprocess.run([sys.executable, "train_llava.py", *map(str, llava_args(llava_inputs, tmp_path / "x")),
                           "--yes_token", "Maybe"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert (proc.returncode == 2
            and proc.stderr.splitlines()[0].startswith("error: the answer word 'Maybe'")), proc.stderr
