"""Checks on the distributed setup that Accelerate itself does not make loudly."""

import os

from accelerate.utils import DistributedType

from common.errors import UserError


def refuse_silent_fallbacks(accelerator) -> None:
    """Stop if the launch asked for something Accelerate is about to quietly replace.

    Accelerate never runs FSDP on a CPU: launched with an FSDP config there, it quietly runs DDP (or
    independent processes), and a user would believe they tested sharding when they did not. Asked
    for fp16 on a CPU, it quietly runs fp32 while still reporting fp16.
    """
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise UserError("--mixed_precision fp16 needs a GPU (on a CPU Accelerate would silently run fp32); "
                        "use --mixed_precision bf16 or no")
    asked_for_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if asked_for_fsdp and accelerator.distributed_type != DistributedType.FSDP:
        raise UserError(
            f"FSDP was requested, but Accelerate set up {accelerator.distributed_type.value} on "
            f"{accelerator.device.type} (FSDP needs GPUs); launch with accelerate_configs/ddp.yaml on this machine"
        )
