"""Validate custom objects against a CRD's openAPIV3Schema kept in tests/schemas/.

``validate(obj, "inferenceservice.yaml")`` returns nothing when ``obj`` fits the schema of its
``apiVersion`` and raises :class:`CRDValidationError` listing every problem otherwise.

Validation is stricter than the API server in one way: an object field that the schema does not
declare is an error here (the API server would silently prune it, so a misspelt field would be
lost without a word). Schemas marked ``x-kubernetes-preserve-unknown-fields`` stay open, and a
trimmed schema may list property names it kept open in ``x-kubeseg-trimmed-open``.
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any, Dict, List, Mapping

import yaml

SCHEMAS = Path(__file__).parent / "schemas"

# The full upstream CRDs: not kept in this repository; looked up in $KUBESEG_UPSTREAM_CRDS, else
# in shared/crds beside the checkout. tests/schemas/UPSTREAM.md lists
# where each file comes from (repository, path, tag and commit).
UPSTREAM_ENV = "KUBESEG_UPSTREAM_CRDS"
UPSTREAM_DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "crds"
UPSTREAM_FILES = ("trainer.kubeflow.org_trainjobs.yaml",
                  "trainer.kubeflow.org_clustertrainingruntimes.yaml", "torch_distributed.yaml",
                  "kubeflow.org_pytorchjobs.yaml", "serving.kserve.io_inferenceservices.yaml",
                  "application-crd.yaml", "monitoring.coreos.com_prometheusrules.yaml",
                  "monitoring.coreos.com_podmonitors.yaml",
                  "monitoring.coreos.com_alertmanagerconfigs.yaml",
                  # released ConfigMaps that kubeseg preflight's checks read
                  "kserve-inferenceservice-config-v0.15.0.yaml",
                  "kserve-inferenceservice-config-v0.20.0.yaml",
                  "knative-config-features-v1.15.2.yaml", "knative-config-features-v1.21.1.yaml")


def upstream(filename: str) -> Path:
    """The path of a full upstream file (see UPSTREAM_FILES); skips the calling test, saying
    where to put it, when it is not there."""
    import os

    import pytest

    folder = Path(os.environ.get(UPSTREAM_ENV) or UPSTREAM_DEFAULT)
    path = folder / filename
    if not path.is_file():
        pytest.skip(f"full upstream file {filename} not found in {folder} (set ${UPSTREAM_ENV} "
                    "or put the files listed in tests/schemas/UPSTREAM.md there)")
    return path


class CRDValidationError(AssertionError):
    def __init__(self, problems: List[str]):
        self.problems = problems
        super().__init__("object does not fit the CRD schema:\n  - " + "\n  - ".join(problems))


def _strict(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if "properties" in out and not schema.get("x-kubernetes-preserve-unknown-fields"):
        for name in schema.get("x-kubeseg-trimmed-open", ()):
            out["properties"].setdefault(name, {})
        out.setdefault("additionalProperties", False)
    return out


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads a bare ``=`` as the "value" type, which PyYAML's safe loader has no
    constructor for; prometheus-operator's CRDs list ``=`` in matcher enums: a string."""


_Loader.add_constructor("tag:yaml.org,2002:value", yaml.SafeLoader.construct_yaml_str)


@functools.lru_cache(maxsize=None)
def _crd(filename) -> Dict[str, Any]:
    docs = [d for d in yaml.load_all((SCHEMAS / filename).read_text(), Loader=_Loader) if d]
    crds = [d for d in docs if d.get("kind") == "CustomResourceDefinition"]
    if len(crds) != 1:
        raise ValueError(f"{filename}: expected one CustomResourceDefinition, found {len(crds)}")
    return crds[0]


def load_schema(filename: str, version: str = None, *, strict: bool = True) -> Dict[str, Any]:
    """The openAPIV3Schema of ``version`` (default: the storage version) in ``filename``."""
    crd = _crd(filename)
    versions = crd["spec"]["versions"]
    chosen = [v for v in versions if (v["name"] == version if version else v.get("storage"))]
    if not chosen:
        raise ValueError(f"{filename}: no version {version!r}; has "
                         f"{[v['name'] for v in versions]}")
    schema = copy.deepcopy(chosen[0]["schema"]["openAPIV3Schema"])
    return _strict(schema) if strict else schema


def validate(obj: Mapping[str, Any], filename: str, *, strict: bool = True) -> None:
    """Raise :class:`CRDValidationError` unless ``obj`` fits the CRD in ``filename``."""
    import jsonschema

    crd = _crd(filename)
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    api_version = str(obj.get("apiVersion", ""))
    obj_group, _, version = api_version.rpartition("/")
    problems = []
    if obj_group != group:
        problems.append(f"apiVersion {api_version!r}: expected group {group}")
    if obj.get("kind") != kind:
        problems.append(f"kind {obj.get('kind')!r}: expected {kind}")
    name = (obj.get("metadata") or {}).get("name")
    if not name:
        problems.append("metadata.name is missing")
    if problems:
        raise CRDValidationError(problems)
    schema = load_schema(filename, version, strict=strict)
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    if errors:
        raise CRDValidationError([
            f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
            for e in errors])


__all__ = ["CRDValidationError", "SCHEMAS", "load_schema", "validate", "upstream"]
