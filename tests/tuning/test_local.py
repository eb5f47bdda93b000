"""``kubeseg tune --local``: real training trials chosen by Optuna on the shapes sample."""
from __future__ import annotations

import csv
import json

import pytest

from kubeseg.artifact import read_info
from kubeseg.data.synthetic import make_shapes_dataset
from kubeseg.errors import ConfigError
from kubeseg.tuning.local import LocalSearch, tune_locally
from kubeseg.tuning.space import parse_search

SMALL = ["--set", "backbone=resnet-18", "--set", "num_classes=3",
         "--set", "num_training_samples=4", "--set", "crop_size=32", "--set", "base_size=32",
         "--set", "epochs=2", "--set", "mini_batch_size=2",
         "--set", "validation_mini_batch_size=1", "--set", "use_pretrained_model=False"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes-tune")
    make_shapes_dataset(root, n_train=4, n_val=2, size=32, num_classes=3, seed=3)
    return root


@pytest.mark.slow
def test_local_search_runs_real_trials_and_keeps_every_artifact(shapes, tmp_path, capsys):
    from kubeseg.cli import main

    out = tmp_path / "tune"
    code = main(["tune", "--local", "--trials", "4", "--data-root", str(shapes), "--output",
                 str(out), "--device", "cpu", "--search", "learning_rate=0.0005:0.02:log",
                 "--search", "optimizer=adam,rmsprop", *SMALL])
    printed = capsys.readouterr().out
    assert code == 0, printed
    with open(out / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["trial"]) for r in rows] == [0, 1, 2, 3]
    assert all(r["state"] == "complete" for r in rows), rows
    suggested = set()
    for r in rows:
        lr = float(r["learning_rate"])
        assert 0.0005 <= lr <= 0.02 and r["optimizer"] in ("adam", "rmsprop")
        suggested.add((lr, r["optimizer"]))
        # every trial's artifact is kept, trained with the suggested values and the tuner key
        info = read_info(r["output"] + "/model")
        assert info.hyperparameters.learning_rate == pytest.approx(lr)
        assert info.hyperparameters.optimizer == r["optimizer"]
        assert dict(info.hyperparameters.tuner_keys) == {
            "_tuning_objective_metric": "validation:mIOU"}
        # its score is the best epoch's validation mIoU from its own metrics
        history = [json.loads(line) for line in
                   open(r["output"] + "/metrics.jsonl").read().splitlines()]
        assert float(r["validation:mIOU"]) == pytest.approx(
            max(h["validation:mIOU"] for h in history))
    assert len(suggested) == 4  # four different trials, not one repeated
    best = json.loads((out / "best.json").read_text())["best"]
    top = max(rows, key=lambda r: float(r["validation:mIOU"]))
    assert best["trial"] == int(top["trial"])
    assert best["parameters"]["optimizer"] == top["optimizer"]
    # what the user sees: the table and the best parameters
    assert "validation:mIOU" in printed and "best parameters:" in printed
    assert f"best trial {best['trial']}:" in printed
    table = printed.split("trials table:")[0].splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith("trial "))
    assert [line.split()[0] for line in table[header + 1:]] == [
        f"{n}{'*' if n == best['trial'] else ''}" for n in range(4)]


@pytest.mark.slow
def test_a_trial_that_training_refuses_is_recorded_and_the_search_goes_on(shapes, tmp_path):
    # lr_scheduler=step needs lr_scheduler_step: only some suggestions are refused
    space = parse_search(["lr_scheduler=poly,step"])
    fixed = {"backbone": "resnet-18", "num_classes": 3, "num_training_samples": 4,
             "crop_size": 32, "base_size": 32, "epochs": 1, "mini_batch_size": 2,
             "validation_mini_batch_size": 1, "use_pretrained_model": False}
    from kubeseg.data.channels import Channels

    result = tune_locally(space, fixed, Channels.from_root(str(shapes)), str(tmp_path / "t"),
                          search=LocalSearch(trials=4, algorithm="random", seed=1),
                          device="cpu")
    states = {t.parameters["lr_scheduler"]: t.state for t in result.trials}
    assert states.get("step") == "failed" and states.get("poly") == "complete", states
    failed = [t for t in result.trials if t.state == "failed"][0]
    assert "lr_scheduler_step is required" in failed.error
    assert result.best is not None and result.best.parameters["lr_scheduler"] == "poly"


def test_local_options_are_checked():
    with pytest.raises(ConfigError) as err:
        tune_locally(parse_search(None), {}, None, "/tmp/x",
                     search=LocalSearch(trials=0, algorithm="cmaes"))
    assert "trials=0" in str(err.value) and "algorithm='cmaes'" in str(err.value)
