"""Predict with a finished train_dual_task.py run: the RUL and health state at the last cycle of each unit in a file.

    python predict_dual_task.py --run_dir runs/dual_task --data data/cmapss/test_FD001.txt.gz   # -> predictions.csv
    python predict_dual_task.py --run_dir runs/fd002 --data new_engines.txt --output engines.csv

The file is read by the training script's own `read_runs` (C-MAPSS's format, or your reader's), checked like the
training data, and prepared with the preprocessing saved beside each model (preprocessing.json). A fold ensemble
(--folds K) predicts with every fold's model and averages. The CSV: unit, rul, health_state, p_state_0, ...
"""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from safetensors.torch import load_file

import train_dual_task as script  # the data and model parts the run was trained with
from common.config import NON_EMPTY, check_domains, parse_config, setting
from common.errors import UserError, exit_on_user_error, first_line
from common.launch import RUN_MARKER, RunFolder
from common.outputs import check_output_file
from dual_task_checks import check_runs


@dataclass
class Config:
    run_dir: str | None = setting(None, "a finished run of train_dual_task.py (its --output_dir)", NON_EMPTY)
    data: str | None = setting(None, "units to predict, in the training data's format (like test_FD001.txt)", NON_EMPTY)
    output: str | None = setting(None, "CSV to write (default: RUN_DIR/predictions.csv)", NON_EMPTY)
    overwrite: bool = setting(False, "replace --output if it exists")

    def __post_init__(self):
        check_domains(self)
        if self.run_dir is None or self.data is None:
            raise UserError("predict needs a run and units; pass --run_dir <a finished run> and --data <a file like "
                            "test_FD001.txt>")


def load_models(run_dir: Path) -> tuple[script.Config, list[tuple[dict, torch.nn.Module]]]:
    """The run's settings, and each of its models (one, or one per fold) with the preprocessing it was trained with."""
    if not (run_dir / RUN_MARKER).is_file():
        raise UserError(f"{run_dir} holds no training run (no {RUN_MARKER}); pass the --output_dir of a finished run")
    trained = parse_config(script.Config, ["--config", str(run_dir / RUN_MARKER)])  # its model and its data format
    models = []
    for folder in script.run_dirs(dataclasses.replace(trained, output_dir=str(run_dir))):  # wherever it lies now
        if not (folder / "model.safetensors").is_file() or not (folder / "preprocessing.json").is_file():
            raise UserError(f"{folder} has no model.safetensors and preprocessing.json: the run has not finished; "
                            f"finish it with --resume_from latest, then predict")
        prep = json.loads((folder / "preprocessing.json").read_text())
        num_features = len(prep["sensor_names"]) + prep["cycle_feature"]
        model = script.DualTaskNet(num_features, trained).eval()
        try:
            model.load_state_dict(load_file(folder / "model.safetensors"))
        except (RuntimeError, OSError) as err:
            raise UserError(f"{folder / 'model.safetensors'} does not fit train_dual_task.py's model "
                            f"({first_line(err)}); predict with the code it was trained with, or train again") from None
        models.append((prep, model))
    return trained, models


@torch.no_grad()
def predict(cfg: Config) -> Path:
    """Write the RUL and health state of every unit in --data (averaged over a fold ensemble's models) as a CSV."""
    run_dir = Path(cfg.run_dir)
    with RunFolder(PartialState(), run_dir, "--run_dir"):  # not while a run trains (or resumes) in that folder
        trained, models = load_models(run_dir)
        output = check_output_file(cfg.output or run_dir / "predictions.csv", cfg.overwrite, inputs=[cfg.data],
                                   flag="--output")
        runs = check_runs(script.read_runs(trained, cfg.data))["predict"]
        preds = []
        probs = []
        for prep, model in models:
            features = script.apply_preprocessing(runs, prep)
            x, _, units = script.windows_per_unit(features, runs.rul, runs.unit, prep["window"], last_only=True)
            rul, health_logits = model(torch.from_numpy(x))
            preds.append((rul * prep["rul_cap"]).clamp(0, prep["rul_cap"]))
            probs.append(health_logits.softmax(-1))
        output.parent.mkdir(parents=True, exist_ok=True)
        script.write_predictions(output, units, torch.stack(preds).mean(0), torch.stack(probs).mean(0))
        print(f"RUL and health state of {len(units)} units of {runs.name} written to {output}")
    return output


def main(argv=None) -> Path:
    return predict(parse_config(Config, argv, description=__doc__.split("\n")[0]))


if __name__ == "__main__":
    exit_on_user_error(main)
