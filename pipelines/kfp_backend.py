"""Compiled pipelines that a stated Kubeflow Pipelines backend release accepts.

kfp-kubernetes writes into each task's executor config (the ``platforms.kubernetes`` document of
the compiled YAML) every field it knows, some with their default value, e.g.
``secretAsEnv[].optional: false``. From 2.14.0 the backend's workflow compiler parses that config
strictly (``protojson.Unmarshal``, kubeflow/pipelines 2.14.0
backend/src/v2/compiler/argocompiler/container.go): a field its release does not know refuses
the run at creation. :data:`PLATFORM_FIELDS` says which field needs which release;
:func:`conform` leaves out of a compiled pipeline the fields newer than the target backend when
leaving them out means the same (``optional: false`` is Kubernetes' default), and otherwise
refuses, naming the release the field needs. :func:`required_backend` reads back from a
compiled pipeline the oldest backend that accepts it, which ``kubeseg submit`` compares with the
server's version.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

from kubeseg import versions
from kubeseg.errors import ConfigError

PROTO = "kubernetes_platform/proto/kubernetes_executor_config.proto"
HEADER_MARK = "# Kubeflow Pipelines backend:"


@dataclass(frozen=True)
class PlatformField:
    """A field of kfp-kubernetes' executor config and the first backend release that knows it.

    ``path``: its JSON path in one task's executor config, ``[]`` marking list items.
    ``same_as_absent``: values whose meaning does not change when the field is left out.
    """

    path: str
    since: str
    same_as_absent: Tuple[Any, ...] = ()


# Every field below is absent from kubeflow/pipelines PROTO at the release before ``since`` and
# present from ``since`` on (tags 2.14.0, 2.15.0, 2.16.0, 2.17.0; the backend builds that
# folder of its own tag, go.mod's replace directive, since 2.5.0). Fields not listed are in the
# proto at 2.14.0, the lowest supported backend (kubeseg.versions.KFP_BACKEND_LOWEST).
# (2.17.0 also adds CreatePvc.data_source: the create-PVC step's inputs, not an executor field.)
PLATFORM_FIELDS = (
    PlatformField("nodeAffinity[].nodeAffinityJson", "2.14.0"),
    # kubeflow/pipelines#12216. Unset, the 2.15.0 driver leaves the selector's Optional nil
    # (backend/src/v2/driver/k8s.go), which Kubernetes reads as false: the same as "false".
    PlatformField("secretAsEnv[].optional", "2.15.0", same_as_absent=(False,)),
    PlatformField("configMapAsEnv[].optional", "2.15.0", same_as_absent=(False,)),
    PlatformField("pvcMount[].subPath", "2.16.0", same_as_absent=("",)),
    PlatformField("securityContext", "2.16.0"),
)


def check_target(backend: str) -> str:
    """The backend release to compile for, checked: a version, not below the lowest supported."""
    versions.parse_version(backend, "--kfp-backend")
    if not versions.at_least(backend, versions.KFP_BACKEND_LOWEST):
        raise ConfigError([f"--kfp-backend {backend}: kubeseg's pipelines need Kubeflow "
                           f"Pipelines {versions.KFP_BACKEND_LOWEST} or newer (older backends "
                           "do not resolve the run id given to steps, or drop the retries of "
                           "the training step); upgrade the backend"], what="option")
    return backend


def _executors(platform_doc: Mapping[str, Any]) -> Dict[str, Any]:
    return (((platform_doc.get("platforms") or {}).get("kubernetes") or {})
            .get("deploymentSpec") or {}).get("executors") or {}


def _occurrences(config: Any, parts: List[str], where: str) -> Iterator[Tuple[dict, str, str]]:
    """(holder, key, readable location) of every value at ``parts`` below ``config``."""
    if not parts or not isinstance(config, Mapping):
        return
    name, is_list = parts[0].removesuffix("[]"), parts[0].endswith("[]")
    if name not in config:
        return
    if len(parts) == 1:
        yield config, name, f"{where}.{name}"
    elif is_list:
        for index, item in enumerate(config[name] or []):
            yield from _occurrences(item, parts[1:], f"{where}.{name}[{index}]")
    else:
        yield from _occurrences(config[name], parts[1:], f"{where}.{name}")


def platform_fields(platform_doc: Mapping[str, Any]) -> Iterator[Tuple[PlatformField, dict,
                                                                        str, str]]:
    """Every table field present in the compiled pipeline: (field, holder, key, location)."""
    for executor, config in sorted(_executors(platform_doc).items()):
        for field in PLATFORM_FIELDS:
            for holder, key, where in _occurrences(config, field.path.split("."), executor):
                yield field, holder, key, where


def conform(platform_doc: Mapping[str, Any], backend: str) -> Dict[str, Any]:
    """A copy of the ``platforms`` document that ``backend`` accepts; a ConfigError listing
    every field that cannot be left out without changing what the step does."""
    check_target(backend)
    result = copy.deepcopy(dict(platform_doc))
    problems = []
    for field, holder, key, where in list(platform_fields(result)):
        if versions.at_least(backend, field.since):
            continue
        if holder[key] in field.same_as_absent:
            del holder[key]
        else:
            problems.append(f"{where}={holder[key]!r} needs Kubeflow Pipelines {field.since} "
                            f"or newer: compile with --kfp-backend {field.since} for a cluster "
                            f"that runs it (the target is {backend})")
    if problems:
        raise ConfigError(problems, what="setting for the target backend")
    return result


def required_backend(platform_doc: Mapping[str, Any]) -> str:
    """The oldest backend release that accepts the compiled pipeline."""
    needed = versions.KFP_BACKEND_LOWEST
    for field, *_ in platform_fields(platform_doc):
        if not versions.at_least(needed, field.since):
            needed = field.since
    return needed


def split_compiled(text: str) -> Tuple[str, List[Any]]:
    """A compiled pipeline's comment header (KFP's, kept as written) and its documents."""
    import yaml

    lines = text.splitlines(keepends=True)
    count = 0
    while count < len(lines) and lines[count].startswith("#"):
        count += 1
    return "".join(lines[:count]), list(yaml.safe_load_all("".join(lines[count:])))


def conform_text(text: str, backend: str) -> str:
    """The compiled pipeline ``text`` made for ``backend``, its header naming the release."""
    import yaml

    header, documents = split_compiled(text)
    documents = [conform(d, backend) if "platforms" in d else d for d in documents]
    header = "".join(line for line in header.splitlines(keepends=True)
                     if not line.startswith(HEADER_MARK))
    header += f"{HEADER_MARK} {backend} or newer (kubeseg compile --kfp-backend)\n"
    # as kfp's compiler writes them (pipeline_spec_builder.write_pipeline_spec_to_file)
    return header + yaml.dump_all(documents, sort_keys=True)


def compile_for_backend(pipeline: Any, path: str, backend: Optional[str] = None) -> str:
    """Compile ``pipeline`` to ``path`` (YAML) for ``backend`` (default: the lowest supported);
    the file appears complete or not at all. Returns the path."""
    import tempfile

    from kfp import compiler

    from kubeseg import storage

    backend = check_target(backend or versions.KFP_BACKEND_LOWEST)
    target = Path(path)
    with tempfile.TemporaryDirectory() as folder:
        raw = Path(folder) / target.name
        compiler.Compiler().compile(pipeline, package_path=str(raw))
        text = conform_text(raw.read_text(), backend)
    storage.write_text(str(target), text)
    return str(target)


def required_backend_of_text(text: str) -> str:
    """:func:`required_backend` of a compiled pipeline file's text."""
    _, documents = split_compiled(text)
    needed = versions.KFP_BACKEND_LOWEST
    for document in documents:
        if isinstance(document, Mapping) and "platforms" in document:
            needed = required_backend(document)
    return needed


def reported_version(tag_name: Optional[str]) -> Optional[str]:
    """The release a backend's healthz ``tag_name`` names; None for "unknown" (a build without
    TAG_NAME) or nothing."""
    try:
        versions.parse_version(tag_name or "")
    except ConfigError:
        return None
    return str(tag_name)


def server_version_problem(server_version: str, needed: str,
                           pipeline_file: str) -> Optional[str]:
    """Why a backend of release ``server_version`` would refuse or mis-run a pipeline that needs
    ``needed``; None when it is new enough."""
    if versions.at_least(server_version, needed):
        return None
    if versions.at_least(server_version, versions.KFP_BACKEND_LOWEST):
        fix = (f"recompile it for this backend (kubeseg compile --kfp-backend "
               f"{server_version}) or upgrade the backend to {needed}")
    else:
        fix = (f"upgrade the backend to {versions.KFP_BACKEND_LOWEST} or newer (the oldest "
               "kubeseg supports)")
    return (f"the Kubeflow Pipelines backend is {server_version}, and {pipeline_file} needs "
            f"{needed} or newer: {fix}")


__all__ = ["PLATFORM_FIELDS", "PlatformField", "PROTO", "check_target", "compile_for_backend",
           "conform",
           "conform_text", "platform_fields", "required_backend", "required_backend_of_text",
           "reported_version", "server_version_problem", "split_compiled"]
