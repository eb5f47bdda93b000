"""What every check of ``kubeseg preflight`` is made of.

Every object a check looks at is a dict as the API server returns it (a CRD, a ConfigMap, a
Secret, a NodeList, the KFP API server's healthz answer), wrapped in a :class:`Lookup` that also
says why a read found nothing: 404 (not there) and 403 (not allowed to look) lead to different
answers. Each check returns a :class:`Check`: ok, warn or FAIL, what was found and, for anything
short of ok, what to do.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Tuple

OK, WARN, FAIL = "ok", "warn", "FAIL"


@dataclass(frozen=True)
class Check:
    """One line of the report: ``status`` is ok, warn or FAIL; ``fix`` says what to do."""

    name: str
    status: str
    found: str
    fix: str = ""


@dataclass(frozen=True)
class Lookup:
    """One object read from the cluster (a dict as the API returns it), or why there is none:
    ``status`` is the HTTP status of the failed read (404: not there, 403: not allowed)."""

    obj: Optional[Mapping[str, Any]] = None
    status: Optional[int] = None
    reason: str = ""

    @property
    def absent(self) -> bool:
        return self.obj is None and self.status == 404

    def why(self) -> str:
        return " ".join(str(p) for p in (self.status, self.reason) if p) or "no answer"


def found(obj: Mapping[str, Any]) -> Lookup:
    return Lookup(obj=obj)


def failed(status: Optional[int], reason: str = "") -> Lookup:
    return Lookup(status=status, reason=reason)


def unreadable(lookup: Lookup, what: str) -> str:
    """``no WHAT`` when the read said 404, else ``cannot read WHAT (why)``."""
    return f"no {what}" if lookup.absent else f"cannot read {what} ({lookup.why()})"


# -- versions ----------------------------------------------------------------------------------
def parse_version(text: Any) -> Optional[Tuple[int, int, int]]:
    """``"v2.3.0"``, ``"2.5.0"``, ``"v0.20.0-rc1"`` -> (major, minor, patch); None otherwise."""
    match = re.match(r"^v?(\d+)\.(\d+)(?:\.(\d+))?", str(text or "").strip())
    if not match:
        return None
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def minor_of(version: Tuple[int, int, int]) -> str:
    return f"{version[0]}.{version[1]}"


def show(version: Tuple[int, int, int]) -> str:
    return ".".join(map(str, version))


def image_version(deployment: Mapping[str, Any]) -> Optional[Tuple[int, int, int]]:
    """The version in the image tag of a controller Deployment's first versioned container
    (``kserve/kserve-controller:v0.20.0``, ``ghcr.io/kubeflow/katib/katib-controller:v0.18.0``)."""
    containers = (((deployment.get("spec") or {}).get("template") or {}).get("spec") or {}) \
        .get("containers") or []
    for container in containers:
        image = str(container.get("image") or "").split("@")[0]
        name, _, tag = image.rpartition(":")
        if name and "/" not in tag and parse_version(tag):
            return parse_version(tag)
    return None


def supported(version: Tuple[int, int, int], minors: Sequence[str]) -> bool:
    return minor_of(version) in minors


def version_range(minors: Sequence[str]) -> str:
    return minors[0] if len(minors) == 1 else f"{minors[0]}-{minors[-1]}"


# -- APIs (CustomResourceDefinitions) -----------------------------------------------------------
@dataclass(frozen=True)
class Api:
    """A custom resource kubeseg creates: where it lives and what installs it."""

    kind: str
    group: str
    version: str
    plural: str
    install: str

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{self.group}"

    def __str__(self) -> str:
        return f"{self.kind} {self.group}/{self.version}"


def crd_served_versions(crd: Mapping[str, Any]) -> List[str]:
    """The versions a CRD serves; none while its status says it is not Established."""
    conditions = (crd.get("status") or {}).get("conditions") or []
    established = [c for c in conditions if c.get("type") == "Established"]
    if established and str(established[0].get("status")) != "True":
        return []
    return [v["name"] for v in (crd.get("spec") or {}).get("versions") or [] if v.get("served")]


def api_served(api: Api, crd: Lookup, discovered: Optional[List[str]] = None
               ) -> Tuple[Optional[bool], str]:
    """Whether the API server serves ``api`` (None: cannot tell) and what was seen. The CRD
    decides when it can be read; otherwise ``discovered``, the versions of the group whose
    API discovery lists the resource (None when discovery failed too)."""
    if crd.obj is not None:
        served = crd_served_versions(crd.obj)
        if api.version in served:
            return True, f"{api} served"
        return False, (f"CRD {api.crd_name} serves {', '.join(served) or 'no version'}, not "
                       f"{api.version}")
    if crd.absent:
        return False, f"no CRD {api.crd_name}"
    if discovered is None:
        return None, f"cannot tell whether {api} is served ({unreadable(crd, 'its CRD')})"
    if api.version in discovered:
        return True, f"{api} served (API discovery)"
    if discovered:
        return False, f"{api.crd_name} is served only as {', '.join(discovered)}"
    return False, f"the API server does not serve {api.crd_name}"


def versions_listing(plural: str, listings: Mapping[str, Optional[Mapping[str, Any]]]
                     ) -> Optional[List[str]]:
    """The versions whose API discovery document (an APIResourceList, by version) lists
    ``plural``; None when one of them could not be read."""
    if any(listing is None for listing in listings.values()):
        return None
    return [version for version, listing in listings.items()
            if any(r.get("name") == plural for r in listing.get("resources") or [])]
