"""The distributed setup of both training scripts: FSDP2 on CPU processes (for smoke tests), the checks
Accelerate does not make loudly, and whole tensors from FSDP2 shards and back (for state that must resume on
another number of processes)."""

import os
from pathlib import Path

import torch
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, gather_object
from torch.distributed.tensor import DTensor, distribute_tensor

from common.errors import UserError


def _asked_for_fsdp() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"  # set by `accelerate launch` from fsdp.yaml


def use_fsdp_on_cpu(accelerator) -> None:
    """Make `accelerate launch --config_file accelerate_configs/fsdp.yaml` shard for real on CPU processes.

    Why: Accelerate turns an FSDP launch into FSDP only for GPU-like devices; on CPU processes it
    quietly runs DDP (MULTI_CPU). Its FSDP2 code itself (`fully_shard`, sharded state dicts through
    torch.distributed.checkpoint) runs on CPU over gloo, so a laptop or CI can smoke-test the exact
    path a GPU job takes. This does for CPU processes what `AcceleratorState.__init__` does for GPUs:
    it builds the FSDP plugin from the launch's environment and sets the distributed type to FSDP, in
    both of Accelerate's shared states (`AcceleratorState()` copies `PartialState`'s type over its own
    whenever it is constructed, so setting one alone does not stick). Call it right after
    `Accelerator(...)`, before `prepare`. It checks that Accelerate now reports FSDP2, so that a future
    Accelerate that stores this state elsewhere fails here, loudly, instead of silently running DDP.
    """
    if not _asked_for_fsdp() or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # reads FSDP_* variables, as Accelerator() does on GPUs
    if plugin.fsdp_version != 2:
        raise UserError("FSDP on CPU processes is supported with FSDP2 only; set fsdp_version: 2 in the launch config")
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if not (accelerator.distributed_type == DistributedType.FSDP and accelerator.is_fsdp2
            and AcceleratorState().distributed_type == DistributedType.FSDP):
        raise RuntimeError(f"common/distributed.py could not switch Accelerate {accelerator.__module__} to FSDP2 on "
                           f"CPU processes (it reads {accelerator.distributed_type}); its state handling has changed")


def fit_fsdp_wrapping(accelerator, model) -> None:
    """Shard each transformer block of `model` as its own FSDP2 unit, skipping block classes it does not have.

    The launch config names the block classes (`fsdp_transformer_layer_cls_to_wrap`; unset: the model's
    `_no_split_modules`), and Accelerate refuses a name the model lacks, so one fsdp.yaml could not serve
    both LLaVA (Llama and CLIP blocks) and the dual-task network (no blocks: sharded as one unit), and
    LLaVA's own `_no_split_modules` names a CLIP text block it does not contain. Call before `prepare`.
    """
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = accelerator.state.fsdp_plugin if accelerator.is_fsdp2 else None
    if plugin is None or plugin.auto_wrap_policy is not transformer_auto_wrap_policy:
        return
    present = {type(module).__name__ for module in model.modules()}
    wanted = plugin.transformer_cls_names_to_wrap or sorted(getattr(model, "_no_split_modules", None) or [])
    plugin.transformer_cls_names_to_wrap = [name for name in wanted if name in present]


def refuse_silent_fallbacks(accelerator) -> None:
    """Stop if the launch asked for something Accelerate is about to quietly replace.

    Asked for FSDP where it cannot run (one CPU process, where there is nothing to shard over), it
    would quietly run without sharding, and a user would believe they tested sharding when they did
    not. Asked for fp16 on a CPU, it quietly runs fp32 while still reporting fp16.
    """
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise UserError("--mixed_precision fp16 needs a GPU (on a CPU Accelerate would silently run fp32); "
                        "use --mixed_precision bf16 or no")
    if _asked_for_fsdp() and accelerator.distributed_type != DistributedType.FSDP:
        raise UserError(
            f"FSDP was requested, but Accelerate set up {accelerator.distributed_type.value} on "
            f"{accelerator.device.type} with {accelerator.num_processes} process(es); on CPUs, FSDP needs at least "
            f"2 processes (num_processes in the launch config)"
        )


SHARED_FILESYSTEM_FIX = ("put --output_dir on a filesystem every node sees (NFS, Lustre, a cloud bucket mount), "
                         "with the same path on every node")


def check_one_view_of_output_dir(output_dir: Path, resume_path: Path | None) -> None:
    """Every process must see the same output folder: checkpoints are written by every rank and resumed by all.

    On several machines without a shared filesystem each node would see its own folder: a resume would load
    the checkpoint on one node and start from scratch on another (and hang). Compared before anything is
    written, so every process refuses together. A folder that does not exist yet looks alike everywhere;
    `confirm_output_dir_is_shared` checks it once the main process has created it.
    """
    def view() -> tuple:  # not the resolved path: one filesystem may be mounted at different paths
        names = sorted(p.name for p in output_dir.iterdir()) if output_dir.is_dir() else None
        return names, resume_path.name if resume_path else None

    views = gather_object([view()])
    if any(v != views[0] for v in views):
        other = next(i for i, v in enumerate(views) if v != views[0])
        raise UserError(f"process {other} sees another {output_dir} than process 0 (other files or another "
                        f"checkpoint to resume); {SHARED_FILESYSTEM_FIX}")


def confirm_output_dir_is_shared(accelerator, marker: Path, created: bool) -> None:
    """After the main process wrote `marker` (and every process waited), every process must see it."""
    seen = gather_object([marker.exists()])
    if not all(seen):
        if accelerator.is_main_process and created:  # the folder is the run's own, made a moment ago
            import shutil

            shutil.rmtree(marker.parent, ignore_errors=True)
        raise UserError(f"process {seen.index(False)} does not see {marker} written by process 0; "
                        f"{SHARED_FILESYSTEM_FIX}")


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor this process holds: the local shard of a DTensor (FSDP2), the tensor itself otherwise."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def whole(param, shard: torch.Tensor) -> torch.Tensor:
    """`shard`, laid out like `param` (under FSDP2 this process's shard of it), as the full tensor. Under FSDP2 it
    is gathered from every process (a collective: every process calls it); otherwise it is `shard` itself."""
    if not isinstance(param, DTensor):
        return shard
    return DTensor.from_local(shard, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride()).full_tensor()


def part_of(param, full: torch.Tensor) -> torch.Tensor:
    """This process's part of the full tensor `full`, laid out like `param`: under FSDP2 its shard (cut locally,
    nothing is sent), otherwise all of it. The inverse of `whole`, on any number of processes."""
    if not isinstance(param, DTensor):
        return full
    return distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None).to_local()
