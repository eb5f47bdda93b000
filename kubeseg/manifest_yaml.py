"""YAML for Kubernetes objects that reads the same under YAML 1.1 and YAML 1.2.

PyYAML writes YAML 1.1 and quotes a string only when YAML 1.1 would read it as something else.
kubectl reads YAML 1.2, whose core schema resolves more plain scalars to numbers: ``1e-05`` is a
float there (YAML 1.1 wants a dot in a float). A string such as Katib's ``feasibleSpace.min``
would reach the API server as a number. :func:`dump` therefore quotes every string that either
version would read as something other than a string.
"""
from __future__ import annotations

import re
from typing import Any

import yaml

# YAML 1.2.2, 10.3.2: the core schema's tag resolution of plain scalars (null, bool, int, float)
_YAML12_CORE = re.compile(
    r"^(?:null|Null|NULL|~"
    r"|true|True|TRUE|false|False|FALSE"
    r"|[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+"
    r"|[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?(?:\.inf|\.Inf|\.INF)|\.nan|\.NaN|\.NAN)$")


class _Dumper(yaml.SafeDumper):
    """SafeDumper that also quotes strings YAML 1.2's core schema reads as null, bool or number."""


# An implicit resolver for the 1.2 patterns makes the emitter see that such a string, written
# plain, would not come back as a string, so it quotes it (PyYAML's own rule for 1.1).
_Dumper.add_implicit_resolver("tag:yaml.org,2002:yaml12-non-string", _YAML12_CORE,
                              list("-+0123456789.nNtTfF~"))


def dump(obj: Any) -> str:
    """``obj`` as block YAML, keys in their given order, strings quoted where needed."""
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, width=100)


__all__ = ["dump"]
