import json

import pytest

from kubeseg.config import Hyperparameters, parameter_table, parse_assignments
from kubeseg.errors import ConfigError

REQUIRED = {"num_classes": 3, "num_training_samples": 10}


def test_defaults_match_the_reference_contract():
    hp = Hyperparameters.from_dict(REQUIRED)
    assert (hp.backbone, hp.algorithm, hp.use_pretrained_model) == ("resnet-50", "fcn", True)
    assert (hp.base_size, hp.crop_size, hp.epochs) == (520, 240, 10)
    assert (hp.learning_rate, hp.lr_scheduler, hp.lr_scheduler_factor) == (0.001, "poly", 0.1)
    assert (hp.mini_batch_size, hp.validation_mini_batch_size, hp.optimizer) == (16, 16, "sgd")
    assert (hp.momentum, hp.weight_decay, hp.gamma1, hp.gamma2) == (0.9, 0.0001, 0.9, 0.9)
    assert (hp.early_stopping, hp.early_stopping_min_epochs, hp.early_stopping_patience,
            hp.early_stopping_tolerance) == (False, 5, 4, 0.0)
    assert (hp.syncbn, hp.precision_dtype) == (False, "float32")


def test_strings_parse_as_from_a_form():
    hp = Hyperparameters.from_dict({
        "num_classes": "3", "num_training_samples": "1464", "use_pretrained_model": "False",
        "learning_rate": "1e-3", "lr_scheduler": "step", "lr_scheduler_step": "10, 20",
        "early_stopping": "True", "epochs": "30", "class_weights": "[1, 2.5, 0]"})
    assert hp.num_classes == 3 and hp.use_pretrained_model is False
    assert hp.learning_rate == pytest.approx(0.001)
    assert hp.lr_scheduler_step == (10, 20) and hp.early_stopping is True
    assert hp.class_weights == (1.0, 2.5, 0.0)


def test_all_problems_reported_at_once_with_names_ranges_and_suggestions():
    with pytest.raises(ConfigError) as err:
        Hyperparameters.from_dict({"num_classes": 300, "optimiser": "sgd",
                                   "learning_rate": "0", "backbone": "resnet50",
                                   "epochs": "ten"})
    problems = err.value.problems
    text = str(err.value)
    assert len(problems) == 6, problems
    assert "num_classes=300" in text and "[2, 254]" in text
    assert "unknown hyperparameter 'optimiser'" in text and "did you mean 'optimizer'" in text
    assert "learning_rate='0'" in text and "(0, 1]" in text
    assert "backbone='resnet50'" in text and "did you mean 'resnet-50'" in text
    assert "epochs='ten'" in text and "not an integer" in text
    assert "num_training_samples is required" in text


def test_cross_checks():
    with pytest.raises(ConfigError, match="lr_scheduler_step is required"):
        Hyperparameters.from_dict({**REQUIRED, "lr_scheduler": "step"})
    with pytest.raises(ConfigError, match="strictly increasing"):
        Hyperparameters.from_dict({**REQUIRED, "lr_scheduler_step": "20, 10"})
    with pytest.raises(ConfigError, match="class_weights has 2 values"):
        Hyperparameters.from_dict({**REQUIRED, "class_weights": "1, 2"})


def test_json_round_trip_is_lossless():
    hp = Hyperparameters.from_dict({**REQUIRED, "lr_scheduler": "step",
                                    "lr_scheduler_step": "3,6", "class_weights": "1,2,3",
                                    "learning_rate": 0.0123})
    again = Hyperparameters.from_json(hp.to_json())
    assert again == hp
    assert json.loads(hp.to_json())["lr_scheduler_step"] == [3, 6]


def test_replace_checks_values():
    hp = Hyperparameters.from_dict(REQUIRED)
    assert hp.replace(epochs="3").epochs == 3
    with pytest.raises(ConfigError, match="momentum"):
        hp.replace(momentum=2)


def test_effective_crop_size_rounds_up_to_a_multiple_of_the_output_stride():
    assert Hyperparameters.from_dict({**REQUIRED, "crop_size": 241}).effective_crop_size == 248
    assert Hyperparameters.from_dict({**REQUIRED, "crop_size": 240}).effective_crop_size == 240
    at_16 = {**REQUIRED, "output_stride": "16"}
    assert Hyperparameters.from_dict({**at_16, "crop_size": 241}).effective_crop_size == 256
    assert Hyperparameters.from_dict({**at_16, "crop_size": 248}).effective_crop_size == 256
    assert Hyperparameters.from_dict(at_16).output_stride == 16


def test_output_stride_is_8_or_16():
    assert Hyperparameters.from_dict(REQUIRED).output_stride == 8  # the reference's
    for bad in ("32", "12", "eight"):
        with pytest.raises(ConfigError, match=f"output_stride='{bad}'.*allowed: 8 \\| 16"):
            Hyperparameters.from_dict({**REQUIRED, "output_stride": bad})


def test_parse_assignments_and_table():
    assert parse_assignments(["epochs=3", " optimizer = adam "]) == {"epochs": "3",
                                                                     "optimizer": "adam"}
    with pytest.raises(ConfigError, match="expected name=value"):
        parse_assignments(["epochs"])
    table = parameter_table()
    for name in Hyperparameters.specs():
        assert name in table
    assert "(required)" in table


def test_invalid_json_is_a_clear_error():
    with pytest.raises(ConfigError, match="hp.json is not valid JSON"):
        Hyperparameters.from_json("{nope", source="hp.json")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        Hyperparameters.from_json("[1, 2]")


def test_tuner_added_keys_are_accepted_and_recorded():
    # what a tuner adds to every training job's hyperparameters (SageMaker's tuner, Katib trials)
    hp = Hyperparameters.from_dict({**REQUIRED, "_tuning_objective_metric": "validation:mIOU",
                                    "sagemaker_job_name": "seg-tune-001"})
    assert dict(hp.tuner_keys) == {"_tuning_objective_metric": "validation:mIOU",
                                   "sagemaker_job_name": "seg-tune-001"}
    recorded = json.loads(hp.to_json())
    assert recorded["_tuning_objective_metric"] == "validation:mIOU"
    again = Hyperparameters.from_json(hp.to_json())
    assert again == hp and dict(again.tuner_keys) == dict(hp.tuner_keys)
    assert dict(hp.replace(epochs=2).tuner_keys) == dict(hp.tuner_keys)
    # not hyperparameters: the training values and to_dict() are untouched
    assert "_tuning_objective_metric" not in hp.to_dict()
    assert hp == Hyperparameters.from_dict(REQUIRED)
    assert not Hyperparameters.from_dict(REQUIRED).tuner_keys


def test_tuner_keys_do_not_hide_real_problems():
    with pytest.raises(ConfigError) as err:
        Hyperparameters.from_dict({**REQUIRED, "_tuning_objective_metric": "validation:mIOU",
                                   "tuning_objective_metric": "x", "momentum": 2})
    assert len(err.value.problems) == 2
    assert "unknown hyperparameter 'tuning_objective_metric'" in str(err.value)
    assert "momentum=2" in str(err.value)


def test_cross_checks_are_reported_together_with_every_other_problem():
    with pytest.raises(ConfigError) as err:
        Hyperparameters.from_dict({**REQUIRED, "lr_scheduler": "step", "momentum": "2",
                                   "learning_rat": "0.1", "class_weights": "1, 2"})
    text = str(err.value)
    assert len(err.value.problems) == 4, err.value.problems
    assert "lr_scheduler_step is required when lr_scheduler=step" in text
    assert "momentum='2'" in text and "(0, 1]" in text
    assert "did you mean 'learning_rate'" in text
    assert "class_weights has 2 values" in text


def test_a_cross_check_on_a_value_that_did_not_parse_is_not_reported_twice():
    with pytest.raises(ConfigError) as err:
        Hyperparameters.from_dict({**REQUIRED, "lr_scheduler": "step",
                                   "lr_scheduler_step": "ten"})
    assert len(err.value.problems) == 1
    assert "lr_scheduler_step='ten'" in str(err.value)


def test_hyperparameters_check_command_lists_every_problem(tmp_path, capsys):
    from kubeseg.cli import main

    path = tmp_path / "hp.json"
    path.write_text(json.dumps({"num_classes": "3", "num_training_samples": "10",
                                "lr_scheduler": "step", "weight_decay": "0",
                                "optimiser": "adam"}))
    assert main(["hyperparameters", "--check", str(path)]) == 1
    err = capsys.readouterr().err
    assert "lr_scheduler_step is required" in err
    assert "weight_decay='0'" in err and "(0, 1)" in err
    assert "unknown hyperparameter 'optimiser'" in err
    path.write_text(json.dumps({"num_classes": "3", "num_training_samples": "10",
                                "class_weights": "auto"}))
    assert main(["hyperparameters", "--check", str(path)]) == 0
    assert '"class_weights": "auto"' in capsys.readouterr().out


@pytest.mark.parametrize("value,ok", [("0", False), ("1", False), ("-0.1", False),
                                      ("1e-9", True), ("0.999", True)])
def test_weight_decay_is_an_open_interval(value, ok):
    if ok:
        assert Hyperparameters.from_dict({**REQUIRED, "weight_decay": value}).weight_decay \
            == float(value)
    else:
        with pytest.raises(ConfigError, match=r"weight_decay=.*allowed: \(0, 1\)"):
            Hyperparameters.from_dict({**REQUIRED, "weight_decay": value})


def test_class_weights_auto():
    hp = Hyperparameters.from_dict({**REQUIRED, "class_weights": " Auto "})
    assert hp.class_weights == "auto" and hp.auto_class_weights
    assert Hyperparameters.from_json(hp.to_json()) == hp
    assert not Hyperparameters.from_dict({**REQUIRED, "class_weights": "1,2,3"}) \
        .auto_class_weights
    with pytest.raises(ConfigError, match=r"class_weights='automatic': not a number.*\| auto"):
        Hyperparameters.from_dict({**REQUIRED, "class_weights": "automatic"})


def test_table_marks_what_goes_beyond_the_reference():
    rows = {line.split()[0]: line for line in parameter_table().splitlines() if line.strip()}
    assert "[kubeseg extra values: resnet-18, resnet-34, mobilenet-v3-large, " \
        "efficientnet-lite0, convnext-tiny]" in rows["backbone"]
    assert "[kubeseg extra values: deeplabv3plus, lraspp]" in rows["algorithm"]
    assert "[kubeseg extra values: bfloat16, float16]" in rows["precision_dtype"]
    for name in ("seed", "class_weights", "aux_loss_weight", "channels_last", "compile",
                 "output_stride"):
        assert "[kubeseg extra]" in rows[name]
    for name in ("optimizer", "lr_scheduler", "weight_decay", "num_classes"):
        assert "kubeseg extra" not in rows[name]
    assert "(0, 1)" in rows["weight_decay"]


def test_inference_size_gives_the_scoring_long_side():
    base = dict(num_classes=3, num_training_samples=8, base_size=240)
    assert Hyperparameters.from_dict(base).inference_long_side is None
    hp = Hyperparameters.from_dict({**base, "inference_size": "base_size"})
    assert hp.inference_long_side == 240
    with pytest.raises(ConfigError, match="inference_size") as err:
        Hyperparameters.from_dict({**base, "inference_size": "native"})
    assert "base_size" in str(err.value) and "image" in str(err.value)
