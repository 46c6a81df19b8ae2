"""Predict with a finished train_llava.py run: P(Yes) (the positive class, e.g. a prompt injection) for each image.

    python predict_llava.py --run_dir runs/llava --data shots/            # a folder of images -> predictions.jsonl
    python predict_llava.py --run_dir runs/llava --data val.jsonl --output scored.jsonl --model /copies/llava-1.5-7b

The base model comes from the adapter's detector.json (the one it was trained on), or --model for a copy of it
elsewhere; a base of another type or size is refused unless --allow_other_base. The question, the resizing and the
class names are the trained ones. Output: one JSON line per image, {"path", "p_yes", "subset", "label"?}; p_yes is
null for an image that could not be read (with --skip_bad_images). Runs on one process or under accelerate launch.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import llava_models as vlm
import train_llava as script  # the data, prompt and model parts the adapter was trained with
from common.config import NON_EMPTY, between, check_domains, parse_config, setting
from common.errors import UserError, exit_on_user_error, first_line, warn
from common.launch import RunFolder, make_accelerator
from common.outputs import check_output_file


@dataclass
class Config:
    run_dir: str | None = setting(None, "a finished run of train_llava.py (its --output_dir)", NON_EMPTY)
    data: str | None = setting(None, "a manifest or a folder of images (labels optional)", NON_EMPTY)
    output: str | None = setting(None, "JSONL to write (default: RUN_DIR/predictions.jsonl)", NON_EMPTY)
    model: str | None = setting(None, "the base model (unset: the adapter's own base, from detector.json)", NON_EMPTY)
    allow_other_base: bool = setting(False, "load the adapter onto a --model of another type or size anyway")
    overwrite: bool = setting(False, "replace --output if it exists")
    batch_size: int = setting(8, "screenshots per batch per process", between(1))
    num_workers: int = setting(2, "DataLoader worker processes that decode images", between(0, 256))
    num_threads: int = setting(0, "PyTorch CPU threads per process (0: PyTorch's default)", between(0, 1024))
    skip_bad_images: bool = setting(False, "skip unreadable images (p_yes null) instead of stopping")
    model_dtype: str | None = setting(None, "the base's dtype (None: bf16 on a GPU)", choices=list(script.DTYPES))
    mixed_precision: str | None = setting(None, "None: what accelerate launch set", choices=["no", "bf16", "fp16"])

    def __post_init__(self):
        check_domains(self)
        if self.run_dir is None or self.data is None:
            raise UserError("predict needs a run and images; pass --run_dir <a finished run> and --data <a manifest or "
                            "a folder of images>")


def read_detector(adapter_dir: Path) -> dict:
    """adapter/detector.json: the question, answer tokens, resizing, class names and base it was trained with."""
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir} holds no LoRA adapter (no adapter_config.json); pass the --output_dir "
                        f"of a finished training run as --run_dir")
    try:
        detector = json.loads((adapter_dir / "detector.json").read_text())
        ok = {"question", "resize", "answer_ids", "base_model"} <= set(detector)
    except (OSError, ValueError, TypeError):
        ok = False
    if not ok:
        raise UserError(f"{adapter_dir / 'detector.json'} is missing or garbled (training writes it beside the "
                        f"adapter); rerun the training run with --resume_from latest to write the adapter again")
    return detector


def base_difference(detector: dict, model_id: str) -> str | None:
    """How the checkpoint `model_id` differs from the base the adapter was trained on; None if it is that base."""
    trained = detector.get("base_identity")
    if trained is None:  # an adapter saved before detector.json held the base's sizes: only the path can tell
        return None if model_id == detector["base_model"] else "path differs"
    given = vlm.base_identity(vlm.check_pretrained(model_id))
    return next((f"{key} is {given[key]!r}, not {value!r}" for key, value in trained.items()
                 if key in given and given[key] != value), None)


def load_trained(model_id: str, adapter_dir: Path, dtype):
    """Base model + saved adapter, as a user would load them: PeftModel.from_pretrained."""
    from peft import PeftModel

    detector = read_detector(adapter_dir)
    vlm.check_pretrained(model_id)
    processor = vlm.load_processor(str(adapter_dir))
    base = script.load_base(model_id, processor, dtype)
    try:
        model = PeftModel.from_pretrained(base, adapter_dir).eval()
    except Exception as err:
        raise UserError(f"cannot load the adapter in {adapter_dir} onto {model_id} ({first_line(err)}); load it onto "
                        f"the base it was trained on ({detector['base_model']}): drop --model") from None
    return model, processor, detector


def choose_base(cfg: Config, accelerator, detector: dict, adapter_dir: Path) -> str:
    """--model, or the adapter's own base (detector.json); one of another type or size only with --allow_other_base."""
    if cfg.model is None:
        accelerator.print(f"base model {detector['base_model']}, from {adapter_dir / 'detector.json'} (--model to load "
                          f"a copy from elsewhere)")
    base = cfg.model or detector["base_model"]
    difference = base_difference(detector, base)
    if difference and not cfg.allow_other_base:
        raise UserError(f"{base} is not the base model the adapter in {adapter_dir} was trained on "
                        f"({detector['base_model']}): its {difference}; drop --model to use the trained base, or pass "
                        f"--allow_other_base true to use this one anyway")
    if difference:
        warn(f"--allow_other_base: the adapter goes onto {base}, not the base it was trained on (its {difference})")
    return base


def predict(cfg: Config) -> dict:
    """Write {"path", "p_yes", "subset", "label"?} per image, from base + saved adapter; returns the scores."""
    accelerator = make_accelerator(cfg.mixed_precision)
    with RunFolder(accelerator, cfg.run_dir, "--run_dir"):  # not while a run trains (or resumes) in that folder
        adapter_dir = Path(cfg.run_dir) / "adapter"
        detector = read_detector(adapter_dir)
        base = choose_base(cfg, accelerator, detector, adapter_dir)
        classes = (detector.get("negative_label", "benign"), detector.get("positive_label", "malicious"))  # trained
        output = check_output_file(cfg.output or Path(cfg.run_dir) / "predictions.jsonl", cfg.overwrite,
                                   inputs=[cfg.data], flag="--output")
        samples, _ = script.load_samples(cfg.data, cfg.skip_bad_images, need_labels=False, classes=classes)
        dtype = script.base_dtype(cfg.model_dtype, accelerator.mixed_precision)
        model, processor, detector = load_trained(base, adapter_dir, dtype)
        prompt = script.build_prompt(processor, detector["question"])
        loader = script.make_loader(samples, processor, prompt, detector["resize"], cfg.batch_size, cfg.num_workers)
        model, loader = accelerator.prepare(model, loader)
        scored = script.score_images(model, loader, accelerator, detector["answer_ids"], cfg.skip_bad_images, set())
        if accelerator.is_main_process:
            output.parent.mkdir(parents=True, exist_ok=True)
            script.write_predictions(output, samples, scored)
            print(f"P(Yes) for {len(scored['index'])} images written to {output}")
        accelerator.wait_for_everyone()
        return scored


def main(argv=None) -> dict:
    cfg = parse_config(Config, argv, description=__doc__.split("\n")[0])
    if cfg.num_threads:
        import torch

        torch.set_num_threads(cfg.num_threads)
    vlm.quiet_progress_bars()
    return predict(cfg)


if __name__ == "__main__":
    exit_on_user_error(main)
