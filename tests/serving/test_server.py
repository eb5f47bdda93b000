"""The real server over real HTTP: SageMaker-style /invocations read with the SageMaker SDK,
Open Inference Protocol v2 with tritonclient, limits and refusals, metrics, large images."""
from __future__ import annotations

import io
import os
import struct
import urllib.request
import zlib

import numpy as np
import requests
from PIL import Image

from serving_support import (CLASS_NAMES, MAX_REQUEST_BYTES, encode, expected_probabilities,
                             random_image)

os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")

ATOL = 2e-4  # the server folds BatchNorm into the convolutions and uses channels-last


def post(server, body, content_type="image/jpeg", accept="image/png", path="/invocations"):
    headers = {"Content-Type": content_type}
    if accept is not None:
        headers["Accept"] = accept
    return requests.post(server.url + path, data=body, headers=headers, timeout=60)


def decoded(jpeg: bytes) -> Image.Image:
    return Image.open(io.BytesIO(jpeg)).convert("RGB")


def read_probabilities_with_sagemaker(body: bytes) -> np.ndarray:
    from sagemaker.amazon.common import read_records

    (record,) = read_records(io.BytesIO(body))
    shape = list(record.features["shape"].int32_tensor.values)
    values = np.array(record.features["target"].float32_tensor.values, dtype=np.float32)
    return values.reshape(shape)


def test_health_routes(server):
    assert requests.get(server.url + "/ping", timeout=10).status_code == 200
    assert requests.get(server.url + "/v2/health/live", timeout=10).status_code == 200
    assert requests.get(server.url + "/v2/health/ready", timeout=10).status_code == 200
    ready = requests.get(server.url + "/v2/models/shapes/ready", timeout=10)
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert requests.get(server.url + "/v2/models/shapes", timeout=10).json()["name"] == "shapes"
    assert requests.get(server.url + "/v2/models/other/ready", timeout=10).status_code == 404


def test_probabilities_match_model_and_png_is_their_argmax(server, reference):
    jpeg = encode(random_image(56, 40, seed=1))
    response = post(server, jpeg, accept="application/x-recordio-protobuf")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-recordio-protobuf"
    probabilities = read_probabilities_with_sagemaker(response.content)
    assert probabilities.shape == (1, 3, 40, 56)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    expected = expected_probabilities(reference, decoded(jpeg))
    np.testing.assert_allclose(probabilities, expected, atol=ATOL)

    png = post(server, jpeg, accept="image/png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    mask_image = Image.open(io.BytesIO(png.content))
    assert mask_image.mode == "L" and mask_image.size == (56, 40)
    mask = np.asarray(mask_image)
    np.testing.assert_array_equal(mask, probabilities[0].argmax(axis=0))
    # the same record through the x-protobuf alias and with application/x-image
    alias = post(server, jpeg, content_type="application/x-image", accept="application/x-protobuf")
    np.testing.assert_array_equal(read_probabilities_with_sagemaker(alias.content), probabilities)


def test_png_request_and_json_answers(server, reference):
    image = random_image(33, 47, seed=2)
    png_bytes = encode(image, "PNG")
    mask = post(server, png_bytes, content_type="image/png", accept="application/json")
    assert mask.status_code == 200
    body = mask.json()
    assert body["shape"] == [47, 33] and body["class_names"] == CLASS_NAMES
    probs = post(server, png_bytes, content_type="image/png",
                 accept="application/json; output=probabilities").json()
    assert probs["shape"] == [1, 3, 47, 33]
    values = np.array(probs["probabilities"], dtype=np.float32)[None]
    np.testing.assert_allclose(values, expected_probabilities(reference, image), atol=ATOL)
    np.testing.assert_array_equal(np.array(body["mask"]), values[0].argmax(axis=0))


def test_large_image_is_answered_at_its_size(server, reference):
    """Above the pixel limit the image is scored downscaled and answered at full size."""
    image = random_image(150, 110, seed=3)  # 16500 pixels > MAX_PIXELS
    jpeg = encode(image)
    response = post(server, jpeg, accept="application/x-recordio-protobuf")
    assert response.status_code == 200
    probabilities = read_probabilities_with_sagemaker(response.content)
    assert probabilities.shape == (1, 3, 110, 150)
    np.testing.assert_allclose(probabilities, expected_probabilities(reference, decoded(jpeg)),
                               atol=ATOL)
    png = post(server, jpeg)
    mask = np.asarray(Image.open(io.BytesIO(png.content)))
    assert mask.shape == (110, 150)
    np.testing.assert_array_equal(mask, probabilities[0].argmax(axis=0))


def test_tiled_image_matches_sliding_window(server, reference):
    image = random_image(62, 30, seed=4)  # under the pixel limit, one side above the tile size
    jpeg = encode(image)
    response = post(server, jpeg, accept="application/x-recordio-protobuf")
    probabilities = read_probabilities_with_sagemaker(response.content)
    np.testing.assert_allclose(probabilities, expected_probabilities(reference, decoded(jpeg)),
                               atol=ATOL)


def png_header_claiming(width, height):
    def chunk(kind, body):
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def test_refusals_are_json_with_status(server):
    jpeg = encode(random_image(20, 20))
    cases = [
        (dict(body=jpeg, content_type="text/plain"), 415, "Content-Type"),
        (dict(body=jpeg, content_type="application/json"), 415, "Content-Type"),
        (dict(body=jpeg, accept="text/html"), 406, "Accept"),
        (dict(body=jpeg, accept="application/json; output=logits"), 406, "output"),
        (dict(body=b""), 400, "empty"),
        (dict(body=os.urandom(3000)), 400, "JPEG or PNG"),
        (dict(body=jpeg[: len(jpeg) // 2]), 400, "JPEG or PNG"),
        (dict(body=png_header_claiming(5000, 5000), content_type="image/png"), 413,
         "--max-image-pixels"),
        (dict(body=png_header_claiming(1 << 20, 1 << 20), content_type="image/png"), 413,
         "--max-image-pixels"),
        (dict(body=b"\0" * (MAX_REQUEST_BYTES + 1)), 413, "--max-request-bytes"),
    ]
    for kwargs, status, words in cases:
        response = post(server, **kwargs)
        assert response.status_code == status, (kwargs.get("content_type"), response.text)
        body = response.json()
        assert body["status"] == status and words in body["error"], body
    assert post(server, jpeg).status_code == 200  # still serving


def test_v2_infer_with_tritonclient(server, reference):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=server.url.replace("http://", ""))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("shapes")
    jpeg = encode(random_image(40, 36, seed=5))
    image = httpclient.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([jpeg], dtype=np.object_), binary_data=True)
    outputs = [httpclient.InferRequestedOutput("mask", binary_data=True),
               httpclient.InferRequestedOutput("probabilities", binary_data=True)]
    result = client.infer("shapes", [image], outputs=outputs)
    mask, probabilities = result.as_numpy("mask"), result.as_numpy("probabilities")
    assert mask.shape == (1, 36, 40) and mask.dtype == np.uint8
    assert probabilities.shape == (1, 3, 36, 40)
    np.testing.assert_allclose(probabilities, expected_probabilities(reference, decoded(jpeg)),
                               atol=ATOL)
    np.testing.assert_array_equal(mask[0], probabilities[0].argmax(axis=0))

    # raw pixels, JSON (non-binary) outputs
    pixels = np.asarray(random_image(24, 20, seed=6))
    raw = httpclient.InferInput("image", list(pixels.shape), "UINT8")
    raw.set_data_from_numpy(pixels, binary_data=False)
    result = client.infer("shapes", [raw], outputs=[
        httpclient.InferRequestedOutput("mask", binary_data=False)])
    expected = expected_probabilities(reference, Image.fromarray(pixels))
    np.testing.assert_array_equal(result.as_numpy("mask")[0], expected[0].argmax(axis=0))


def test_v2_bad_input_is_400(server):
    body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                        "data": ["not an image"]}]}
    response = requests.post(server.url + "/v2/models/shapes/infer", json=body, timeout=30)
    assert response.status_code == 400, response.text
    body = {"inputs": [{"name": "image", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}]}
    response = requests.post(server.url + "/v2/models/shapes/infer", json=body, timeout=30)
    assert response.status_code == 400 and "datatype" in response.text


def test_prometheus_metrics(server):
    post(server, encode(random_image(16, 16)))
    text = urllib.request.urlopen(server.url + "/metrics", timeout=10).read().decode()
    assert 'kubeseg_requests_total{route="/invocations",status="200"}' in text
    assert 'kubeseg_request_duration_seconds_bucket{le="0.005",route="/invocations"}' in text \
        or 'kubeseg_request_duration_seconds_count{route="/invocations"}' in text
    assert "kubeseg_inference_batch_size_count" in text


def test_the_server_runs_the_backend_asked_for(server):
    assert f"; {server.backend}, float32)" in server.log.read_text()


def test_v2_versioned_route_is_the_same_served_path(server, reference):
    """Every v2 infer route is answered by the one v2 handler (KServe's model has no second
    predict path): a versioned request gets the same answer, KServe's v1 predict a clear 501."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=server.url.replace("http://", ""))
    jpeg = encode(random_image(30, 26, seed=7))
    image = httpclient.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([jpeg], dtype=np.object_), binary_data=True)
    outputs = [httpclient.InferRequestedOutput("probabilities", binary_data=True)]
    plain = client.infer("shapes", [image], outputs=outputs).as_numpy("probabilities")
    versioned = client.infer("shapes", [image], model_version="1",
                             outputs=outputs).as_numpy("probabilities")
    np.testing.assert_array_equal(versioned, plain)
    np.testing.assert_allclose(plain, expected_probabilities(reference, decoded(jpeg)),
                               atol=ATOL)
    v1 = requests.post(server.url + "/v1/models/shapes:predict", json={"instances": [[1]]},
                       timeout=30)
    assert v1.status_code == 501, v1.text
    assert server.alive()
