"""The CPU demo's inputs for train_llava.py (--build_tiny_model, --make_synthetic_data): built only when asked and
absent, and only into new or empty folders (bad input changes nothing a user owns)."""

from pathlib import Path

from common.errors import UserError


def prepare_demo_inputs(cfg, accelerator) -> None:
    """Build the tiny model and the synthetic screenshots when asked to and absent: only into new or empty folders."""
    model_dir, manifest = Path(cfg.model), Path(cfg.train_data)
    build_model = cfg.build_tiny_model and (not model_dir.exists()
                                            or (model_dir.is_dir() and not any(model_dir.iterdir())))
    make_data = cfg.make_synthetic_data and not manifest.exists()
    if make_data and (manifest.name != "train.jsonl" or (manifest.parent.exists() and any(manifest.parent.iterdir()))):
        raise UserError(f"--train_data {manifest} does not exist, and --make_synthetic_data writes train.jsonl, "
                        "val.jsonl and test.jsonl only into a new or empty folder; check the path, or name "
                        "<new folder>/train.jsonl")
    if accelerator.is_main_process and build_model:
        from tools.make_tiny_llava import build_tiny_llava

        print(f"building a tiny random LLaVA in {build_tiny_llava(model_dir)}")
    if accelerator.is_main_process and make_data:
        from tools.make_synthetic_screenshots import make_dataset

        print(f"writing synthetic screenshots to {make_dataset(manifest.parent)}")
    accelerator.wait_for_everyone()
