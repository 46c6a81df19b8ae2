"""The CPU demo of train_llava.py, in one command: a tiny random LLaVA learns to flag synthetic screenshots.

    python tools/demo.py                       # about 20-30 s on 2 cores -> runs/llava_tiny_cpu/adapter
    python tools/demo.py --epochs 2 --seed 3   # any train_llava.py flag overrides configs/llava_tiny_cpu.yaml

Builds the tiny model (tools/make_tiny_llava.py) and the screenshots (tools/make_synthetic_screenshots.py) where
the config puts them, if they are absent, and only into new or empty folders (nothing a user owns is touched),
then trains with train_llava.py's main(). Once they exist, `train_llava.py --config configs/llava_tiny_cpu.yaml`
(under `accelerate launch` too) trains on them directly.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the repo's modules are importable

import train_llava  # noqa: E402
from common.errors import UserError, exit_on_user_error  # noqa: E402
from tools.make_synthetic_screenshots import make_dataset  # noqa: E402
from tools.make_tiny_llava import build_tiny_llava  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "llava_tiny_cpu.yaml"


def main(argv: list[str] | None = None) -> dict:
    argv = ["--config", str(CONFIG), *(sys.argv[1:] if argv is None else argv)]
    cfg = train_llava.Config.parse(argv)  # a bad flag is refused before anything is built
    model = Path(cfg.model)
    manifest = Path(cfg.train_data)
    if not manifest.exists() and (manifest.name != "train.jsonl" or manifest.parent.is_dir()
                                  and any(manifest.parent.iterdir())):
        raise UserError(f"--train_data {manifest} does not exist, and the demo writes train.jsonl, val.jsonl and "
                        f"test.jsonl only into a new or empty folder; check the path, or name <new folder>/train.jsonl")
    if not model.exists() or model.is_dir() and not any(model.iterdir()):
        print(f"building a tiny random LLaVA in {build_tiny_llava(model)}")
    if not manifest.exists():
        print(f"writing synthetic screenshots to {make_dataset(manifest.parent)}")
    return train_llava.main(argv)


if __name__ == "__main__":
    exit_on_user_error(main)
