"""What the pipeline's step account must be allowed to do, read from the RBAC kubeseg ships.

``manifests/base`` holds the Role the step pods need (InferenceServices, training jobs, their
pods' state); ``manifests/components/kfp-*`` bind it to the account the step pods run as. The
access reviews of ``kubeseg preflight`` are derived from those files, so a rule added to the
Role is checked without another list to keep in step.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from kubeseg.errors import ConfigError
from kubeseg.preflight.base import FAIL, OK, WARN, Check

ROLE_KINDS = ("Role", "ClusterRole")
# The components that bind the Role: one per way of installing Kubeflow Pipelines.
MULTI_USER = "kfp-multi-user"
STANDALONE = "kfp-standalone"


@dataclass(frozen=True)
class Access:
    """One (verb, resource) pair, as a SelfSubjectAccessReview asks about it."""

    verb: str
    group: str  # "" is the core API group
    resource: str
    subresource: str = ""
    name: str = ""  # a rule limited to resourceNames asks about each name

    def resource_attributes(self, namespace: str) -> Dict[str, str]:
        """The ``spec.resourceAttributes`` of the access review."""
        attributes = {"namespace": namespace, "verb": self.verb, "group": self.group,
                      "resource": self.resource}
        if self.subresource:
            attributes["subresource"] = self.subresource
        if self.name:
            attributes["name"] = self.name
        return attributes

    @property
    def target(self) -> str:
        """``resource[/subresource][.group][ name]``, as kubectl names it."""
        what = self.resource + (f"/{self.subresource}" if self.subresource else "")
        what += f".{self.group}" if self.group else ""
        return what + (f" {self.name}" if self.name else "")

    def __str__(self) -> str:
        return f"{self.verb} {self.target}"


def describe(accesses: Sequence[Access]) -> str:
    """``get/list pods; create trainjobs.trainer.kubeflow.org``: verbs grouped by resource."""
    verbs: Dict[str, List[str]] = {}
    for access in accesses:
        verbs.setdefault(access.target, []).append(access.verb)
    return "; ".join(f"{'/'.join(v)} {target}" for target, v in verbs.items())


def default_manifests_dir() -> Optional[Path]:
    """The manifests/ folder of the checkout kubeseg runs from, when there is one."""
    folder = Path(__file__).resolve().parents[2] / "manifests"
    return folder if (folder / "base").is_dir() else None


def _documents(path: Path) -> Iterator[Mapping[str, Any]]:
    import yaml

    try:
        documents = list(yaml.safe_load_all(path.read_text()))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError([f"{path}: cannot read it as YAML ({exc})"], what="manifest") from None
    for document in documents:
        if isinstance(document, Mapping):
            yield document


def _base_files(manifests: Path) -> List[Path]:
    base = manifests / "base"
    kustomization = base / "kustomization.yaml"
    if not kustomization.is_file():
        raise ConfigError([f"{manifests}: no base/kustomization.yaml; give the manifests/ folder "
                           "of a kubeseg checkout (--manifests DIR)"], what="option")
    resources = next(_documents(kustomization), {}).get("resources") or []
    return [base / name for name in resources if (base / name).is_file()]


def roles(manifests: Path) -> List[Mapping[str, Any]]:
    """The Roles (and ClusterRoles) of ``manifests/base``, as written."""
    return [doc for path in _base_files(manifests) for doc in _documents(path)
            if doc.get("kind") in ROLE_KINDS]


def required_access(manifests: Path) -> List[Access]:
    """Every (verb, resource) the Roles of ``manifests/base`` grant, in the order written."""
    found: List[Access] = []
    for role in roles(manifests):
        for rule in role.get("rules") or []:
            names = rule.get("resourceNames") or [""]
            for group in rule.get("apiGroups") or [""]:
                for resource in rule.get("resources") or []:
                    main, _, sub = resource.partition("/")
                    for verb in rule.get("verbs") or []:
                        for name in names:
                            access = Access(verb, group, main, sub, name)
                            if access not in found:
                                found.append(access)
    if not found:
        raise ConfigError([f"{manifests / 'base'}: no Role with rules found"], what="manifest")
    return found


def step_accounts(manifests: Path) -> Dict[str, str]:
    """The service account each ``components/kfp-*`` binds kubeseg's Role to, by component
    name (``kfp-multi-user``: the profile's ``default-editor``; ``kfp-standalone``:
    ``pipeline-runner``)."""
    role_names = {(role.get("metadata") or {}).get("name") for role in roles(manifests)}
    accounts: Dict[str, str] = {}
    for component in (MULTI_USER, STANDALONE):
        for path in sorted((manifests / "components" / component).glob("*.yaml")):
            for doc in _documents(path):
                if doc.get("kind") != "RoleBinding" or \
                        (doc.get("roleRef") or {}).get("name") not in role_names:
                    continue
                for subject in doc.get("subjects") or []:
                    if subject.get("kind") == "ServiceAccount":
                        accounts.setdefault(component, subject["name"])
    return accounts




def service_account_user(namespace: str, name: str) -> str:
    """The user name Kubernetes gives a service account (what impersonation asks for)."""
    return f"system:serviceaccount:{namespace}:{name}"


def check_permissions(user: Optional[str], namespace: str,
                      results: Optional[Sequence[Tuple[Access, bool]]], problem: str = "",
                      overlay: str = MULTI_USER) -> Check:
    """Every access review answered allowed for the step account ``user``; ``results`` is None
    when the reviews could not be asked (``problem`` says why; ``user`` is None when the
    account is not known)."""
    name = "step permissions"
    if results is None or user is None:
        return Check(name, WARN, f"not checked{f' for {user}' if user else ''}: {problem}",
                     f"check by hand: kubectl auth can-i --list -n {namespace} --as={user}"
                     if user else "")
    denied = [access for access, allowed in results if not allowed]
    if denied:
        return Check(name, FAIL, f"{user} may not: {describe(denied)}",
                     f"kubectl apply -k manifests/overlays/{overlay} (its namespace: set to "
                     f"{namespace})")
    return Check(name, OK, f"{user} may do all {len(results)} actions of kubeseg's Role "
                           "(manifests/base)")


__all__ = ["Access", "MULTI_USER", "STANDALONE", "check_permissions", "default_manifests_dir",
           "describe",
           "required_access", "roles", "service_account_user", "step_accounts"]
