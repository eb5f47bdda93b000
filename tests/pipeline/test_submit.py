"""``kubeseg submit``: parameters are checked before sending; an unreachable server is named."""
import socket
import subprocess
import sys

import pytest

from kubeseg.errors import ConfigError


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is


def _kubeseg(*args, env=None):
    return subprocess.run([sys.executable, "-m", "kubeseg", *args], capture_output=True,
                          text=True, timeout=120, env=env)


GOOD = "num_classes: 3\nnum_training_samples: 10\nbackbone: resnet-18\ntrain: s3://d/train\n" \
       "lr_scheduler_step: [10, 20]\nlr_scheduler: step\nmin_miou: 0.4\n"


def test_unreachable_host_gives_a_clear_error(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(GOOD)
    port = _closed_port()
    result = _kubeseg("submit", "--host", f"http://127.0.0.1:{port}", "--parameters",
                      str(params))
    assert result.returncode == 1
    assert "cannot reach the Kubeflow Pipelines API" in result.stderr
    assert f"127.0.0.1:{port}" in result.stderr and "--host" in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_parameters_are_rejected_before_sending(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("num_classes: 300\nnum_training_samples: 10\noptimiser: adam\n"
                      "min_miou: 2\nnum_nodes: two\n")
    port = _closed_port()
    result = _kubeseg("submit", "--host", f"http://127.0.0.1:{port}", "--parameters",
                      str(params))
    assert result.returncode == 1
    assert "num_classes=300" in result.stderr and "[2, 254]" in result.stderr
    assert "'optimiser'; did you mean 'optimizer'" in result.stderr
    assert "min_miou=2: out of range; allowed: [0, 1]" in result.stderr
    assert "num_nodes='two'" in result.stderr
    assert "cannot reach" not in result.stderr  # nothing was sent


def test_pipeline_arguments_are_normalised():
    from kubeseg_platform.pipelines.submit import pipeline_arguments

    args = pipeline_arguments({"num_classes": "3", "num_training_samples": 10,
                               "lr_scheduler": "step", "lr_scheduler_step": "10,20",
                               "use_pretrained_model": "False", "num_nodes": 2,
                               "train": "s3://d/train", "deploy_dry_run": "true"})
    assert args == {"num_classes": 3, "num_training_samples": 10, "lr_scheduler": "step",
                    "lr_scheduler_step": "10, 20", "use_pretrained_model": False,
                    "num_nodes": 2, "train": "s3://d/train", "deploy_dry_run": True}
    with pytest.raises(ConfigError, match="num_training_samples is required"):
        pipeline_arguments({"num_classes": 3})


def test_pipeline_parameters_with_fixed_values_are_checked():
    from kubeseg_platform.pipelines.submit import pipeline_arguments

    base = {"num_classes": 3, "num_training_samples": 10}
    args = pipeline_arguments({**base, "training_operator": "pytorchjob", "train_device": "cpu"})
    assert args["training_operator"] == "pytorchjob" and args["train_device"] == "cpu"
    with pytest.raises(ConfigError) as info:
        pipeline_arguments({**base, "training_operator": "tfjob", "train_device": "tpu"})
    text = str(info.value)
    assert "training_operator='tfjob': not one of the choices; allowed: trainer-v2 | " \
           "pytorchjob" in text
    assert "train_device='tpu': not one of the choices (did you mean 'cpu'?); allowed: " \
           "cuda | cpu | auto" in text


@pytest.mark.parametrize("text, value", [("yes", True), ("On", True), ("1", True),
                                         ("TRUE", True), ("no", False), ("off", False),
                                         ("0", False), ("False", False)])
def test_pipeline_booleans_accept_what_the_hyperparameters_accept(text, value):
    from kubeseg_platform.pipelines.submit import pipeline_arguments

    args = pipeline_arguments({"num_classes": 3, "num_training_samples": 10,
                               "deploy_dry_run": text, "use_pretrained_model": text})
    assert args["deploy_dry_run"] is value and args["use_pretrained_model"] is value


def test_a_validation_manifest_needs_a_training_manifest():
    from kubeseg_platform.pipelines.submit import pipeline_arguments

    base = {"num_classes": 3, "num_training_samples": 10}
    with pytest.raises(ConfigError) as info:
        pipeline_arguments({**base, "validation_manifest_uri": "s3://d/validation.manifest"})
    assert "validation_manifest_uri is set but manifest_uri is empty" in str(info.value)
    args = pipeline_arguments({**base, "manifest_uri": "s3://d/train.manifest",
                               "validation_manifest_uri": "s3://d/validation.manifest"})
    assert args["validation_manifest_uri"] == "s3://d/validation.manifest"


def test_ranges_come_from_the_declarations():
    from kubeseg.config import PipelineParameters
    from kubeseg_platform.pipelines.submit import pipeline_arguments

    specs = PipelineParameters.specs()
    assert (specs["min_miou"].low, specs["min_miou"].high) == (0, 1)
    base = {"num_classes": 3, "num_training_samples": 10}
    with pytest.raises(ConfigError) as info:
        pipeline_arguments({**base, "max_regression": -0.1, "canary_traffic_percent": 101,
                            "serving_gpus": -1, "num_nodes": 0})
    text = str(info.value)
    for problem in ("max_regression=-0.1: out of range; allowed: [0, 1]",
                    "canary_traffic_percent=101: out of range; allowed: [0, 100]",
                    "serving_gpus=-1: out of range; allowed: >= 0",
                    "num_nodes=0: out of range; allowed: >= 1"):
        assert problem in text


def test_schedule_becomes_six_field_cron():
    from kubeseg_platform.pipelines.submit import kfp_cron

    assert kfp_cron("0 3 * * 1") == "0 0 3 * * 1"
    assert kfp_cron("0 0 3 * * 1") == "0 0 3 * * 1"
    with pytest.raises(ConfigError, match="5 cron fields"):
        kfp_cron("daily")


def test_check_only_prints_the_arguments(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(GOOD)
    result = _kubeseg("submit", "--host", "http://127.0.0.1:1", "--parameters", str(params),
                      "--check-only")
    assert result.returncode == 0, result.stderr
    assert "lr_scheduler_step: 10, 20" in result.stdout


@pytest.mark.cluster
def test_submit_creates_a_run_on_a_real_server(tmp_path):
    import os

    host = os.environ.get("KUBESEG_TEST_KFP_HOST")
    if not host:
        pytest.skip("needs a Kubeflow Pipelines API server (none can run here): set "
                    "KUBESEG_TEST_KFP_HOST (and KF_PIPELINES_TOKEN where it needs one)")
    params = tmp_path / "params.yaml"
    params.write_text("num_classes: 3\nnum_training_samples: 4\ndeploy_dry_run: true\n")
    result = _kubeseg("submit", "--host", host, "--parameters", str(params))
    assert result.returncode == 0, result.stderr
    assert "created in experiment 'kubeseg'" in result.stdout
