"""The Dockerfiles and the one place image names are set: what the images copy and run, and
that the compiled pipeline, the deploy builders and every kustomize overlay name the same
images for any registry and tag. (Building and running the images: tests/containers.)"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = {"trainer": REPO / "images/trainer/Dockerfile",
               "predictor": REPO / "images/predictor/Dockerfile"}
KUBECTL = "/usr/bin/kubectl"


def instructions(path: Path):
    text = re.sub(r"\\\n", " ", path.read_text())
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            yield word.upper(), rest.strip()


@pytest.mark.parametrize("role", sorted(DOCKERFILES))
def test_every_copied_path_exists_and_is_not_ignored(role):
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    copies = [rest for word, rest in instructions(DOCKERFILES[role]) if word == "COPY"]
    assert copies
    for rest in copies:
        *sources, _ = shlex.split(rest)
        for source in sources:
            assert (REPO / source).exists(), f"{role}: COPY {source}: not in the repository"
            assert source.split("/")[0] not in ignored, f"{role}: {source} is in .dockerignore"


def test_the_build_context_leaves_out_environments_runs_and_data():
    ignored = (REPO / ".dockerignore").read_text().split()
    for entry in (".venv", ".git", "kubeseg-run", "tests", "bench", "**/__pycache__"):
        assert entry in ignored, f".dockerignore lacks {entry}"


@pytest.mark.parametrize("role", sorted(DOCKERFILES))
def test_versions_come_from_requirements_only(role):
    for word, rest in instructions(DOCKERFILES[role]):
        if word == "RUN" and "pip install" in rest:
            for command in rest.split("&&"):
                if "pip install" not in command or "--no-deps" in command:
                    continue
                assert "-c requirements.txt" in command, f"{role}: unpinned: {command}"
                assert not re.search(r"[a-z]==\d", command), f"{role}: a pin in: {command}"


@pytest.mark.parametrize("role", sorted(DOCKERFILES))
def test_images_run_the_cli_as_a_numeric_non_root_user(role):
    steps = list(instructions(DOCKERFILES[role]))
    if role == "trainer":  # KFP runs its own command there
        assert "ENTRYPOINT" not in dict(steps)
        assert json.loads(dict(steps)["CMD"])[0] == "kubeseg"
    else:
        assert json.loads(dict(steps)["ENTRYPOINT"]) == ["kubeseg"]
    users = [rest for word, rest in steps if word == "USER"]
    assert users and users[-1].isdigit() and int(users[-1]) != 0


def test_trainer_and_gpu_predictor_share_the_torch_layer():
    def head(path):
        steps = list(instructions(path))
        end = next(i for i, (w, r) in enumerate(steps) if w == "RUN" and "torch" in r)
        return [(w, r) for w, r in steps[:end + 1] if w != "ARG"]

    assert head(DOCKERFILES["trainer"]) == head(DOCKERFILES["predictor"])


def test_predictor_serves_where_the_inference_service_expects():
    from kubeseg.cli import build_parser
    from kubeseg.deploy.inference_service import HTTP_PORT, MODEL_MOUNT

    steps = dict(instructions(DOCKERFILES["predictor"]))
    args = build_parser().parse_args(json.loads(steps["CMD"]))
    assert args.verb == "serve" and args.model_uri == MODEL_MOUNT
    assert args.port == HTTP_PORT and steps["EXPOSE"] == str(HTTP_PORT)


def test_build_recipes_cover_every_role_and_the_gpu_predictor_takes_cuda_torch():
    sys.path.insert(0, str(REPO / "images"))
    import build

    from kubeseg import images

    assert set(build.RECIPES) == set(images.ROLES)
    dockerfile, args = build.RECIPES[images.PREDICTOR_GPU]
    assert dockerfile == build.RECIPES[images.PREDICTOR][0]
    assert args["TORCH_INDEX_URL"] == build.PYPI
    assert "download.pytorch.org/whl/cpu" in DOCKERFILES["predictor"].read_text()


def test_image_settings_are_checked():
    from kubeseg.errors import ConfigError
    from kubeseg.images import ImageSet, configured

    assert configured(environ={"KUBESEG_IMAGE_REGISTRY": "r.example/x",
                               "KUBESEG_IMAGE_TAG": "7"}).trainer == "r.example/x/trainer:7"
    with pytest.raises(ConfigError, match="registry 'Bad/'"):
        ImageSet("Bad/", "1")
    with pytest.raises(ConfigError, match="tag '-x'"):
        ImageSet("ok.io/a", "-x")


def test_the_checked_in_kustomize_images_are_the_defaults():
    from kubeseg.images import ImageSet, kustomize_component

    path = REPO / "manifests/components/images/kustomization.yaml"
    assert path.read_text() == kustomize_component(ImageSet()), (
        f"{path.relative_to(REPO)} is stale: run 'kubeseg compile' and commit the result")


def _container_images(obj):
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from (c["image"] for c in value if "image" in c)
            else:
                yield from _container_images(value)
    elif isinstance(obj, list):
        for item in obj:
            yield from _container_images(item)


@pytest.mark.skipif(not Path(KUBECTL).exists(), reason=f"{KUBECTL} not found")
def test_one_setting_names_the_same_images_everywhere(tmp_path):
    registry, tag = "registry.example.com:5000/team", "1.2.3-rc1"
    manifests = tmp_path / "manifests"
    shutil.copytree(REPO / "manifests", manifests)
    compiled = tmp_path / "segmentation.yaml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBESEG_IMAGE_")}
    result = subprocess.run(
        [sys.executable, "-m", "kubeseg", "compile", "--registry", registry, "--tag", tag,
         "--output", str(compiled), "--manifests", str(manifests)],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    want = {role: f"{registry}/{role}:{tag}" for role in ("trainer", "predictor",
                                                          "predictor-gpu")}

    spec, _ = yaml.safe_load_all(compiled.read_text())
    executors = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {want["trainer"]}
    text = compiled.read_text()
    assert f"constant: {want['trainer']}" in text  # the distributed-training pods
    assert f"constant: {registry}\n" in text and f"constant: {tag}\n" in text  # deploy step
    assert "ghcr.io/kubeseg/" not in text

    seen = {}
    for overlay in sorted(p.parent for p in (manifests / "overlays").rglob("kustomization.yaml")):
        out = subprocess.run([KUBECTL, "kustomize", str(overlay)], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        for obj in yaml.safe_load_all(out.stdout):
            for image in _container_images(obj or {}):
                assert not image.startswith("kubeseg/"), f"{overlay.name}: unmapped {image}"
                if image.startswith(registry + "/"):
                    seen.setdefault(overlay.name, set()).add(image)
    assert seen == {"serving-cpu": {want["predictor"]}, "serving-gpu": {want["predictor-gpu"]},
                    "retrain": {want["trainer"]}}

    from kubeseg.deploy.inference_service import ServingSpec, build_inference_service
    from kubeseg.deploy.training_job import TrainingJobSpec, build_pytorch_job, build_train_job
    from kubeseg.images import ImageSet

    images = ImageSet(registry, tag)
    os.environ["KUBESEG_IMAGE_REGISTRY"], os.environ["KUBESEG_IMAGE_TAG"] = registry, tag
    try:
        cpu = build_inference_service(ServingSpec("seg", "s3://m/model", gpus=0))
        gpu = build_inference_service(ServingSpec("seg", "s3://m/model", gpus=1))
        spec = TrainingJobSpec(name="train-x", train_args=("--output", "s3://o"), num_nodes=2)
        jobs = [build_pytorch_job(spec), build_train_job(spec)]
    finally:
        del os.environ["KUBESEG_IMAGE_REGISTRY"], os.environ["KUBESEG_IMAGE_TAG"]
    assert set(_container_images(cpu)) == {images.predictor}
    assert set(_container_images(gpu)) == {images.predictor_gpu}
    assert set(_container_images(jobs[0])) == {images.trainer}
    assert jobs[1]["spec"]["trainer"]["image"] == images.trainer
