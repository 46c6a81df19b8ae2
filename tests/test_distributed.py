"""Two gloo processes on the CPU (`accelerate launch` with accelerate_configs/ddp.yaml): one model, not two."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_bad_input import snapshot  # every file under a folder with its bytes

REPO = Path(__file__).resolve().parents[1]
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch():
    # A fresh rendezvous port per launch: back-to-back runs on the default port can collide.
    return [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port())]
SMALL = ["--conv_channels", "16", "--hidden_size", "16", "--gru_layers", "1", "--warmup_epochs", "1",
         "--overwrite", "true"]

pytestmark = pytest.mark.multiprocess


def run(cmd, expect_ok=True):
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # scripts written to tmp_path import common/ too
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    if expect_ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def steps(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if "train/loss" in line]


def run_recording_samples(cmd, log: Path):
    """`run`, with every training batch each process fetches recorded in `log` (tests/sample_log/sitecustomize.py)."""
    log.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'tests' / 'sample_log'}{os.pathsep}{REPO}", "SAMPLE_LOG": str(log)}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def samples_by_step(log: Path) -> list[list[int]]:
    """The samples of each micro-batch step, over all processes (rank 0's batch, then rank 1's ...)."""
    ranks = [[json.loads(line) for line in path.read_text().splitlines()] for path in sorted(log.glob("rank*.jsonl"))]
    return [[i for batch in step for i in batch] for step in zip(*ranks, strict=True)]


DUAL_COMMON = [*SMALL, "--dropout", "0", "--max_steps", "12", "--log_every", "1", "--mixed_precision", "no",
               "--checkpoint_every", "3", "--keep_checkpoints", "10"]


@pytest.fixture(scope="module")
def dual_runs(tmp_path_factory):
    """The same 12 steps (global batch 512) on one process, two under DDP and two under FSDP2, the training samples
    of each recorded, with a checkpoint every 3 steps."""
    root = tmp_path_factory.mktemp("dual")
    run_recording_samples([sys.executable, "train_dual_task.py", *DUAL_COMMON, "--batch_size", "512", "--output_dir",
                           str(root / "one")], root / "one_samples")
    for name, config in (("two", "ddp"), ("fsdp", "fsdp")):
        run_recording_samples([*launch(), "--config_file", f"accelerate_configs/{config}.yaml", "train_dual_task.py",
                               *DUAL_COMMON, "--batch_size", "256", "--output_dir", str(root / name)],
                              root / f"{name}_samples")
    return root


def test_two_processes_train_like_one_with_the_same_global_batch_under_ddp_and_fsdp2(dual_runs):
    """And the DDP run's checkpoints: saved by every rank, written once, resumed on two processes."""
    one, two = (json.loads((dual_runs / "one" / "results.json").read_text()),
                json.loads((dual_runs / "two" / "results.json").read_text()))
    assert two["num_processes"] == 2 and two["distributed_type"] == "MULTI_CPU"
    assert one["num_processes"] == 1 and one["distributed_type"] == "NO"
    assert one["optimizer_steps"] == two["optimizer_steps"] == 12
    # The same 512 samples in each update, in the same order, whatever the number of processes.
    assert samples_by_step(dual_runs / "one_samples") == samples_by_step(dual_runs / "two_samples")
    # Same samples per update; losses agree to 1e-3 relative (the RUL loss to 3e-3) (each rank averages its own half,
    # and the failure-weighted MSE is a ratio of means, so the halves do not combine exactly).
    for a, b in zip(steps(dual_runs / "one"), steps(dual_runs / "two"), strict=True):
        assert a["step"] == b["step"] and a["train/lr"] == b["train/lr"]
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-3)
        assert b["train/rul_loss"] == pytest.approx(a["train/rul_loss"], rel=3e-3)
    assert two["test_rmse"] == pytest.approx(one["test_rmse"], abs=0.01)
    # FSDP2 (Accelerate's own path: sharded parameters, reduce-scatter) follows DDP step for step, and
    # model.safetensors holds the full, gathered weights.
    fsdp = json.loads((dual_runs / "fsdp" / "results.json").read_text())
    assert (fsdp["num_processes"], fsdp["distributed_type"], fsdp["optimizer_steps"]) == (2, "FSDP", 12)
    for a, b in zip(steps(dual_runs / "two"), steps(dual_runs / "fsdp"), strict=True):
        assert a["step"] == b["step"] and a["train/lr"] == b["train/lr"]
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-3)
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-3)
    ddp_weights, fsdp_weights = (load_file(dual_runs / name / "model.safetensors") for name in ("two", "fsdp"))
    assert ddp_weights.keys() == fsdp_weights.keys()
    assert all(torch.allclose(ddp_weights[k], fsdp_weights[k], atol=1e-5) for k in ddp_weights)
    assert fsdp["test_rmse"] == pytest.approx(two["test_rmse"], abs=0.01)

    out = copy_run(dual_runs / "two", dual_runs / "two_resumed", 12)
    checkpoint = out / "checkpoints" / "step_00000006"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "meta.json", "model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl",
        "train_state.pt"]  # the model, optimizer and loop state once, each rank's random state
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert (meta["step"], meta["num_processes"], meta["config"]["batch_size"]) == (6, 2, 256)
    assert (meta["sharded"], meta["samples_into_epoch"]) == (False, 6 * 512)
    # every rank's files
    assert sorted(meta["files"]) == sorted(p.name for p in checkpoint.iterdir() if p.name != "meta.json")
    assert (out / "checkpoints" / "LATEST").read_text() == "step_00000012"
    assert not list((out / "checkpoints").glob(".tmp*"))
    run([*launch(), "--config_file", "accelerate_configs/ddp.yaml", "train_dual_task.py", *DUAL_COMMON,
         "--batch_size", "256", "--output_dir", str(out), "--resume_from", "latest", "--max_steps", "15"])
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["optimizer_steps"] == 15 and resumed["num_processes"] == 2
    assert [r["step"] for r in steps(out)] == list(range(1, 16))  # each step logged once, by one process
    # An FSDP2 checkpoint cannot go on without FSDP (the formats differ), nor one on another global batch (its steps
    # and LR schedule count 512 samples, here 256): one error line each, naming what fits, and nothing changed.
    for source, batch, error in (
            ("fsdp", "512", "was written by an FSDP launch, this is a launch without FSDP (one process or DDP); resume "
                            "it with an FSDP launch (any number of processes)"),
            ("two", "256", "this run's would be 256; its steps and LR schedule count that batch: keep it, e.g. "
                           "--grad_accum_steps 2 with --batch_size 256")):
        before = snapshot(dual_runs / source)
        proc = run([sys.executable, "train_dual_task.py", *DUAL_COMMON, "--batch_size", batch, "--output_dir",
                    str(dual_runs / source), "--resume_from", "latest"], expect_ok=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and error in proc.stderr
        assert snapshot(dual_runs / source) == before


def copy_run(source: Path, target: Path, up_to_step: int) -> Path:
    """A copy of a run folder as a kill after the checkpoint of `up_to_step` would have left it."""
    shutil.copytree(source, target)
    for checkpoint in (target / "checkpoints").glob("step_*"):
        if int(checkpoint.name.removeprefix("step_")) > up_to_step:
            shutil.rmtree(checkpoint)
    assert (target / "checkpoints" / f"step_{up_to_step:08d}" / "meta.json").is_file()
    (target / "checkpoints" / "LATEST").write_text(f"step_{up_to_step:08d}")
    return target


def check_elastic_resume(resumed: Path, reference: Path, from_step: int, processes: int, proc, loss_rel: float,
                         samples: tuple[Path, Path], weights: str = "model.safetensors") -> None:
    """A run resumed at `from_step` on `processes` processes continued like the uninterrupted `reference` run: the
    same steps and LRs, the losses to `loss_rel`, the same samples in each remaining step, the same final weights
    (to float rounding), and one line said how it continued."""
    written_by = 2 if processes == 1 else 1
    assert f"elastic resume: written by {written_by} process(es), continued on {processes}" in proc.stdout
    after, before = steps(resumed), steps(reference)
    assert [r["step"] for r in after] == [r["step"] for r in before]  # each step logged once
    for a, b in zip(after[from_step:], before[from_step:], strict=True):
        assert a["train/lr"] == b["train/lr"]
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=loss_rel)
    taken = sum(map(len, samples_by_step(samples[1])[:from_step]))  # by the reference run until the checkpoint
    rest = [i for step in samples_by_step(samples[1]) for i in step][taken:]
    assert [i for step in samples_by_step(samples[0]) for i in step] == rest  # the rest of the epoch, in order
    results = json.loads((resumed / "results.json").read_text())
    assert results["num_processes"] == processes
    assert results["optimizer_steps"] == json.loads((reference / "results.json").read_text())["optimizer_steps"]
    a, b = load_file(resumed / weights), load_file(reference / weights)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_dual_task_resumes_on_another_number_of_processes_under_ddp_and_fsdp2(dual_runs):
    """2 -> 1 and 1 -> 2 processes, under DDP and under FSDP2, keeping the global batch of 512 (--batch_size 512 on
    one, 256 on two), from mid-epoch checkpoints: each goes on like the run that was never stopped, its EMA (the
    saved model) included."""
    root = dual_runs
    def resume(source, step, launcher, batch, name):
        out = copy_run(root / source, root / name, step)
        cmd = [*launcher, "train_dual_task.py", *DUAL_COMMON, *batch, "--output_dir", str(out), "--resume_from",
               "latest"]
        return out, run_recording_samples(cmd, root / f"{name}_samples")

    fsdp_launch = [*launch(), "--config_file", "accelerate_configs/fsdp.yaml"]
    for source, step, launcher, batch, processes in (
            ("two", 6, [sys.executable], ["--batch_size", "512"], 1),  # (accumulation: the LLaVA test; AMNL's averages
            # count micro-batches, so accumulating changes the dual-task loss a little, by design)
            ("one", 6, [*launch(), "--config_file", "accelerate_configs/ddp.yaml"], ["--batch_size", "256"], 2),
            ("fsdp", 6, [*fsdp_launch, "--num_processes", "1"], ["--batch_size", "512"], 1),  # resharded by DCP
            ("fsdp_to_1", 9, fsdp_launch, ["--batch_size", "256"], 2)):  # from the checkpoint the run above wrote
        name = f"{source}_to_{processes}"
        out, proc = resume(source, step, launcher, batch, name)
        reference = "fsdp" if source.startswith("fsdp") else source
        check_elastic_resume(out, root / reference, step, processes, proc, 1e-3,
                             (root / f"{name}_samples", root / f"{reference}_samples"))
    assert json.loads((root / "fsdp_to_1" / "results.json").read_text())["distributed_type"] == "FSDP"


def kill_after_checkpoint(out: Path, min_step: int, *commands: list) -> None:
    """Start the launches (one per machine), wait for a checkpoint at or past `min_step`, then kill -9 all of them."""
    import signal
    import time

    import psutil

    from common.checkpoint import resolve_resume

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True) for cmd in commands]
    deadline = time.time() + 240
    while time.time() < deadline and all(proc.poll() is None for proc in procs):
        latest = resolve_resume(out, "latest")
        if latest is not None and json.loads((latest / "meta.json").read_text())["step"] >= min_step:
            break
        time.sleep(0.05)
    assert all(proc.poll() is None for proc in procs), "the run ended before it could be killed"
    # The ranks run in sessions of their own (torch's elastic agent starts them so): killing the launcher's process
    # group would leave them training. Kill every process of the tree, ranks first, all at once.
    ranks = [child for proc in procs for child in psutil.Process(proc.pid).children(recursive=True)]
    for process in [*ranks, *map(psutil.Process, (proc.pid for proc in procs))]:
        process.send_signal(signal.SIGKILL)
    psutil.wait_procs(ranks, timeout=30)
    for proc in procs:
        proc.wait()
    assert not any(rank.is_running() and rank.status() != psutil.STATUS_ZOMBIE for rank in ranks)


def test_dual_task_under_fsdp2_is_killed_and_resumes_bit_identically(tmp_path, small_cmapss):
    """fsdp.yaml as shipped (bf16): sharded checkpoints via torch.distributed.checkpoint, kill -9, resume."""
    args = ["train_dual_task.py", *SMALL, "--data", f"{small_cmapss}/FD001", "--batch_size", 64, "--epochs", 2,
            "--checkpoint_every", 5, "--log_every", 1]
    fsdp = [*launch(), "--config_file", "accelerate_configs/fsdp.yaml", *map(str, args)]
    run([*fsdp, "--output_dir", str(tmp_path / "straight")])
    kill_after_checkpoint(tmp_path / "killed", 15,  # in the second epoch (12 steps each)
                          [*launch(), *fsdp[len(launch()):], "--output_dir", str(tmp_path / "killed")])
    assert not (tmp_path / "killed" / "results.json").exists()
    checkpoint = max((tmp_path / "killed" / "checkpoints").glob("step_*"))
    assert {"pytorch_model_fsdp_0", "optimizer_0"} <= {p.name for p in checkpoint.iterdir()}  # sharded (DCP) state
    run([*launch(), *fsdp[len(launch()):], "--output_dir", str(tmp_path / "killed"), "--resume_from", "latest"])
    straight, resumed = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("straight", "killed"))
    assert (resumed["distributed_type"], resumed["mixed_precision"]) == ("FSDP", "bf16")
    assert resumed["test_rmse"] == straight["test_rmse"] and resumed["optimizer_steps"] == straight["optimizer_steps"]
    assert ((tmp_path / "killed" / "model.safetensors").read_bytes()
            == (tmp_path / "straight" / "model.safetensors").read_bytes())


def test_two_machines_over_loopback_train_like_ddp_on_one_and_resume_after_a_kill_of_both(tmp_path, small_cmapss):
    """multi_node.yaml as a user runs it on each of 2 nodes (one process each, here both on 127.0.0.1): one model,
    the same as 2 processes on one machine; kill -9 of both nodes, `--resume_from latest` on both: bit-identical."""
    args = ["train_dual_task.py", *SMALL, "--data", f"{small_cmapss}/FD001", "--batch_size", 32, "--epochs", 2,
            "--checkpoint_every", 5, "--log_every", 1, "--mixed_precision", "no"]
    run([*launch(), "--config_file", "accelerate_configs/ddp.yaml", *map(str, args),
         "--output_dir", str(tmp_path / "ddp")])

    def nodes(*extra, output_dirs=("nodes", "nodes")):  # each node's command; node 0 hosts the rendezvous
        port = str(free_port())
        return [[sys.executable, "-m", "accelerate.commands.launch",
                 "--config_file", "accelerate_configs/multi_node.yaml",
                 "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip",
                 "127.0.0.1", "--main_process_port", port, *map(str, args), "--output_dir", str(tmp_path / output_dir),
                 *extra] for rank, output_dir in zip((0, 1), output_dirs)]

    def run_nodes(commands) -> list:
        procs = [subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for cmd in commands]
        return [(proc.wait(timeout=300), proc.stderr.read()) for proc in procs]

    kill_after_checkpoint(tmp_path / "nodes", 25, *nodes())  # in the second epoch (23 steps each)
    assert not (tmp_path / "nodes" / "results.json").exists()
    logged = steps(tmp_path / "nodes")  # before the kill: the very steps of the one-machine run
    assert len(logged) >= 25 and logged == steps(tmp_path / "ddp")[:len(logged)]
    # Nodes that do not share a filesystem (here: each its own folder) are refused on both, before any write:
    # resuming, node 1 would find no checkpoint and start afresh; starting afresh, it would not see the run's files.
    before = sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in (tmp_path / "nodes").rglob("*"))
    for output_dirs, extra in ((("nodes", "elsewhere"), ["--resume_from", "latest"]), (("new0", "new1"), [])):
        for code, stderr in run_nodes(nodes(*extra, output_dirs=output_dirs)):
            # The error line from each node's process (the launcher then exits 1 with its own report, as for any
            # failed worker).
            assert code != 0 and "; put --output_dir on a filesystem every node sees" in stderr, stderr[-3000:]
    assert sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in (tmp_path / "nodes").rglob("*")) == before
    assert not any((tmp_path / name).exists() for name in ("elsewhere", "new0", "new1"))
    for code, stderr in run_nodes(nodes("--resume_from", "latest")):
        assert code == 0, stderr[-3000:]
    ddp, nodes_result = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("ddp", "nodes"))
    assert (nodes_result["num_processes"], nodes_result["distributed_type"]) == (2, "MULTI_CPU")
    assert nodes_result["optimizer_steps"] == ddp["optimizer_steps"] == 46
    assert nodes_result["test_rmse"] == ddp["test_rmse"] and nodes_result["best_val_rmse"] == ddp["best_val_rmse"]
    assert steps(tmp_path / "nodes") == steps(tmp_path / "ddp")  # every step logged once, by one process, as on one
    assert ((tmp_path / "nodes" / "model.safetensors").read_bytes()
            == (tmp_path / "ddp" / "model.safetensors").read_bytes())


def test_evaluation_counts_every_sample_once_with_an_uneven_split(tmp_path):
    # FD002 has 259 test engines: one process gets a padded batch, gather_for_metrics drops the copy.
    run([*launch(), "--config_file", "accelerate_configs/ddp.yaml", "train_dual_task.py", *SMALL,
         "--data", "FD002", "--max_steps", "2", "--output_dir", str(tmp_path / "fd002")])
    results = json.loads((tmp_path / "fd002" / "results.json").read_text())
    assert results["test_units"] == 259 and results["num_processes"] == 2


# Each helper script ends like this: the gloo group is destroyed, then the process leaves without the
# interpreter's C++ teardown, where PyTorch's gloo backend now and then aborts after all the work is done
# ("terminate called without an active exception", SIGABRT; about 1 run in 50 here, and once in CI).
END_OF_SCRIPT = """
accelerator.end_training()
os._exit(0)
"""

GUARD_SCRIPT = '''
import json, os, sys, torch
from accelerate import Accelerator
from common.guard import NonFiniteGuard
from common.distributed import use_fsdp_on_cpu
accelerator = Accelerator(cpu=True, mixed_precision="bf16")
use_fsdp_on_cpu(accelerator)  # under fsdp.yaml: Accelerate's FSDP2 path, as the training scripts take it
full = lambda p: p.full_tensor() if hasattr(p, "full_tensor") else p  # noqa: E731 (a DTensor shard -> the whole)
class ToFloat(torch.nn.Module):
    def forward(self, x):  # what peft does between a frozen bf16 layer and an fp32 LoRA one
        return x.float()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), ToFloat(), torch.nn.ReLU(), torch.nn.Linear(8, 1))
model[0].requires_grad_(False).to(torch.bfloat16)  # a frozen bf16 base, as LLaVA's under LoRA
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01, fused=True)
model, optimizer = accelerator.prepare(model, optimizer)
guard = NonFiniteGuard(accelerator, model, optimizer)
dtypes = []
accelerator.unwrap_model(model)[3].register_forward_hook(lambda m, i, o: dtypes.append(str(o.dtype)))
report = []
for step in range(1, 4):
    with accelerator.autocast():
        loss = model(torch.randn(8, 4, dtype=torch.bfloat16)).float().pow(2).mean()
    if step == 2 and accelerator.process_index == 1:
        loss = loss * float("nan")  # only rank 1 sees a NaN
    accelerator.backward(loss)  # (FSDP2: the root module holds unsharded, bf16 compute copies until its backward)
    before = [full(p).detach().clone() for p in model.parameters()]
    guard.record_loss(loss)
    finite = guard.mask_nonfinite_update(accelerator.clip_grad_norm_(model.parameters(), 1.0))
    optimizer.step()
    optimizer.zero_grad()
    fell_back = guard.poll(step)
    changed = any(not torch.equal(a, full(b)) for a, b in zip(before, model.parameters()))
    report.append({"finite": bool(finite), "changed": changed, "fell_back": fell_back, "dtype": dtypes[-1],
                   "frozen_dtype": str(next(model.parameters()).dtype)})
with open(sys.argv[1] + f"/rank{accelerator.process_index}.json", "w") as f:
    json.dump({"report": report, "lr_scale": guard.lr_scale, "distributed_type": accelerator.distributed_type.value,
               "weights": [full(p).detach().sum().item() for p in model.parameters()]}, f)
''' + END_OF_SCRIPT


@pytest.mark.parametrize("launch_config", ["ddp", "fsdp"])
def test_a_nan_on_one_rank_makes_every_rank_skip_and_fall_back_together(tmp_path, launch_config):
    """After the fallback the trainable layer computes in fp32 and the frozen bf16 one stays bf16 (fp32's range, and
    it does not learn: a 7B base would double its memory for nothing). Under FSDP2, FSDP's own mixed-precision policy
    must be reset too, or the trainable layer would still compute in bf16."""
    script = tmp_path / "guard.py"
    script.write_text(GUARD_SCRIPT)
    run([*launch(), "--config_file", f"accelerate_configs/{launch_config}.yaml", str(script), str(tmp_path)])
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1  # identical decisions, identical weights
    assert rank0["distributed_type"] == {"ddp": "MULTI_CPU", "fsdp": "FSDP"}[launch_config]
    assert [r["finite"] for r in rank0["report"]] == [True, False, True]
    assert [r["changed"] for r in rank0["report"]] == [True, False, True]  # the NaN update skipped everywhere
    assert [r["fell_back"] for r in rank0["report"]] == [False, True, False]
    assert [r["dtype"] for r in rank0["report"]] == ["torch.bfloat16", "torch.bfloat16", "torch.float32"]
    assert [r["frozen_dtype"] for r in rank0["report"]] == ["torch.bfloat16", "torch.bfloat16", "torch.bfloat16"]
    assert rank0["lr_scale"] == 0.5


def test_fsdp_with_one_cpu_process_keeps_lora_fp32_over_a_bf16_base_and_fsdp_without_a_launcher_is_refused(
        tmp_path, small_cmapss, llava_inputs):
    """One process is a (one-shard) FSDP2 run too, as on one GPU. With fsdp.yaml's bf16 and a bf16 base, Accelerate
    upcasts the trainable weights (LoRA) to fp32 and leaves the frozen base in bf16. FSDP asked for outside a
    distributed launch (ACCELERATE_USE_FSDP set by hand) would quietly run unsharded, so it is refused."""
    model, data = llava_inputs
    run([*launch(), "--config_file", "accelerate_configs/fsdp.yaml", "--num_processes", "1", "train_llava.py",
         *llava_args(model, data, "--batch_size", 8, "--max_steps", 1, "--model_dtype", "bf16", "--output_dir",
                     tmp_path / "one")])
    results = json.loads((tmp_path / "one" / "results.json").read_text())
    assert (results["distributed_type"], results["num_processes"], results["mixed_precision"]) == ("FSDP", 1, "bf16")
    assert (results["lora_dtype"], results["base_dtype"]) == ("float32", "bfloat16")
    env = {**os.environ, "PYTHONPATH": str(REPO), "ACCELERATE_USE_FSDP": "true"}
    proc = subprocess.run([sys.executable, "train_dual_task.py", *SMALL, "--data", f"{small_cmapss}/FD001",
                           "--output_dir", str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert "error: FSDP was requested, but Accelerate set up NO on cpu with 1 process(es)" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def llava_inputs(tmp_path_factory):
    from tools.make_synthetic_screenshots import make_dataset
    from tools.make_tiny_llava import build_tiny_llava

    root = tmp_path_factory.mktemp("llava")
    data = make_dataset(root / "screenshots", {"train": 32, "val": 9}, seed=0)  # 9: an uneven split over 2 ranks
    return build_tiny_llava(root / "model"), data


def llava_args(model, data, *extra):
    return ["--model", str(model), "--train_data", str(data / "train.jsonl"), "--val_data", str(data / "val.jsonl"),
            "--lora_dropout", "0", "--max_steps", "4", "--log_every", "1", "--num_workers", "0", "--num_threads", "1",
            "--grad_accum_steps", "1", "--lr", "1e-3", *map(str, extra)]


LLAVA_EXTRA = ["--lora_vision_modules", "fc1", "--mixed_precision", "no", "--checkpoint_every", "1",
               "--keep_checkpoints", "10", "--ema_decay", "0.5"]  # the adapter saved: the EMA of the best step


@pytest.fixture(scope="module")
def llava_runs(tmp_path_factory, llava_inputs):
    """The same 4 steps (one epoch, global batch 8) on one process, two under DDP and two under FSDP2, with a
    checkpoint after every step and the training samples of each recorded."""
    model, data = llava_inputs
    root = tmp_path_factory.mktemp("llava_runs")
    run_recording_samples([sys.executable, "train_llava.py", *llava_args(model, data, "--batch_size", 8, *LLAVA_EXTRA,
                                                                         "--output_dir", root / "one")],
                          root / "one_samples")
    for name, config in (("two", "ddp"), ("fsdp", "fsdp")):
        run_recording_samples([*launch(), "--config_file", f"accelerate_configs/{config}.yaml", "train_llava.py",
                               *llava_args(model, data, "--batch_size", 4, *LLAVA_EXTRA, "--output_dir", root / name)],
                              root / f"{name}_samples")
    return root


def test_llava_two_processes_train_like_one_with_the_same_global_batch_under_ddp_and_fsdp2(tmp_path, llava_inputs,
                                                                                          llava_runs):
    """With LoRA asked for in the vision tower too: its last layer is past the selected feature layer, where a LoRA
    weight would never get a gradient (DDP would need find_unused_parameters, and FSDP2 could not checkpoint its
    optimizer state, which never exists), so it gets none."""
    model, data = llava_inputs
    def fsdp_launch(name):  # a fresh port for each launch
        return [*launch(), "--config_file", "accelerate_configs/fsdp.yaml", "train_llava.py",
                *llava_args(model, data, "--batch_size", 4, *LLAVA_EXTRA, "--output_dir", tmp_path / name)]

    for name in ("one", "two", "fsdp"):
        shutil.copytree(llava_runs / name, tmp_path / name)
    one, two = (json.loads((tmp_path / "one" / "results.json").read_text()),
                json.loads((tmp_path / "two" / "results.json").read_text()))
    assert (one["num_processes"], one["distributed_type"]) == (1, "NO")
    assert (two["num_processes"], two["distributed_type"]) == (2, "MULTI_CPU")
    assert one["optimizer_steps"] == two["optimizer_steps"] == 4
    assert one["val_num_samples"] == two["val_num_samples"] == 9  # the padded duplicate is dropped
    assert samples_by_step(llava_runs / "one_samples") == samples_by_step(llava_runs / "two_samples")  # in order
    # Same 8 samples per update: the mean loss of two halves of 4 equals the loss of 8 (to float rounding).
    for a, b in zip(steps(tmp_path / "one"), steps(tmp_path / "two"), strict=True):
        assert a["step"] == b["step"] and a["train/lr"] == b["train/lr"]
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-4)
    assert two["val_accuracy"] == one["val_accuracy"]
    fsdp = json.loads((tmp_path / "fsdp" / "results.json").read_text())
    assert (fsdp["distributed_type"], fsdp["val_num_samples"], fsdp["lora_dtype"]) == ("FSDP", 9, "float32")
    for a, b in zip(steps(tmp_path / "two"), steps(tmp_path / "fsdp"), strict=True):
        assert a["step"] == b["step"] and a["train/lr"] == b["train/lr"]
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-4)
    assert fsdp["val_accuracy"] == two["val_accuracy"]
    # The adapter, gathered from the shards, is what DDP trained; LoRA went only where it can learn.
    ddp_adapter, fsdp_adapter = (load_file(tmp_path / n / "adapter" / "adapter_model.safetensors")
                                 for n in ("two", "fsdp"))
    assert ddp_adapter.keys() == fsdp_adapter.keys()
    assert all(torch.allclose(ddp_adapter[k], fsdp_adapter[k], atol=1e-5) for k in ddp_adapter)
    vision = [k for k in fsdp_adapter if "vision_tower" in k]
    assert vision and all("layers.0." in k for k in vision)
    # PeftModel.from_pretrained on the base, in one process, scores the validation images as the FSDP run did.
    run([sys.executable, "predict_llava.py", "--model", str(model), "--run_dir", str(tmp_path / "fsdp"), "--data",
         str(data / "val.jsonl"), "--num_workers", "0", "--mixed_precision", "no"])
    during, after = ({r["path"]: r["p_yes"]
                      for r in map(json.loads, (tmp_path / "fsdp" / name).read_text().splitlines())}
                     for name in ("val_predictions.jsonl", "predictions.jsonl"))
    assert during.keys() == after.keys() and all(after[k] == pytest.approx(during[k], abs=1e-5) for k in during)
    # kill -9 after a sharded checkpoint, resume: the same adapter, bit for bit. The checkpoints hold the LoRA
    # weights only (and their optimizer state), not the frozen base.
    kill_after_checkpoint(tmp_path / "killed", 1, fsdp_launch("killed"))
    import torch.distributed.checkpoint as dcp

    checkpoint = max((tmp_path / "killed" / "checkpoints").glob("step_*"))
    saved = dcp.FileSystemReader(checkpoint / "pytorch_model_fsdp_0").read_metadata().state_dict_metadata
    assert saved and all("lora_" in key for key in saved)
    run([*fsdp_launch("killed"), "--resume_from", "latest"])
    resumed = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == fsdp_adapter.keys() and all(torch.equal(resumed[k], fsdp_adapter[k]) for k in resumed)


def test_llava_resumes_on_another_number_of_processes_under_ddp_and_fsdp2(llava_inputs, llava_runs):
    """2 -> 1 and 1 -> 2 processes, under DDP and under FSDP2, keeping the global batch of 8, from mid-epoch
    checkpoints: each goes on like the run that was never stopped, its EMA included. DDP 2 -> 1 keeps it by
    accumulating 2 micro-batches of 4: the epoch goes on after 4 of them, where the checkpoint's processes had
    taken 2 each. Last, a finished one-process FSDP2 run resumed on two: its best adapter (the EMA weights, not
    the model's) is cut into two shards and gathered again for the adapter it saves."""
    model, data = llava_inputs
    root, fsdp_launch = llava_runs, [*launch(), "--config_file", "accelerate_configs/fsdp.yaml"]
    for source, step, launcher, batch, processes, name in (
            ("two", 2, [sys.executable], ["--batch_size", 4, "--grad_accum_steps", 2], 1, "two_to_1"),
            ("one", 2, [*launch(), "--config_file", "accelerate_configs/ddp.yaml"], ["--batch_size", 4], 2, "one_to_2"),
            ("fsdp", 1, [*fsdp_launch, "--num_processes", "1"], ["--batch_size", 8], 1, "fsdp_to_1"),  # DCP reshards
            ("fsdp_to_1", 2, fsdp_launch, ["--batch_size", 4], 2, "fsdp_to_2"),  # a checkpoint the run above wrote
            ("fsdp_to_1", 4, fsdp_launch, ["--batch_size", 4], 2, "finished_to_2")):
        out = copy_run(root / source, root / name, step)
        proc = run_recording_samples([*launcher, "train_llava.py", *llava_args(model, data, *LLAVA_EXTRA, *batch,
                                      "--output_dir", out, "--resume_from", "latest")], root / f"{name}_samples")
        reference = "fsdp" if source.startswith("fsdp") else source
        check_elastic_resume(out, root / reference, step, processes, proc, 1e-4,
                             (root / f"{name}_samples", root / f"{reference}_samples"),
                             weights="adapter/adapter_model.safetensors")


def test_llava_a_corrupt_image_seen_by_one_rank_stops_every_rank(tmp_path, llava_inputs):
    """A JPEG cut short passes the header check every rank makes up front; decoding it fails on the one process
    whose batch holds it, and the job still ends at once with the one-line error."""
    import io

    from PIL import Image

    model, data = llava_inputs
    jpeg = io.BytesIO()
    Image.new("RGB", (300, 200), "white").save(jpeg, format="JPEG")
    (tmp_path / "corrupt.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    lines = (data / "train.jsonl").read_text().splitlines()
    records = [dict(json.loads(line), path=str(data / json.loads(line)["path"])) for line in lines]
    records[5] = {"path": str(tmp_path / "corrupt.jpg"), "label": 1}
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    proc = run([*launch(), "--config_file", "accelerate_configs/ddp.yaml", "train_llava.py",
                *llava_args(model, data, "--batch_size", 4, "--train_data", manifest,
                            "--output_dir", tmp_path / "out")],
               expect_ok=False)
    assert proc.returncode != 0
    assert "error: cannot read image" in proc.stderr and "corrupt.jpg" in proc.stderr
    assert not (tmp_path / "out" / "results.json").exists()


UNITS_SCRIPT = '''
import json, os, sys
import train_llava
from torch.distributed.fsdp import FSDPModule
real_train = train_llava.train
def train(cfg, accelerator, model, *rest):  # the prepared model: is each decoder block its own FSDP2 unit?
    layers = accelerator.unwrap_model(model).get_decoder().layers
    if accelerator.is_main_process:
        with open(sys.argv[1], "w") as f:
            json.dump({"block": type(layers[0]).__name__, "units": [isinstance(m, FSDPModule) for m in layers]}, f)
    return real_train(cfg, accelerator, model, *rest)
train_llava.train = train
train_llava.main(sys.argv[2:])
os._exit(0)
'''


def test_fsdp2_shards_a_mistral_language_model_block_by_block_and_it_trains_and_resumes(tmp_path, llava_inputs):
    """fsdp.yaml names no block classes: each block of the model's own _no_split_modules is a unit, whatever the
    family (a Mistral language model here, where a list of Llama and CLIP classes would have left it one unit)."""
    from tools.make_tiny_llava import build_tiny_llava

    _, data = llava_inputs
    model = build_tiny_llava(tmp_path / "mistral", text_model="mistral")
    script = tmp_path / "units.py"
    script.write_text(UNITS_SCRIPT)
    out = tmp_path / "run"
    args = llava_args(model, data, "--batch_size", 4, "--checkpoint_every", 1, "--mixed_precision", "no",
                      "--output_dir", out)
    run([*launch(), "--config_file", "accelerate_configs/fsdp.yaml", str(script), str(tmp_path / "units.json"),
         *args, "--max_steps", "2"])
    units = json.loads((tmp_path / "units.json").read_text())  # fully_shard makes a unit's class FSDP<its class>
    assert units == {"block": "FSDPMistralDecoderLayer", "units": [True, True]}
    resumed = run([*launch(), "--config_file", "accelerate_configs/fsdp.yaml", "train_llava.py", *args,
                   "--max_steps", "4", "--resume_from", "latest"])
    assert "resumed from" in resumed.stdout and "step 2" in resumed.stdout
    results = json.loads((out / "results.json").read_text())
    assert (results["distributed_type"], results["optimizer_steps"]) == ("FSDP", 4)
