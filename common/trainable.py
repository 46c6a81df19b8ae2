"""The trainable weights of a model: gather them (from FSDP2 shards) and put them back, for both training scripts'
best weights; and for a frozen base with LoRA (train_llava.py): checkpoint only them, save them as an adapter, and
merge a saved adapter into its base."""

from pathlib import Path

import torch

from common.distributed import local, part_of
from common.run_log import replace_folder, write_json, writing


def gather_trainable(accelerator, model) -> dict:
    """A copy of the trainable (e.g. LoRA) weights as full CPU tensors, named as in the unwrapped model: to save, or
    to put back with `restore_trainable` on any number of processes. Under FSDP2 each is a DTensor shard and
    `full_tensor()` is a collective: every process must call this. Gathering just the adapters (not
    `accelerator.get_state_dict`, which would gather the frozen base too) keeps a 7B model's gather to a few MB."""
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().to("cpu", copy=True)
            for name, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}


@torch.no_grad()
def restore_trainable(accelerator, model, weights: dict) -> None:
    """Put weights from `gather_trainable` back into the prepared model, each process its own part (nothing to do
    for none). All of them or an error: a name that does not match would otherwise leave a weight as it was."""
    trainable = {name: p for name, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
    if weights and weights.keys() != trainable.keys():
        raise RuntimeError(f"saved weights do not match the model's trainable ones: "
                           f"{sorted(weights.keys() ^ trainable.keys())[:3]}")
    for name, p in trainable.items() if weights else ():
        local(p).copy_(part_of(p, weights[name]))


def checkpoint_trainable_only(model) -> None:
    """Checkpoints of `model` hold its trainable weights only (LoRA: megabytes, not the frozen 7B base).

    Done with the model's own state-dict hooks (public torch API), so that every way Accelerate saves
    and loads it sees the same trainable-only state dict: DDP's or one process's model.safetensors,
    and FSDP2's sharded torch.distributed.checkpoint folder. On loading, the frozen weights (already
    in the model, from the base checkpoint) do not count as missing; a missing trainable one still
    fails. Call before `accelerator.prepare`.
    """
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}

    def drop_frozen(module, state_dict, prefix, local_metadata):
        for name in frozen:
            state_dict.pop(prefix + name, None)

    def is_frozen(key: str) -> bool:  # the key may carry a wrapper's prefix ("module." under DDP)
        return key in frozen or any(key[i + 1:] in frozen for i, char in enumerate(key) if char == ".")

    def frozen_weights_are_not_missing(module, incompatible_keys):
        incompatible_keys.missing_keys[:] = [key for key in incompatible_keys.missing_keys if not is_frozen(key)]

    model.register_state_dict_post_hook(drop_frozen)
    model.register_load_state_dict_post_hook(frozen_weights_are_not_missing)


def save_adapter(accelerator, model, processor, adapter_dir: Path, notes: dict) -> Path:
    """The LoRA adapter (save_pretrained: PeftModel.from_pretrained loads it), the processor and `notes` as
    detector.json beside it, written to a temporary folder and renamed. Every process calls it (FSDP gathers the
    shards); the main process writes."""
    tmp = adapter_dir.with_name(f".{adapter_dir.name}.tmp")
    state_dict = gather_trainable(accelerator, model)  # a collective call under FSDP: every process
    if accelerator.is_main_process:
        with writing(tmp, tmp=tmp):
            accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict)
            processor.save_pretrained(tmp)
            write_json(tmp / "detector.json", notes)
            replace_folder(tmp, adapter_dir)
    accelerator.wait_for_everyone()
    return adapter_dir


def save_merged(base, adapter_dir: Path, processor, output_dir: Path) -> None:
    """`base` + the adapter saved in `adapter_dir`, merged into full weights, saved with `processor` in `output_dir`
    (through a temporary folder). Reloads the adapter as a user would, in one process, whatever the training setup."""
    from peft import PeftModel

    tmp = output_dir.with_name(f".{output_dir.name}.tmp")
    with writing(tmp, tmp=tmp):
        PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().save_pretrained(tmp)
        processor.save_pretrained(tmp)
        replace_folder(tmp, output_dir)
