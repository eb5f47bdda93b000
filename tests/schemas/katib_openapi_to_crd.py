"""Regenerate katib-experiment.yaml: Katib's Experiment CRD with the field schema of its API.

Katib's CRD (manifests/v1beta1/components/crd/experiment.yaml) declares its openAPIV3Schema as
``type: object`` with ``x-kubernetes-preserve-unknown-fields: true``: the API server accepts any
field, and Katib checks objects in its admission webhook against its Go types. Those Go types
are published as an OpenAPI document in the same repository (api/openapi-spec/swagger.json).
This script puts the schema of ``v1beta1.Experiment`` from that document, with every ``$ref``
inlined and descriptions dropped, in place of the open schema of the CRD at the same commit.

    git -C KATIB show COMMIT:manifests/v1beta1/components/crd/experiment.yaml > crd.yaml
    git -C KATIB show COMMIT:api/openapi-spec/swagger.json > swagger.json
    python katib_openapi_to_crd.py crd.yaml swagger.json COMMIT > katib-experiment.yaml
"""
import json
import sys

import yaml

DROPPED = ("description", "default")


def inline(node, schemas, trail=()):
    if isinstance(node, list):
        return [inline(item, schemas, trail) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        if name in trail:
            raise ValueError(f"recursive schema {name}")
        out.update(inline(schemas[name], schemas, trail + (name,)))
    all_of = node.get("allOf")
    if all_of and len(all_of) == 1 and "$ref" in all_of[0]:
        out.update(inline(all_of[0], schemas, trail))
    for key, value in node.items():
        if key in DROPPED or key == "$ref" or (key == "allOf" and all_of is not None
                                               and len(all_of) == 1):
            continue
        if key == "properties":  # property names are data, even one called "description"
            out[key] = {name: inline(sub, schemas, trail) for name, sub in value.items()}
        else:
            out[key] = inline(value, schemas, trail)
    return out


def main(crd_path, swagger_path, commit):
    crd = yaml.safe_load(open(crd_path))
    schemas = json.load(open(swagger_path))["components"]["schemas"]
    experiment = inline(schemas["v1beta1.Experiment"], schemas)
    (version,) = crd["spec"]["versions"]
    version["schema"]["openAPIV3Schema"] = experiment
    print("# Katib Experiment CRD (kubeflow.org/v1beta1) with the field schema of Katib's API.")
    print(f"# Source: github.com/kubeflow/katib at commit {commit}:")
    print("#   manifests/v1beta1/components/crd/experiment.yaml (the CRD: names, group, version;")
    print("#   its own openAPIV3Schema is open, x-kubernetes-preserve-unknown-fields: true), and")
    print("#   api/openapi-spec/swagger.json, components.schemas[v1beta1.Experiment] (the schema")
    print("#   generated from Katib's Go types), every $ref inlined, descriptions and defaults")
    print("#   dropped. Regenerate with tests/schemas/katib_openapi_to_crd.py.")
    print(yaml.safe_dump(crd, sort_keys=False, width=100), end="")


if __name__ == "__main__":
    main(*sys.argv[1:4])
