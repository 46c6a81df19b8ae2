"""The distributed setup of both training scripts: FSDP2 on CPU processes, the checks Accelerate does not
make loudly, and FSDP2 shards as whole tensors and back (the trainable weights, the EMA), so that state
saved by some number of processes resumes on another."""

import os
import shutil
from pathlib import Path

import torch
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, gather_object
from torch.distributed.tensor import DTensor, distribute_tensor

from common.errors import UserError


def _asked_for_fsdp() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"  # set by `accelerate launch`


def use_fsdp_on_cpu(accelerator) -> None:
    """Make an FSDP launch (accelerate_configs/fsdp.yaml) shard for real on CPU processes.

    Accelerate turns an FSDP launch into FSDP only on GPU-like devices; on CPU processes it quietly runs
    DDP (MULTI_CPU), though its FSDP2 code (`fully_shard`, sharded state dicts) runs there over gloo. So a
    laptop or CI can run the path a GPU job takes, this does what `AcceleratorState.__init__` does on GPUs,
    in both of Accelerate's shared states (`AcceleratorState()` copies `PartialState`'s type over its own),
    and checks that Accelerate now reports FSDP2: if a future Accelerate keeps this state elsewhere, it
    fails here, loudly, instead of silently running DDP. Call it right after `Accelerator(...)`.
    """
    if not _asked_for_fsdp() or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables, as Accelerator() does on GPUs
    if plugin.fsdp_version != 2:
        raise UserError("FSDP on CPU processes is supported with FSDP2 only; set fsdp_version: 2 in the launch config")
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if not (accelerator.is_fsdp2 and AcceleratorState().distributed_type == DistributedType.FSDP):
        raise RuntimeError(f"common/distributed.py could not switch Accelerate to FSDP2 on CPU processes (it reads "
                           f"{accelerator.distributed_type}); its state handling has changed")


def refuse_silent_fallbacks(accelerator) -> None:
    """Stop where Accelerate would quietly replace what the launch asked for: FSDP where it cannot run (one
    CPU process: nothing to shard over), fp16 on a CPU (it runs fp32 while reporting fp16)."""
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise UserError("--mixed_precision fp16 needs a GPU (on a CPU Accelerate would silently run fp32); "
                        "use --mixed_precision bf16 or no")
    if _asked_for_fsdp() and accelerator.distributed_type != DistributedType.FSDP:
        raise UserError(f"FSDP was requested, but Accelerate set up {accelerator.distributed_type.value} on "
                        f"{accelerator.device.type} with {accelerator.num_processes} process(es); on CPUs, FSDP needs "
                        f"at least 2 processes (num_processes in the launch config)")


SHARED = ("put --output_dir on a filesystem every node sees (NFS, Lustre, a cloud bucket mount), with the same "
          "path on every node")


def check_one_view(output_dir: Path, resume_path: Path | None) -> None:
    """Every process must see the same output folder, before anything is written: on several machines
    without a shared filesystem, a resume would load on one node and start afresh on another (and hang).
    A folder that does not exist yet looks alike everywhere: `confirm_shared` checks it once made."""
    names = sorted(p.name for p in output_dir.iterdir()) if output_dir.is_dir() else None
    views = gather_object([(names, resume_path.name if resume_path else None)])  # not paths: mounts differ
    if other := next((i for i, view in enumerate(views) if view != views[0]), None):
        raise UserError(f"process {other} sees another {output_dir} than process 0 (other files or another "
                        f"checkpoint to resume); {SHARED}")


def confirm_shared(accelerator, marker: Path, created: bool) -> None:
    """After the main process wrote `marker` (and every process waited), every process must see it."""
    seen = gather_object([marker.exists()])
    if not all(seen):
        if accelerator.is_main_process and created:  # the folder is the run's own, made a moment ago
            shutil.rmtree(marker.parent, ignore_errors=True)
        raise UserError(f"process {seen.index(False)} does not see {marker} written by process 0; {SHARED}")


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor this process holds: a DTensor's local shard (FSDP2), else the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def whole(param, shard: torch.Tensor) -> torch.Tensor:
    """`shard`, laid out like `param` (under FSDP2: this process's shard of it), as the full tensor; under
    FSDP2 gathered from every process (a collective: every process calls it)."""
    if not isinstance(param, DTensor):
        return shard
    return DTensor.from_local(shard, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride()).full_tensor()


def part_of(param, full: torch.Tensor) -> torch.Tensor:
    """This process's part of `full`, laid out like `param`: under FSDP2 its shard (cut locally), otherwise
    all of it. The inverse of `whole`, on any number of processes."""
    if not isinstance(param, DTensor):
        return full
    return distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None).to_local()
