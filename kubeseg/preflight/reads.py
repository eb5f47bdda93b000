"""The cluster reads of ``kubeseg preflight``, thin over the one Kubernetes client
(:func:`kubeseg.deploy.cluster.api_client`): GETs that return each object as the API server
sends it, SelfSubjectAccessReviews, and the KFP API server's healthz. Only get, list and
SelfSubjectAccessReview create are used: nothing on the cluster changes."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from kubeseg.errors import ClusterError
from kubeseg.preflight.base import Api, Lookup, failed, found, versions_listing
from kubeseg.preflight.platform import KFP_HEALTHZ_PATH
from kubeseg.preflight.rbac import Access

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 15
SSAR_PATH = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"
POD_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"  # in a pod: its account's


class ClusterReader:
    """GETs (and access reviews) through a ``kubernetes.client.ApiClient``."""

    def __init__(self, api_client: Any, pod_token: Optional[str] = None):
        self.api = api_client
        self.pod_token = pod_token or POD_TOKEN

    @classmethod
    def connect(cls, api_client: Any = None) -> "ClusterReader":
        """A reader for the kubeconfig's (or the pod's) cluster; a ClusterError when there is
        none or its API server does not answer."""
        from kubeseg.deploy import cluster

        reader = cls(api_client or cluster.api_client("check", "or run kubeseg preflight in a "
                                                               "pod of the cluster"))
        version = reader.get("/version")
        if version.obj is None:
            raise ClusterError(f"the Kubernetes API server at {reader.host} did not answer GET "
                               f"/version ({version.why()}); check KUBECONFIG and its current "
                               "context, and that you are logged in")
        logger.info("checking the cluster at %s (Kubernetes %s)", reader.host,
                    version.obj.get("gitVersion", "?"))
        return reader

    @property
    def host(self) -> str:
        return self.api.configuration.host

    def _call(self, path: str, method: str = "GET", body: Any = None,
              headers: Optional[Dict[str, str]] = None) -> Lookup:
        import urllib3
        from kubernetes.client.exceptions import ApiException

        header_params = {"Accept": "application/json", **(headers or {})}
        if body is not None:
            header_params["Content-Type"] = "application/json"
        try:
            obj = self.api.call_api(path, method, header_params=header_params, body=body,
                                    auth_settings=["BearerToken"], response_type="object",
                                    _return_http_data_only=True,
                                    _request_timeout=REQUEST_TIMEOUT_S)
        except ApiException as exc:
            return failed(exc.status, exc.reason or "")
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            return failed(None, f"{type(exc).__name__}: {exc}")
        return found(obj) if isinstance(obj, dict) else failed(None, "answer is not a JSON "
                                                                     "object")

    def get(self, path: str) -> Lookup:
        return self._call(path)

    def first(self, paths: Sequence[str]) -> Lookup:
        """The first of ``paths`` found; else absent only when every read said 404."""
        lookups = []
        for path in paths:
            lookup = self.get(path)
            if lookup.obj is not None:
                return lookup
            lookups.append(lookup)
        return next((lookup for lookup in lookups if not lookup.absent), lookups[-1])

    def crd(self, api: Api) -> Tuple[Lookup, Optional[List[str]]]:
        """The CRD of ``api``; when it cannot be read, the versions API discovery lists the
        resource in (None: discovery failed too)."""
        crd = self.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{api.crd_name}")
        if crd.obj is not None or crd.absent:
            return crd, None
        group = self.get(f"/apis/{api.group}")
        if group.absent:
            return crd, []
        if group.obj is None:
            return crd, None
        listings = {v.get("version"): self.get(f"/apis/{v.get('groupVersion')}").obj
                    for v in group.obj.get("versions") or []}
        return crd, versions_listing(api.plural, listings)

    def access_reviews(self, accesses: Sequence[Access], namespace: str, user: str
                       ) -> Tuple[Optional[List[Tuple[Access, bool]]], str]:
        """One SelfSubjectAccessReview per access, asked as ``user``: impersonated, unless
        preflight runs in a pod as that very account. None and the reason when the reviews are
        refused."""
        headers = {} if pod_user(self.pod_token) == user else {"Impersonate-User": user}
        results = []
        for access in accesses:
            body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                    "spec": {"resourceAttributes": access.resource_attributes(namespace)}}
            answer = self._call(SSAR_PATH, "POST", body, headers)
            if answer.obj is None:
                return None, (f"the access review as {user} was refused ({answer.why()}): asking "
                              "as a service account needs the right to impersonate it")
            results.append((access, bool((answer.obj.get("status") or {}).get("allowed"))))
        return results, ""


def pod_user(token_path: str = POD_TOKEN) -> Optional[str]:
    """The user name of the service account this pod runs as (the ``sub`` of its token), or
    None outside a pod."""
    import base64

    try:
        payload = Path(token_path).read_text().split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (OSError, IndexError, ValueError):
        return None
    return claims.get("sub") if isinstance(claims, dict) else None


def kfp_healthz(host: str, token: Optional[str], timeout_s: float = 10.0) -> Lookup:
    """GET the KFP API server's healthz at ``host`` (with a bearer token when given)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(host.rstrip("/") + KFP_HEALTHZ_PATH,
                                     headers={"Accept": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        return failed(exc.code, str(exc.reason))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return failed(None, str(getattr(exc, "reason", exc)))
    try:
        answer = json.loads(body)
    except ValueError:
        return failed(None, "the answer is not JSON: is this the KFP API?")
    return found(answer) if isinstance(answer, dict) else failed(None, "not a JSON object")


__all__ = ["ClusterReader", "kfp_healthz", "pod_user"]
