"""Checks on the distributed setup that Accelerate itself does not make loudly."""

import os

from accelerate.utils import DistributedType

from common.errors import UserError


def refuse_silent_fallbacks(accelerator) -> None:
    """Stop if FSDP was asked for but Accelerate is about to run something else.

    Accelerate never runs FSDP on a CPU: launched with an FSDP config there, it quietly runs DDP (or
    independent processes), and a user would believe they tested sharding when they did not.
    """
    asked_for_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if asked_for_fsdp and accelerator.distributed_type != DistributedType.FSDP:
        raise UserError(
            f"FSDP was requested, but Accelerate set up {accelerator.distributed_type.value} on "
            f"{accelerator.device.type} (FSDP needs GPUs); launch with accelerate_configs/ddp.yaml on this machine"
        )
