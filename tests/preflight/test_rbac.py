"""The access reviews are derived from the RBAC kubeseg ships (manifests/base), and cover what
kubeseg's own code creates in the step pods."""
import shutil
from pathlib import Path

import pytest
import yaml

from kubeseg.deploy.training_job import KINDS
from kubeseg.preflight import platform, rbac
from kubeseg.preflight.base import FAIL, OK, WARN
from kubeseg.preflight.rbac import Access

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"


def test_the_reviews_come_from_the_shipped_role():
    accesses = rbac.required_access(MANIFESTS)
    role = yaml.safe_load((MANIFESTS / "base" / "rbac.yaml").read_text())
    expected = sum(len(r["apiGroups"]) * len(r["resources"]) * len(r["verbs"])
                   for r in role["rules"])
    assert len(accesses) == expected
    assert Access("get", "", "pods", "log") in accesses
    assert Access("get", "", "pods", "log").resource_attributes("ns") == {
        "namespace": "ns", "verb": "get", "group": "", "resource": "pods", "subresource": "log"}


def test_the_shipped_role_lets_the_steps_do_what_kubeseg_does():
    """The deploy step creates and patches InferenceServices; the distributed-training step
    creates, reads and deletes its training job: the Role grants it all."""
    accesses = set(rbac.required_access(MANIFESTS))
    api = platform.INFERENCE_SERVICE_API
    for verb in ("get", "create", "patch"):
        assert Access(verb, api.group, api.plural) in accesses
    for kind in KINDS.values():
        for verb in ("get", "create", "delete"):
            assert Access(verb, kind.group, kind.plural) in accesses


@pytest.fixture
def manifests(tmp_path):
    copy = tmp_path / "manifests"
    shutil.copytree(MANIFESTS, copy)
    return copy


def test_a_changed_role_changes_the_reviews(manifests):
    path = manifests / "base" / "rbac.yaml"
    role = yaml.safe_load(path.read_text())
    role["rules"][0]["verbs"].append("delete")
    role["rules"].append({"apiGroups": ["kubeflow.org"], "resources": ["experiments"],
                          "verbs": ["create"]})
    del role["rules"][2]  # the PyTorchJob rule
    path.write_text(yaml.safe_dump(role))
    accesses = rbac.required_access(manifests)
    assert Access("delete", "serving.kserve.io", "inferenceservices") in accesses
    assert Access("create", "kubeflow.org", "experiments") in accesses
    assert not [a for a in accesses if a.resource == "pytorchjobs"]


def test_the_step_accounts_come_from_the_shipped_rolebindings(manifests):
    assert rbac.step_accounts(MANIFESTS) == {rbac.MULTI_USER: "default-editor",
                                             rbac.STANDALONE: "pipeline-runner"}
    path = manifests / "components" / rbac.STANDALONE / "rolebinding.yaml"
    binding = yaml.safe_load(path.read_text())
    binding["subjects"][0]["name"] = "kfp-runner"
    path.write_text(yaml.safe_dump(binding))
    assert rbac.step_accounts(manifests)[rbac.STANDALONE] == "kfp-runner"


def test_a_folder_without_the_manifests_is_a_clear_error(tmp_path):
    from kubeseg.errors import ConfigError

    with pytest.raises(ConfigError, match="no base/kustomization.yaml.*--manifests DIR"):
        rbac.required_access(tmp_path)


def test_permissions_check():
    user = rbac.service_account_user("kubeflow-user", "default-editor")
    assert user == "system:serviceaccount:kubeflow-user:default-editor"
    create = Access("create", "trainer.kubeflow.org", "trainjobs")
    get = Access("get", "trainer.kubeflow.org", "trainjobs")
    logs = Access("get", "", "pods", "log")
    ok = rbac.check_permissions(user, "kubeflow-user", [(create, True), (logs, True)])
    assert ok.status == OK and "all 2 actions" in ok.found
    denied = rbac.check_permissions(user, "kubeflow-user",
                                    [(get, False), (create, False), (logs, False)])
    assert denied.status == FAIL
    assert denied.found.endswith("may not: get/create trainjobs.trainer.kubeflow.org; "
                                 "get pods/log")
    assert "manifests/overlays/kfp-multi-user" in denied.fix
    refused = rbac.check_permissions(user, "kubeflow-user", None, "impersonation refused")
    assert refused.status == WARN and "--as=" + user in refused.fix
