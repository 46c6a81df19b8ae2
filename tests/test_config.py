from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from common.config import check_domains, parse_config, save_config
from common.errors import UserError


@dataclass
class Cfg:
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    epochs: int = 10
    name: str = "run"
    use_ema: bool = True
    sensors: list[int] = field(default_factory=lambda: [2, 3])
    resume_from: str | None = None
    precision: str = field(default="no", metadata={"choices": ["no", "bf16", "fp16"]})

    def __post_init__(self):  # as every script's Config does
        check_domains(self)


def test_defaults_yaml_and_cli_in_order_of_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.5\nepochs: 3\nsensors: [7, 8, 9]\nuse_ema: false\n")
    cfg = parse_config(Cfg, ["--config", str(path), "--epochs", "4"])
    assert cfg.lr == 0.5 and cfg.epochs == 4 and cfg.sensors == [7, 8, 9] and cfg.use_ema is False
    assert cfg.name == "run" and cfg.resume_from is None


def test_cli_types_lists_bools_and_none():
    cfg = parse_config(Cfg, ["--sensors", "1,2,3", "--use_ema", "false", "--lr", "3e-4", "--resume_from", "latest"])
    assert cfg.sensors == [1, 2, 3] and cfg.use_ema is False and cfg.lr == 3e-4 and cfg.resume_from == "latest"
    assert parse_config(Cfg, ["--resume_from", "none"]).resume_from is None


@pytest.mark.parametrize(
    "argv, yaml_text, message",
    [
        (["--lrr", "1"], None, "unknown config key 'lrr' in the command line (did you mean 'lr'?)"),
        ([], "epoch: 3\n", "unknown config key 'epoch' in"),
        (["--epochs", "ten"], None, "config key 'epochs' expects int, got 'ten'"),
        ([], "epochs: 2.5\n", "config key 'epochs' expects int, got 2.5"),
        ([], "lr: [1, 2]\n", "config key 'lr' expects float"),
        (["--use_ema", "maybe"], None, "config key 'use_ema' expects bool"),
        (["--precision", "fp8"], None, "--precision 'fp8' is not one of no, bf16, fp16"),
        ([], "- a\n- b\n", "must be a mapping"),
        ([], "lr: [1,\n", "is not valid YAML"),
    ],
)
def test_bad_config_is_rejected_with_a_clear_message(tmp_path, argv, yaml_text, message):
    if yaml_text is not None:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml_text)
        argv = ["--config", str(path), *argv]
    with pytest.raises(UserError) as err:
        parse_config(Cfg, argv)
    assert message in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        parse_config(Cfg, ["--config", str(tmp_path / "nope.yaml")])


def test_saved_config_loads_back_identically(tmp_path):
    cfg = parse_config(Cfg, ["--lr", "0.01", "--sensors", "4,5"])
    save_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["sensors"] == [4, 5]
    assert parse_config(Cfg, ["--config", str(tmp_path / "config.yaml")]) == cfg


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_experiment_configs_load_and_name_their_subset(path):
    """A typo in a shipped config would only show when someone runs it; and `--config configs/fd003.yaml`
    alone must train FD003, not the default subset with FD003's settings."""
    import train_dual_task
    import train_llava

    script = train_llava if path.name.startswith("llava") else train_dual_task
    cfg = parse_config(script.Config, ["--config", str(path)])
    if path.name.startswith("fd00"):
        assert cfg.data == path.stem.upper()
