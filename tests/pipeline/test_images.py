"""The Dockerfiles cannot be built here: check what they copy exists and their entrypoints
resolve in the installed package."""
import configparser
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = {"trainer": REPO / "images/trainer/Dockerfile",
               "predictor": REPO / "images/predictor/Dockerfile"}


def instructions(path: Path):
    text = re.sub(r"\\\n", " ", path.read_text())
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            yield word.upper(), rest.strip()


def json_array(rest: str):
    import json

    return json.loads(rest)


@pytest.mark.parametrize("role", sorted(DOCKERFILES))
def test_every_copied_path_exists(role):
    copies = [rest for word, rest in instructions(DOCKERFILES[role]) if word == "COPY"]
    assert copies
    for rest in copies:
        *sources, _ = shlex.split(rest)
        for source in sources:
            assert (REPO / source).exists(), f"{role}: COPY {source}: not in the repository"


@pytest.mark.parametrize("role", sorted(DOCKERFILES))
def test_entrypoint_is_the_kubeseg_cli(role):
    from kubeseg.cli import build_parser

    steps = dict(instructions(DOCKERFILES[role]))
    assert json_array(steps["ENTRYPOINT"]) == ["kubeseg"]
    scripts = configparser.ConfigParser()
    scripts.read(REPO / "setup.cfg")
    assert "kubeseg = kubeseg.cli:main" in scripts["options.entry_points"]["console_scripts"]
    command = json_array(steps["CMD"])
    if command != ["--help"]:
        args = build_parser().parse_args(command)
        assert args.verb in ("serve", "train")


def test_predictor_serves_where_the_inference_service_expects():
    from kubeseg.cli import build_parser
    from kubeseg.deploy.inference_service import HTTP_PORT, MODEL_MOUNT

    steps = dict(instructions(DOCKERFILES["predictor"]))
    args = build_parser().parse_args(json_array(steps["CMD"]))
    assert args.verb == "serve" and args.model_uri == MODEL_MOUNT
    assert args.port == HTTP_PORT and steps["EXPOSE"] == str(HTTP_PORT)
    assert "whl/cpu" in DOCKERFILES["predictor"].read_text()


def test_trainer_has_what_the_pipeline_needs():
    text = DOCKERFILES["trainer"].read_text()
    assert ".[kfp,deploy]" in text  # components import kfp (no install at run time)
    from components.images import PREDICTOR_IMAGE, TRAINER_IMAGE
    from kubeseg import __version__

    assert TRAINER_IMAGE.endswith(f"trainer:{__version__}")
    assert PREDICTOR_IMAGE.endswith(f"predictor:{__version__}")
    assert "-t " + TRAINER_IMAGE in text
