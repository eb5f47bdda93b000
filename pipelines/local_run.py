"""The whole pipeline on one machine with ``kfp.local``, ending with a served prediction.

Two ways to run the steps:

- ``subprocess`` (default): every step runs as a Python process of this environment.
- ``docker``: every step runs in the trainer image through kfp.local's DockerRunner (docker,
  or podman's Docker-compatible API: :mod:`kubeseg_platform.pipelines.container_engine`),
  exactly as the cluster runs it, and the model is then served from the predictor image. The
  containers share the host's network (so they reach an S3 endpoint on 127.0.0.1) and see only
  the pipeline root, so the dataset and the run's files live in S3.

:func:`run_local` goes in named steps: check the options, make the sample dataset (a small
shapes dataset, uploaded to S3 with ``--s3-endpoint``), run the pipeline, read what its tasks
recorded, then serve the model on 127.0.0.1, send one validation image to ``/invocations`` and
write the mask and an overlay as PNG files. The environment the steps need (the S3 endpoint,
``DOCKER_HOST``) is set for the run only (:func:`run_environment`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import re
import socket
import time
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


# -- the run's environment -----------------------------------------------------------------------
@contextlib.contextmanager
def scoped_environ(values: Mapping[str, str]) -> Iterator[None]:
    """``values`` in ``os.environ`` for the duration, the earlier values put back after (the
    steps of kfp.local's SubprocessRunner and the docker SDK read the environment there)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def run_environment(options: LocalRunOptions) -> Iterator[None]:
    """What the run's steps need, for the duration of the run only: ``KUBESEG_S3_ENDPOINT``
    with ``--s3-endpoint`` (read by every step), and with ``--runner docker`` a Docker API
    (``DOCKER_HOST`` set when podman's service was started for the run) that answers as
    kfp.local's DockerRunner expects."""
    from kubeseg_platform.pipelines.container_engine import (docker_api,
                                                             missing_container_as_not_found)

    values = {"KUBESEG_S3_ENDPOINT": options.s3_endpoint} if options.s3_endpoint else {}
    with contextlib.ExitStack() as stack:
        if options.runner == "docker":
            host = stack.enter_context(docker_api())
            if host is not None:
                logger.info("using podman's Docker API at %s", host)
                values["DOCKER_HOST"] = host
            stack.enter_context(missing_container_as_not_found())
        stack.enter_context(scoped_environ(values))
        yield


# -- the steps ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleData:
    """Where the sample dataset and the run's files are: local folders, or S3."""

    channels: Dict[str, str]  # train, validation, train_annotation, validation_annotation
    output_root: str
    champion_uri: str
    class_names: List[str]


@dataclass(frozen=True)
class PipelineRun:
    """What the pipeline's tasks recorded, read from kfp.local's run folder."""

    run_dir: Path
    log_path: Optional[Path]  # None: kfp.local's output was shown on the terminal
    steps_where: str  # "as local processes" or "in <trainer image>"
    seconds: float
    model_dir: Path  # the KFP Model artifact
    model_uri: str  # the work copy training recorded
    work_uri: str  # the run's files: train/, evaluation/
    miou: float
    gate: str
    inference_service: Optional[Path]  # None: the quality gate failed, nothing was rendered
    champion_uri: str


@dataclass(frozen=True)
class SamplePrediction:
    """One validation image sent to the served model, and the pictures written."""

    served_by: str
    url: str
    sent: str
    mask_path: Path
    colour_path: Path
    overlay_path: Path
    agreement: float  # share of pixels matching the annotation
    server_log: Path


@dataclass(frozen=True)
class LocalRunResult:
    """What ``kubeseg run`` produced: the sample data, the pipeline run, the prediction (None
    with ``serve=False``) and the whole time."""

    data: SampleData
    pipeline: PipelineRun
    prediction: Optional[SamplePrediction]
    seconds: float

    def summary(self) -> List[str]:
        """The lines ``kubeseg run`` prints at the end."""
        run, prediction = self.pipeline, self.prediction
        lines = [
            "",
            f"kubeseg run: pipeline finished in {run.seconds:.0f} s (steps {run.steps_where})",
            f"  dataset (generated)     {self.data.channels['train'].rsplit('/', 1)[0]}",
            f"  kfp.local artifacts     {run.run_dir}",
            f"  pipeline log            {run.log_path or '(shown above)'}",
            f"  model (KFP artifact)    {run.model_dir}",
            f"  model (work copy)       {run.model_uri}",
            f"  checkpoints, metrics    {_join(run.work_uri, 'train')}",
            f"  evaluation report       {_join(run.work_uri, 'evaluation', 'report.html')}",
            f"  validation mIoU         {run.miou:.4f}",
            f"  quality gate            {run.gate}",
        ]
        if run.inference_service is not None:
            lines.append(f"  InferenceService (dry)  {run.inference_service}")
            lines.append(f"  champion (promoted)     {run.champion_uri}")
        else:
            lines.append("  InferenceService        not rendered (the quality gate failed)")
        if prediction is not None:
            lines += [
                f"  served by               {prediction.served_by} on {prediction.url} (POST "
                "/invocations, stopped)",
                f"  sent                    {prediction.sent}",
                f"  predicted mask (ids)    {prediction.mask_path}",
                f"  predicted mask (colour) {prediction.colour_path}",
                f"  overlay                 {prediction.overlay_path}",
                f"  pixels matching truth   {prediction.agreement:.1%}",
                f"  server log              {prediction.server_log}",
            ]
        return lines + [f"  total time              {self.seconds:.0f} s"]


def _join(*parts: str) -> str:
    from kubeseg import storage

    return storage.join(*parts)


def run_local(options: LocalRunOptions) -> LocalRunResult:
    """Run the sample pipeline (and serve its model)."""
    started = time.perf_counter()
    hp = check_options(options)  # fails before anything is generated
    workdir = Path(options.workdir).resolve()
    with run_environment(options):
        data = make_sample_data(options, hp, workdir)
        pipeline = run_pipeline(options, hp, data, workdir)
        prediction = serve_and_predict(options, pipeline.model_dir, data, workdir / "prediction",
                                       hp.num_classes) if options.serve else None
    return LocalRunResult(data, pipeline, prediction, time.perf_counter() - started)


def check_options(options: LocalRunOptions):
    """The run's hyperparameters (the sample ones, with the options and ``--set`` values), or
    a ConfigError listing every problem with them and the options."""
    from kubeseg.config import Hyperparameters, parse_assignments
    from kubeseg.errors import ConfigError

    hp = Hyperparameters.from_dict({
        **SAMPLE_HYPERPARAMETERS, "num_classes": options.num_classes,
        "num_training_samples": options.num_images, "epochs": options.epochs,
        "base_size": options.size, "crop_size": options.size,
        **parse_assignments(list(options.assignments))})
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
    return hp


def make_sample_data(options: LocalRunOptions, hp, workdir: Path) -> SampleData:
    """The shapes dataset under ``workdir/data`` (copied to ``s3://BUCKET/data`` with an S3
    endpoint), and where the run's files and the champion go."""
    from kubeseg import storage
    from kubeseg.data.synthetic import class_names, make_shapes_dataset

    data_root = workdir / "data"
    channels = make_shapes_dataset(data_root, n_train=options.num_images,
                                   n_val=options.num_validation_images, size=options.size,
                                   num_classes=hp.num_classes, seed=hp.seed)
    root = str(workdir)
    if options.s3_endpoint:
        root = f"s3://{options.bucket}"
        storage.ensure_bucket(root)
        storage.upload_prefix(str(data_root), storage.join(root, "data"))
        channels = {k: storage.join(root, "data", Path(v).name) for k, v in channels.items()}
    return SampleData(channels, storage.join(root, "work"), storage.join(root, "champion"),
                      class_names(hp.num_classes))


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
    return local.DockerRunner(network_mode="host", environment=environment)


def run_pipeline(options: LocalRunOptions, hp, data: SampleData, workdir: Path) -> PipelineRun:
    """The segmentation pipeline with kfp.local (deploying as a dry run), one line per step on
    the terminal unless ``verbose``; then what its tasks recorded (:func:`read_run`)."""
    from kfp import local

    from kubeseg_platform.pipelines.segmentation import (IMAGES, PIPELINE_NAME,
                                                         segmentation_pipeline)

    started = time.perf_counter()
    pipeline_root = workdir / "pipeline"
    pipeline_root.mkdir(parents=True, exist_ok=True)
    where = f"in {IMAGES.trainer}" if options.runner == "docker" else "as local processes"
    logger.info("running the pipeline with kfp.local (steps %s): %d training / %d validation "
                "images of %d px, %s/%s, %d epochs; artifacts in %s", where, options.num_images,
                options.num_validation_images, options.size, hp.algorithm, hp.backbone,
                hp.epochs, pipeline_root)
    local.init(runner=_runner(options, pipeline_root), pipeline_root=str(pipeline_root))
    arguments = {name: (", ".join(map(str, v)) if isinstance(v, list) else v)
                 for name, v in hp.to_dict().items()}
    log_path = None if options.verbose else workdir / "pipeline.log"
    if log_path is not None:
        print(f"kubeseg run: steps {where}; full log in {log_path}", flush=True)
    with (StepProgress(log_path) if log_path is not None else contextlib.nullcontext()):
        segmentation_pipeline(
            **arguments, **data.channels, class_names=",".join(data.class_names),
            output_root=data.output_root, champion_uri=data.champion_uri, train_device="auto",
            min_miou=options.min_miou, deploy_dry_run=True, endpoint_name="kubeseg-sample")
    run = read_run(_newest_run_dir(pipeline_root, PIPELINE_NAME), data.champion_uri)
    return dataclasses.replace(run, log_path=log_path, steps_where=where,
                               seconds=time.perf_counter() - started)


def read_run(run_dir: Path, champion_uri: str) -> PipelineRun:
    """What the tasks of one kfp.local run recorded (their ``executor_output.json``)."""
    model_dir = (_task_dir(run_dir, "train") or run_dir / "train") / "model"
    train_meta = _artifact_metadata(_task_outputs(run_dir, "train"), "model")
    eval_meta = _artifact_metadata(_task_outputs(run_dir, "evaluate"), "metrics")
    deploy_dir = _task_dir(run_dir, "deploy")
    promoted = _task_outputs(run_dir, "promote").get("parameterValues") or {}
    return PipelineRun(
        run_dir=run_dir, log_path=None, steps_where="", seconds=0.0, model_dir=model_dir,
        model_uri=str(train_meta.get("uri", "?")),
        work_uri=str(train_meta.get("uri", "")).rsplit("/train/", 1)[0],
        miou=float(eval_meta.get("mIOU", float("nan"))),
        gate=str(eval_meta.get("gate_reason", "?")),
        inference_service=deploy_dir / "inference_service" if deploy_dir else None,
        champion_uri=str(promoted.get("Output", champion_uri)))


def _model_server(options: LocalRunOptions, model_dir: Path, log_path: Path):
    """(server, what serves) for the model: ``kubeseg serve`` here, or the predictor image."""
    port = options.port or free_port()
    if options.runner == "docker":
        from kubeseg_platform.pipelines.container_engine import ContainerServer
        from kubeseg_platform.pipelines.segmentation import IMAGES

        return (ContainerServer(IMAGES.predictor, model_dir, port, log_path=log_path),
                f"container {IMAGES.predictor}")
    from kubeseg.serving.process import model_server

    return model_server(str(model_dir), port, log_path=log_path), "kubeseg serve"


def _send_image(server, images_uri: str) -> tuple:
    """(key, image bytes, mask PNG): the first validation image, sent to ``server``."""
    from kubeseg import storage

    key = sorted(storage.list_files(images_uri))[0]
    image_bytes = storage.read_bytes(storage.join(images_uri, key))
    request = urllib.request.Request(
        server.url + "/invocations", data=image_bytes, method="POST",
        headers={"Content-Type": "image/jpeg", "Accept": "image/png"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return key, image_bytes, response.read()


def serve_and_predict(options: LocalRunOptions, model_dir: Path, data: SampleData,
                      out_dir: Path, num_classes: int) -> SamplePrediction:
    """Serve the model, send one validation image to it, write the mask and overlay PNGs."""
    import numpy as np
    from PIL import Image

    from kubeseg import storage
    from kubeseg.report import pictures

    out_dir.mkdir(parents=True, exist_ok=True)
    server, served_by = _model_server(options, model_dir, out_dir / "server.log")
    images_uri = data.channels["validation"]
    with server:
        key, image_bytes, mask_png = _send_image(server, images_uri)
    stem = Path(key).stem
    mask = np.asarray(Image.open(io.BytesIO(mask_png)))
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    truth_uri = storage.join(data.channels["validation_annotation"], f"{stem}.png")
    truth = np.asarray(Image.open(io.BytesIO(storage.read_bytes(truth_uri))))
    agreement = float((mask == truth).mean()) if truth.shape == mask.shape else float("nan")
    colours = pictures.palette(num_classes)
    paths = [out_dir / f"{stem}_{name}.png" for name in ("mask", "mask_color", "overlay")]
    storage.write_bytes(str(paths[0]), mask_png)
    for path, picture in ((paths[1], Image.fromarray(pictures.colorize(mask, colours))),
                          (paths[2], pictures.overlay(image, mask, colours, alpha=0.5))):
        storage.write_bytes(str(path), pictures.png_bytes(picture))
    return SamplePrediction(served_by, server.url, storage.join(images_uri, key), *paths,
                            agreement=agreement, server_log=out_dir / "server.log")


__all__ = ["LocalRunOptions", "LocalRunResult", "run_local", "run_environment",
           "scoped_environ", "StepProgress", "free_port", "RUNNERS"]
