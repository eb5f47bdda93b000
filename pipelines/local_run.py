"""The whole pipeline on one machine with ``kfp.local``, ending with a served prediction.

Two ways to run the steps:

- ``subprocess`` (default): every step runs as a Python process of this environment.
- ``docker``: every step runs in the trainer image through kfp.local's DockerRunner (docker,
  or podman's Docker-compatible API), exactly as the cluster runs it, and the model is then
  served from the predictor image. The containers share the host's network (so they reach an
  S3 endpoint on 127.0.0.1) and see only the pipeline root, so the dataset and the run's files
  live in S3.

Either way a small shapes dataset is generated first, and at the end the model is served on
127.0.0.1, one validation image is sent to ``/invocations``, and the mask and an overlay are
written as PNG files.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional

from kubeseg.storage import TIMING_SETTINGS

logger = logging.getLogger(__name__)

RUNNERS = ("subprocess", "docker")
# The sample run: small enough for a few minutes on 2 CPU cores, large enough to learn shapes.
SAMPLE_HYPERPARAMETERS = {
    "backbone": "resnet-18", "algorithm": "fcn", "use_pretrained_model": False,
    "base_size": 64, "crop_size": 64, "optimizer": "adam", "learning_rate": 0.005,
    "mini_batch_size": 4, "validation_mini_batch_size": 1, "aux_loss_weight": 0.2,
}
# Environment the step containers get from this process (object store access).
STORAGE_ENV = ("KUBESEG_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
               "AWS_SESSION_TOKEN", "AWS_REGION", "KUBESEG_S3_VERIFY",
               *(setting.variable for setting in TIMING_SETTINGS))


@dataclass(frozen=True)
class LocalRunOptions:
    """What ``kubeseg run`` was asked for (see its ``--help``)."""

    workdir: Path
    num_images: int = 24
    num_validation_images: int = 6
    size: int = 64
    num_classes: int = 3
    epochs: int = 8
    min_miou: float = 0.5
    assignments: tuple = ()
    s3_endpoint: Optional[str] = None
    bucket: str = "kubeseg-run"
    runner: str = "subprocess"
    serve: bool = True
    port: int = 0
    verbose: bool = False  # show kfp.local's own output instead of one line per step


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- progress --------------------------------------------------------------------------------
class StepProgress:
    """Everything the pipeline run prints (kfp.local's dumps of each task's inputs and outputs,
    the steps' own logs) goes to ``log_path``; the terminal shows one line per step with its
    status and time, and training's per-epoch metrics. On a terminal a step's line says
    "running" until the step ends, then is overwritten with the outcome.

    Works at the file-descriptor level, because the steps run as child processes (or
    containers) that inherit this process's stdout.
    """

    _ANSI = re.compile(r"\x1b\[[0-9;]*m")
    _STARTED = re.compile(r"Executing task '([^']+)'")
    _FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")
    _EPOCH = re.compile(r"(epoch \d+/\d+: train:loss.*)$")
    _SKIPPED = re.compile(r"Skipping conditional task")

    def __init__(self, log_path: Path):
        self.log_path = Path(log_path)
        self.started: Dict[str, float] = {}
        self.failed: List[str] = []
        self.open_line: Optional[str] = None  # the step whose "running" line has no newline

    def __enter__(self) -> "StepProgress":
        import sys
        import threading

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        self.saved = (os.dup(1), os.dup(2))
        self.terminal = os.fdopen(os.dup(self.saved[0]), "w", buffering=1)
        self.live = self.terminal.isatty()
        self.log = open(self.log_path, "w")
        os.dup2(self.log.fileno(), 1)
        os.dup2(self.log.fileno(), 2)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.thread.start()
        return self

    def _show(self, line: str) -> None:
        line = self._ANSI.sub("", line).rstrip()
        started, finished = self._STARTED.search(line), self._FINISHED.search(line)
        epoch = self._EPOCH.search(line)
        if started:
            name = started.group(1)
            self.started[name] = time.monotonic()
            if self.live:
                self._write(f"  {name:<22} running", end="")
                self.open_line = name
        elif finished:
            name, status = finished.groups()
            took = time.monotonic() - self.started.get(name, time.monotonic())
            if status != "SUCCESS":
                self.failed.append(name)
            self._write(f"  {name:<22} {status.lower()} in {took:.0f} s",
                        overwrite=self.open_line == name)
        elif epoch:
            self._write(f"    {epoch.group(1)}")

    def _write(self, text: str, end: str = "\n", overwrite: bool = False) -> None:
        """One line to the terminal: over the open "running" line, or below it."""
        if self.open_line is not None:
            self.terminal.write("\r" if overwrite else "\n")
            self.open_line = None
        self.terminal.write(text + end)

    def _follow(self) -> None:
        with open(self.log_path, errors="replace") as source:
            pending = ""
            while True:
                chunk = source.read()
                if chunk:
                    pending += chunk
                    *lines, pending = pending.split("\n")
                    for line in lines:
                        self._show(line)
                elif self.done.is_set():
                    return
                else:
                    time.sleep(0.2)

    def __exit__(self, kind, error, trace) -> None:
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        self.done.set()
        self.thread.join(timeout=10)
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        for fd in self.saved:
            os.close(fd)
        self.log.close()
        if self.open_line is not None:
            self.terminal.write("\n")
        if kind is not None:
            tail = self.log_path.read_text(errors="replace").splitlines()[-25:]
            self.terminal.write("\n".join(self._ANSI.sub("", t) for t in tail) + "\n")
            self.terminal.write(f"kubeseg run: the pipeline failed; its whole log is "
                                f"{self.log_path}\n")
        self.terminal.close()


# -- container engine --------------------------------------------------------------------------
@contextlib.contextmanager
def docker_api() -> Iterator[None]:
    """Make sure the Docker API answers for the duration: the one in ``DOCKER_HOST`` (or the
    default socket), else a podman service started on a temporary socket."""
    import docker

    from kubeseg.errors import KubesegError

    try:
        client = docker.from_env()
        client.ping()
        client.close()
        reason = None
    except Exception as exc:  # docker.errors.DockerException and connection errors
        reason = exc
    if reason is None:
        yield
        return
    podman = shutil.which("podman")
    if not podman:
        raise KubesegError(f"--runner docker needs a Docker API ({reason}): start docker, or "
                           "install podman (images/setup-podman.sh)")
    folder = tempfile.mkdtemp(prefix="kubeseg-podman-")
    socket_path = os.path.join(folder, "podman.sock")
    service = subprocess.Popen([podman, "system", "service", "--time=0",
                                f"unix://{socket_path}"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    previous = os.environ.get("DOCKER_HOST")
    os.environ["DOCKER_HOST"] = f"unix://{socket_path}"
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(socket_path):
            if service.poll() is not None or time.monotonic() > deadline:
                raise KubesegError("podman system service did not start: run it by hand "
                                   "('podman system service --time=0 unix:///tmp/podman.sock') "
                                   "and set DOCKER_HOST=unix:///tmp/podman.sock")
            time.sleep(0.2)
        logger.info("using podman's Docker API at %s", os.environ["DOCKER_HOST"])
        yield
    finally:
        service.terminate()
        try:
            service.wait(timeout=10)
        except subprocess.TimeoutExpired:
            service.kill()
        if previous is None:
            os.environ.pop("DOCKER_HOST", None)
        else:
            os.environ["DOCKER_HOST"] = previous
        shutil.rmtree(folder, ignore_errors=True)


class ContainerServer:
    """``kubeseg serve`` from the predictor image on 127.0.0.1:``port`` (host network), with the
    model folder mounted read-only where KServe's storage initializer puts it."""

    def __init__(self, image: str, model_dir: Path, port: int, *, log_path: Path,
                 ready_timeout_s: float = 180.0):
        from kubeseg.deploy.inference_service import MODEL_MOUNT

        self.image, self.port, self.log_path = image, port, log_path
        self.model_dir, self.mount = Path(model_dir).resolve(), MODEL_MOUNT
        self.ready_timeout_s = ready_timeout_s
        self.url = f"http://127.0.0.1:{port}"
        self.container = None

    def __enter__(self) -> "ContainerServer":
        import docker

        from kubeseg.errors import KubesegError

        self.client = docker.from_env()
        self.container = self.client.containers.run(
            self.image, ["serve", self.mount, "--host", "127.0.0.1", "--port", str(self.port)],
            detach=True, network_mode="host",
            volumes={str(self.model_dir): {"bind": self.mount, "mode": "ro"}})
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            self.container.reload()
            if self.container.status == "exited":
                self._save_log()
                raise KubesegError(f"the predictor container ({self.image}) exited before it "
                                   f"was ready; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.url + "/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self._save_log()
                self.__exit__()
                raise KubesegError(f"the predictor container ({self.image}) was not ready "
                                   f"within {self.ready_timeout_s:.0f} s; see {self.log_path}")
            time.sleep(0.5)

    def _save_log(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.write_bytes(self.container.logs())

    def __exit__(self, *exc) -> None:
        if self.container is None:
            return
        try:
            self.container.stop(timeout=10)
            self._save_log()
            self.container.remove(force=True)
        finally:
            self.container = None
            self.client.close()


# -- the run -----------------------------------------------------------------------------------
def _newest_run_dir(pipeline_root: Path, name: str) -> Path:
    from kubeseg.errors import KubesegError

    runs = sorted(pipeline_root.glob(f"{name}-*"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise KubesegError(f"no pipeline run found under {pipeline_root}")
    return runs[-1]


def _task_dir(run_dir: Path, task: str) -> Optional[Path]:
    """The folder of the task that ran: ``task``, or ``task-N`` when the pipeline holds the
    task in several branches (one-GPU or distributed training) and only one of them ran."""
    for folder in sorted(run_dir.iterdir()):
        if re.fullmatch(rf"{re.escape(task)}(-\d+)?", folder.name) \
                and (folder / "executor_output.json").is_file():
            return folder
    return None


def _task_outputs(run_dir: Path, task: str) -> Dict[str, Any]:
    folder = _task_dir(run_dir, task)
    return json.loads((folder / "executor_output.json").read_text()) if folder else {}


def _artifact_metadata(outputs: Mapping[str, Any], name: str) -> Dict[str, Any]:
    artifacts = (outputs.get("artifacts") or {}).get(name, {}).get("artifacts") or [{}]
    return dict(artifacts[0].get("metadata") or {})


def _runner(options: LocalRunOptions, pipeline_root: Path):
    from kfp import local

    if options.runner == "subprocess":
        return local.SubprocessRunner(use_venv=False)
    # The steps run as the images' non-root user; they create their task folders here.
    os.chmod(pipeline_root, 0o1777)
    environment = {k: os.environ[k] for k in STORAGE_ENV if os.environ.get(k)}
    treat_missing_container_as_not_found()
    return local.DockerRunner(network_mode="host", environment=environment)


def treat_missing_container_as_not_found() -> None:
    """Podman's Docker API answers 500 "no such container" where Docker answers 404 when a
    container removed itself (``auto_remove``) between two calls. kfp.local's DockerRunner
    expects the 404 (``docker.errors.NotFound``) after a step that ends quickly, so with podman
    such a step failed the whole run. Raise NotFound for that answer too (once per process)."""
    import docker.errors
    from docker.api.client import APIClient

    original = APIClient._raise_for_status
    if getattr(original, "missing_container_as_not_found", False):
        return

    def raise_for_status(self, response):
        try:
            original(self, response)
        except docker.errors.APIError as exc:
            if exc.status_code == 500 and "no such container" in str(exc.explanation or ""):
                raise docker.errors.NotFound(str(exc), response=response,
                                             explanation=exc.explanation) from exc
            raise

    raise_for_status.missing_container_as_not_found = True
    APIClient._raise_for_status = raise_for_status


def run_local(options: LocalRunOptions) -> List[str]:
    """Run the sample pipeline (and serve its model); returns the summary lines to print."""
    from kubeseg import storage
    from kubeseg.config import Hyperparameters, parse_assignments
    from kubeseg.data.synthetic import class_names as shape_names
    from kubeseg.data.synthetic import make_shapes_dataset
    from kubeseg.errors import ConfigError

    started = time.perf_counter()
    workdir = Path(options.workdir).resolve()
    hp_values = {**SAMPLE_HYPERPARAMETERS, "num_classes": options.num_classes,
                 "num_training_samples": options.num_images, "epochs": options.epochs,
                 "base_size": options.size, "crop_size": options.size,
                 **parse_assignments(list(options.assignments))}
    hp = Hyperparameters.from_dict(hp_values)  # fail before generating anything
    problems = []
    if options.num_images < 1 or options.num_validation_images < 1:
        problems.append("--images and --validation-images must be >= 1")
    if options.runner not in RUNNERS:
        problems.append(f"--runner {options.runner!r}: one of {', '.join(RUNNERS)}")
    if options.runner == "docker" and not options.s3_endpoint:
        problems.append("--runner docker: give --s3-endpoint (the step containers see only "
                        "the pipeline root, so the dataset and the run's files go to S3)")
    if problems:
        raise ConfigError(problems, what="option")

    data_root = workdir / "data"
    channels = make_shapes_dataset(data_root, n_train=options.num_images,
                                   n_val=options.num_validation_images, size=options.size,
                                   num_classes=hp.num_classes, seed=hp.seed)
    output_root = str(workdir / "work")
    champion_uri = str(workdir / "champion")
    if options.s3_endpoint:
        os.environ["KUBESEG_S3_ENDPOINT"] = options.s3_endpoint  # read by every pipeline step
        bucket = f"s3://{options.bucket}"
        storage.ensure_bucket(bucket)
        storage.upload_prefix(str(data_root), storage.join(bucket, "data"))
        channels = {k: storage.join(bucket, "data", Path(v).name) for k, v in channels.items()}
        output_root = storage.join(bucket, "work")
        champion_uri = storage.join(bucket, "champion")
    names = shape_names(hp.num_classes)
    pipeline_root = workdir / "pipeline"
    pipeline_root.mkdir(parents=True, exist_ok=True)

    with (docker_api() if options.runner == "docker" else contextlib.nullcontext()):
        from kfp import local

        from pipelines.segmentation import IMAGES, PIPELINE_NAME, segmentation_pipeline

        where = (f"in {IMAGES.trainer}" if options.runner == "docker" else "as local processes")
        logger.info("running the pipeline with kfp.local (steps %s): %d training / %d "
                    "validation images of %d px, %s/%s, %d epochs; artifacts in %s", where,
                    options.num_images, options.num_validation_images, options.size,
                    hp.algorithm, hp.backbone, hp.epochs, pipeline_root)
        local.init(runner=_runner(options, pipeline_root), pipeline_root=str(pipeline_root))
        arguments = {name: (", ".join(map(str, v)) if isinstance(v, list) else v)
                     for name, v in hp.to_dict().items()}
        log_path = workdir / "pipeline.log"
        if not options.verbose:
            print(f"kubeseg run: steps {where}; full log in {log_path}", flush=True)
        with (contextlib.nullcontext() if options.verbose else StepProgress(log_path)):
            segmentation_pipeline(
                **arguments, **channels, class_names=",".join(names), output_root=output_root,
                champion_uri=champion_uri, train_device="auto", min_miou=options.min_miou,
                deploy_dry_run=True, endpoint_name="kubeseg-sample")
        pipeline_seconds = time.perf_counter() - started

        run_dir = _newest_run_dir(pipeline_root, PIPELINE_NAME)
        model_dir = (_task_dir(run_dir, "train") or run_dir / "train") / "model"
        train_meta = _artifact_metadata(_task_outputs(run_dir, "train"), "model")
        eval_meta = _artifact_metadata(_task_outputs(run_dir, "evaluate"), "metrics")
        work_uri = str(train_meta.get("uri", "")).rsplit("/train/", 1)[0]
        lines = [
            "",
            f"kubeseg run: pipeline finished in {pipeline_seconds:.0f} s "
            f"(steps {where})",
            f"  dataset (generated)     {channels['train'].rsplit('/', 1)[0]}",
            f"  kfp.local artifacts     {run_dir}",
            f"  pipeline log            {log_path if not options.verbose else '(shown above)'}",
            f"  model (KFP artifact)    {model_dir}",
            f"  model (work copy)       {train_meta.get('uri', '?')}",
            f"  checkpoints, metrics    {storage.join(work_uri, 'train')}",
            f"  evaluation report       {storage.join(work_uri, 'evaluation', 'report.html')}",
            f"  validation mIoU         {eval_meta.get('mIOU', float('nan')):.4f}",
            f"  quality gate            {eval_meta.get('gate_reason', '?')}",
        ]
        deploy_dir = _task_dir(run_dir, "deploy")
        if deploy_dir is not None:
            lines.append(f"  InferenceService (dry)  {deploy_dir / 'inference_service'}")
            promoted = (_task_outputs(run_dir, "promote").get("parameterValues") or {})
            lines.append(f"  champion (promoted)     {promoted.get('Output', champion_uri)}")
        else:
            lines.append("  InferenceService        not rendered (the quality gate failed)")
        if options.serve:
            out_dir = workdir / "prediction"
            port = options.port or free_port()
            if options.runner == "docker":
                server = ContainerServer(IMAGES.predictor, model_dir, port,
                                         log_path=out_dir / "server.log")
                served_by = f"container {IMAGES.predictor}"
            else:
                from kubeseg.serving.process import model_server

                server = model_server(str(model_dir), port, log_path=out_dir / "server.log")
                served_by = "kubeseg serve"
            lines += serve_and_predict(server, served_by, channels, out_dir, hp.num_classes)
    lines.append(f"  total time              {time.perf_counter() - started:.0f} s")
    return lines


def serve_and_predict(server, served_by: str, channels: Mapping[str, str], out_dir: Path,
                      num_classes: int) -> List[str]:
    """Start ``server``, send one validation image to it, write the mask and overlay PNGs."""
    import numpy as np
    from PIL import Image

    from kubeseg import storage
    from kubeseg.report import pictures

    out_dir.mkdir(parents=True, exist_ok=True)
    with server:
        base = server.url
        images_uri = channels["validation"]
        key = sorted(storage.list_files(images_uri))[0]
        image_bytes = storage.read_bytes(storage.join(images_uri, key))
        request = urllib.request.Request(
            base + "/invocations", data=image_bytes, method="POST",
            headers={"Content-Type": "image/jpeg", "Accept": "image/png"})
        with urllib.request.urlopen(request, timeout=120) as response:
            mask_png = response.read()

    stem = Path(key).stem
    mask = np.asarray(Image.open(io.BytesIO(mask_png)))
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    truth_uri = storage.join(channels["validation_annotation"], f"{stem}.png")
    truth = np.asarray(Image.open(io.BytesIO(storage.read_bytes(truth_uri))))
    agreement = float((mask == truth).mean()) if truth.shape == mask.shape else float("nan")
    colours = pictures.palette(num_classes)
    mask_path, colour_path, overlay_path = (out_dir / f"{stem}_mask.png",
                                            out_dir / f"{stem}_mask_color.png",
                                            out_dir / f"{stem}_overlay.png")
    storage.write_bytes(str(mask_path), mask_png)
    for path, picture in ((colour_path, Image.fromarray(pictures.colorize(mask, colours))),
                          (overlay_path, pictures.overlay(image, mask, colours, alpha=0.5))):
        storage.write_bytes(str(path), pictures.png_bytes(picture))
    return [
        f"  served by               {served_by} on {base} (POST /invocations, stopped)",
        f"  sent                    {storage.join(images_uri, key)}",
        f"  predicted mask (ids)    {mask_path}",
        f"  predicted mask (colour) {colour_path}",
        f"  overlay                 {overlay_path}",
        f"  pixels matching truth   {agreement:.1%}",
        f"  server log              {out_dir / 'server.log'}",
    ]
