"""Rules the released cluster software enforces, written out from their published definitions so
that tests can run them over what kubeseg renders. Each names the project, tag and file (or the
RFC) it encodes; none is kubeseg code.
"""
from __future__ import annotations

import copy
import re
from typing import Any, List

# -- k8s.io/apimachinery v0.35.2 (Trainer v2.2.0's go.mod) and v0.36.2 (Trainer v2.3.0's):
#    pkg/util/validation/validation.go; the same text at both tags.
DNS1123_LABEL_FMT = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1123_SUBDOMAIN_FMT = DNS1123_LABEL_FMT + r"(\." + DNS1123_LABEL_FMT + r")*"
DNS1123_SUBDOMAIN_MAX_LENGTH = 253
HTTP_PATH_FMT = r"[A-Za-z0-9/\-._~%!$&'()*+,;=:]+"


def is_dns1123_subdomain(value: str) -> List[str]:
    """IsDNS1123Subdomain: the problems (empty when valid)."""
    problems = []
    if len(value) > DNS1123_SUBDOMAIN_MAX_LENGTH:
        problems.append(f"must be no more than {DNS1123_SUBDOMAIN_MAX_LENGTH} characters")
    if not re.fullmatch(DNS1123_SUBDOMAIN_FMT, value):
        problems.append("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
                        "characters, '-' or '.'")
    return problems


def is_domain_prefixed_path(value: str) -> List[str]:
    """IsDomainPrefixedPath: a DNS-1123 subdomain, "/", and a non-empty HTTP path. Go's
    strings.SplitN(value, "/", 2) is str.split("/", 1)."""
    if not value:
        return ["Required value"]
    segments = value.split("/", 1)
    if len(segments) != 2 or not segments[0] or not segments[1]:
        return ['must be a domain-prefixed path (such as "acme.io/foo")']
    host, path = segments
    problems = [f"{host}: {p}" for p in is_dns1123_subdomain(host)]
    if not re.fullmatch(HTTP_PATH_FMT, path):
        problems.append(f"{path}: Invalid path")
    return problems


# -- RFC 7386 (JSON Merge Patch), section 2: MergePatch(Target, Patch). What the API server does
#    with a PATCH of Content-Type application/merge-patch+json, the type the kubernetes client's
#    patch_namespaced_custom_object sends.
def merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = merge_patch(result.get(name), value)
    return result


# -- YAML 1.2.2, 10.3.2 (core schema), tag resolution of plain scalars: what a YAML 1.2 reader
#    (Go's yaml.v3, kubectl's parser) takes for null, bool, int and float.
YAML12_CORE_NON_STRINGS = (
    r"null|Null|NULL|~",
    r"true|True|TRUE|false|False|FALSE",
    r"[-+]?[0-9]+", r"0o[0-7]+", r"0x[0-9a-fA-F]+",
    r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?",
    r"[-+]?(\.inf|\.Inf|\.INF)", r"\.nan|\.NaN|\.NAN",
)


def yaml12_resolves_to_non_string(plain: str) -> bool:
    """Whether ``plain``, written unquoted, is read as something other than a string."""
    return plain == "" or any(re.fullmatch(p, plain) for p in YAML12_CORE_NON_STRINGS)


# -- kubeflow/katib v0.18.0 pkg/suggestion/v1beta1/internal/search_space.py: the grid's
#    convert_to_combinations (int step defaults to 1, convert_parameter), and the check of
#    pkg/suggestion/v1beta1/optuna/service.py _validate_grid_setting on maxTrialCount.
def katib_grid_combinations(parameters) -> int:
    import numpy as np

    total = 1
    for p in parameters:
        space, kind = p["feasibleSpace"], p["parameterType"]
        if kind == "int":
            values = range(int(space["min"]), int(space["max"]) + 1, int(space.get("step") or 1))
        elif kind == "double":
            step = space.get("step")
            if step == "" or step is None:
                raise ValueError(f"Param {p['name']} step is nil; For discrete search space, "
                                 "all parameters must include step")
            values = np.arange(float(space["min"]), float(space["max"]) + float(step),
                               float(step))
            if values[-1] > float(space["max"]):
                values = values[:-1]
        else:  # categorical, discrete
            values = space["list"]
        total *= len(values)
    return total


def katib_grid_refusal(experiment) -> str:
    """What Katib's grid service answers an Experiment with ("" when it accepts it)."""
    spec = experiment["spec"]
    try:
        combinations = katib_grid_combinations(spec["parameters"])
    except ValueError as exc:
        return f"failed to validate parameters: {exc}"
    if spec["maxTrialCount"] > combinations:
        return (f"Max Trial Count: {spec['maxTrialCount']} > all possible search combinations: "
                f"{combinations}")
    return ""


__all__ = ["is_domain_prefixed_path", "is_dns1123_subdomain", "merge_patch",
           "yaml12_resolves_to_non_string", "katib_grid_combinations", "katib_grid_refusal"]
