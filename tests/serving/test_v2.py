"""The Open Inference Protocol v2 as pure functions (kubeseg.serving.v2): parsed and encoded in
this process, without an app or a model (the HTTP tests send the same requests to the server)."""
import json
import struct
import subprocess
import sys

import numpy as np
import pytest

from kubeseg.serving import codecs, v2


def _binary_request(elements, outputs):
    raw = b"".join(struct.pack("<I", len(e)) + e for e in elements)
    head = json.dumps({"id": "r1", "inputs": [
        {"name": "image", "datatype": "BYTES", "shape": [len(elements)],
         "parameters": {"binary_data_size": len(raw)}}], "outputs": outputs}).encode()
    return head + raw, str(len(head))


def test_a_binary_request_parses_and_a_binary_response_encodes():
    body, length = _binary_request([b"\xff\xd8one", b"two"], [
        {"name": "probabilities", "parameters": {"binary_data": True}}, {"name": "mask"}])
    parsed = v2.parse_request(body, length)
    assert parsed.image[:2] == ("image", "BYTES") and parsed.image[2] == [b"\xff\xd8one", b"two"]
    assert parsed.requested() == ["probabilities", "mask"]
    assert parsed.binary() == {"probabilities": True, "mask": False}
    assert parsed.request_id == "r1"
    images, kind = v2.images_of(*parsed.image, max_images=2)
    assert (images, kind) == ([b"\xff\xd8one", b"two"], "encoded")
    with pytest.raises(codecs.PayloadTooLarge, match="--max-images-per-request"):
        v2.images_of(*parsed.image, max_images=1)

    probabilities = np.arange(12, dtype=np.float32).reshape(1, 3, 2, 2)
    mask = np.ones((1, 2, 2), np.uint8)
    payload, json_length = v2.encode_response("shapes", "r1", [
        ("probabilities", "FP32", probabilities, True), ("mask", "UINT8", mask, False)])
    head = json.loads(payload[:json_length])
    assert head["model_name"] == "shapes" and head["id"] == "r1"
    assert head["outputs"][0]["parameters"] == {"binary_data_size": probabilities.nbytes}
    assert head["outputs"][1]["data"] == [1, 1, 1, 1]
    np.testing.assert_array_equal(
        np.frombuffer(payload[json_length:], np.float32).reshape(1, 3, 2, 2), probabilities)


def test_a_malformed_request_names_the_field():
    body, _ = _binary_request([b"abc"], [])
    with pytest.raises(codecs.RequestError, match="Inference-Header-Content-Length"):
        v2.parse_request(body, "x")
    with pytest.raises(codecs.RequestError, match=r"outputs\[0\].name"):
        v2.parse_request(json.dumps({"inputs": [{"datatype": "UINT8", "shape": [1, 1, 3],
                                                 "data": [1, 2, 3]}],
                                     "outputs": [{"name": "logits"}]}).encode(), None)


def test_the_protocol_module_loads_no_web_framework_and_no_torch():
    code = ("import sys, kubeseg.serving.v2; print(sorted({m.split('.')[0] for m in sys.modules}"
            " & {'fastapi', 'starlette', 'kserve', 'uvicorn', 'torch'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.strip() == "[]", result.stdout
