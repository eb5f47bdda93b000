"""Hostile requests against the real server: a tabulated and a generated fuzz of both protocols
(every refusal a 4xx naming the field, never a 5xx), tiny and empty images, the cap on images per
v2 request, clients that go away mid-body, 16-bit PNGs and EXIF-rotated JPEGs."""
from __future__ import annotations

import copy
import io
import json
import random
import socket
import struct
import time
import urllib.parse

import numpy as np
import pytest
import requests
from PIL import Image, ImageOps

from serving_support import encode, expected_probabilities, random_image

V2 = "/v2/models/shapes/infer"
GENERATED = 240  # mutated v2 requests
INVOCATION_MUTANTS = 80


def _latin1(data: bytes) -> str:
    return data.decode("latin-1")


def _good_v2(jpeg: bytes) -> dict:
    return {"id": "a", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                   "data": [_latin1(jpeg)]}],
            "outputs": [{"name": "mask", "parameters": {"binary_data": False}}],
            "parameters": {"binary_data_output": False}}


def _binary_request(entry: dict, raw: bytes) -> tuple:
    head = json.dumps({"inputs": [entry]}).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head)),
                        "Content-Type": "application/octet-stream"}


def _v2(server, body, headers=None):
    if not isinstance(body, bytes):
        body = json.dumps(body).encode()
    return requests.post(server.url + V2, data=body, timeout=60,
                         headers=headers or {"Content-Type": "application/json"})


def _tabulated(jpeg: bytes):
    """(case, body or (body, headers), expected status, words the error must hold)."""
    good = _good_v2(jpeg)

    def with_input(**changes):
        request = copy.deepcopy(good)
        request["inputs"][0].update(changes)
        return request

    def with_top(**changes):
        request = copy.deepcopy(good)
        request.update(changes)
        return request

    pixel = {"name": "image", "datatype": "UINT8"}
    return [
        ("not json", b"{\"inputs\": [", 400, "not valid JSON"),
        ("array body", [1, 2], 400, "JSON object"),
        ("null body", None, 400, "JSON object"),
        ("no inputs", {"outputs": []}, 400, "no inputs"),
        ("input not object", {"inputs": [7]}, 400, "inputs[0]"),
        ("name not string", with_input(name=5), 400, "inputs[0].name"),
        ("datatype missing", {"inputs": [{"name": "image", "shape": [1], "data": ["x"]}]},
         400, "inputs[0].datatype"),
        ("datatype FP32", with_input(datatype="FP32"), 400, "FP32"),
        ("shape string", with_input(shape="1"), 400, "inputs[0].shape"),
        ("shape negative", with_input(shape=[-1]), 400, "inputs[0].shape[0]"),
        ("shape float", with_input(shape=[1.5]), 400, "inputs[0].shape[0]"),
        ("parameters list", with_input(parameters=[1]), 400, "inputs[0].parameters"),
        ("parameters string", with_input(parameters="binary"), 400, "inputs[0].parameters"),
        ("request parameters list", with_top(parameters=[]), 400, "parameters"),
        ("request parameters string", with_top(parameters="x"), 400, "parameters"),
        ("binary_data_output string", with_top(parameters={"binary_data_output": "yes"}), 400,
         "binary_data_output"),
        ("bytes data null", with_input(data=None), 400, "inputs[0].data"),
        ("bytes data negative", with_input(data=[-1]), 400, "inputs[0].data[0]"),
        ("bytes data number", with_input(data=[12]), 400, "inputs[0].data[0]"),
        ("bytes data object", with_input(data=[{}]), 400, "inputs[0].data[0]"),
        ("bytes data null element", with_input(data=[None]), 400, "inputs[0].data[0]"),
        ("bytes data not latin-1", with_input(data=["\u0394\u4e2d"]), 400, "Latin-1"),
        ("bytes data not an image", with_input(data=["hello"]), 400, "not a JPEG or PNG"),
        ("bytes data empty", with_input(data=[], shape=[0]), 400, "empty"),
        ("outputs string", with_top(outputs="mask"), 400, "outputs"),
        ("outputs element number", with_top(outputs=[3]), 400, "outputs[0]"),
        ("outputs unknown name", with_top(outputs=[{"name": "logits"}]), 400,
         "outputs[0].name"),
        ("outputs parameters list", with_top(outputs=[{"name": "mask", "parameters": [1]}]),
         400, "outputs[0].parameters"),
        ("outputs binary_data string",
         with_top(outputs=[{"name": "mask", "parameters": {"binary_data": "yes"}}]), 400,
         "outputs[0].parameters.binary_data"),
        ("id number", with_top(id=5), 400, "id"),
        ("too many images", with_input(shape=[17], data=[_latin1(jpeg)] * 17), 413,
         "--max-images-per-request"),
        ("uint8 zero size", {"inputs": [dict(pixel, shape=[0, 0, 3], data=[])]}, 400,
         "no pixels"),
        ("uint8 one row no columns", {"inputs": [dict(pixel, shape=[1, 0, 3], data=[])]}, 400,
         "no pixels"),
        ("uint8 negative", {"inputs": [dict(pixel, shape=[1, 1, 3], data=[-1, 0, 0])]}, 400,
         "inputs[0].data[0]"),
        ("uint8 above 255", {"inputs": [dict(pixel, shape=[1, 1, 3], data=[0, 256, 0])]}, 400,
         "inputs[0].data[1]"),
        ("uint8 string", {"inputs": [dict(pixel, shape=[1, 1, 3], data=["a", 0, 0])]}, 400,
         "inputs[0].data[0]"),
        ("uint8 null data", {"inputs": [dict(pixel, shape=[1, 1, 3], data=None)]}, 400,
         "inputs[0].data"),
        ("uint8 shape mismatch", {"inputs": [dict(pixel, shape=[2, 2, 3], data=[1, 2, 3])]},
         400, "inputs[0].shape"),
        ("uint8 two channels", {"inputs": [dict(pixel, shape=[2, 2, 2], data=[1] * 8)]}, 400,
         "[H, W, 3]"),
        ("binary size string", _binary_request(
            {"name": "image", "datatype": "BYTES", "shape": [1],
             "parameters": {"binary_data_size": "abc"}}, b"xxxx"), 400,
         "inputs[0].parameters.binary_data_size"),
        ("binary size negative", _binary_request(
            {"name": "image", "datatype": "BYTES", "shape": [1],
             "parameters": {"binary_data_size": -4}}, b"xxxx"), 400,
         "inputs[0].parameters.binary_data_size"),
        ("binary size too large", _binary_request(
            {"name": "image", "datatype": "BYTES", "shape": [1],
             "parameters": {"binary_data_size": 99999}}, b"xxxx"), 400,
         "inputs[0].parameters.binary_data_size"),
        ("binary bytes length prefix lies", _binary_request(
            {"name": "image", "datatype": "BYTES", "shape": [1],
             "parameters": {"binary_data_size": 8}}, struct.pack("<I", 1000) + b"abcd"), 400,
         "shorter than its lengths"),
        ("header length not a number", (json.dumps(good).encode(),
                                        {"Inference-Header-Content-Length": "abc"}), 400,
         "Inference-Header-Content-Length"),
        ("header length beyond body", (json.dumps(good).encode(),
                                       {"Inference-Header-Content-Length": "999999"}), 400,
         "Inference-Header-Content-Length"),
    ]


_JUNK = [None, -1, 0, 1.5, 2 ** 40, -2 ** 40, True, "", "x", "\u4e2d\u6587", [], [[-1]], {},
         {"a": [None]}, "9" * 30, [None, None]]


def _mutate(node, rng: random.Random):
    """A copy of a JSON value with one randomly chosen node replaced, added or removed."""
    node = copy.deepcopy(node)
    paths = []

    def walk(value, path):
        paths.append(path)
        if isinstance(value, dict):
            for key, child in value.items():
                walk(child, path + [key])
        elif isinstance(value, list) and not (value and isinstance(value[0], int)
                                              and len(value) > 8):
            for index, child in enumerate(value):
                walk(child, path + [index])

    walk(node, [])
    path = rng.choice(paths)
    if not path:
        return rng.choice(_JUNK)
    parent = node
    for step in path[:-1]:
        parent = parent[step]
    action = rng.random()
    if action < 0.15 and isinstance(parent, dict):
        del parent[path[-1]]
    elif action < 0.25 and isinstance(parent, dict):
        parent[rng.choice(["parameters", "shape", "data", "extra", "binary_data_size"])] = \
            rng.choice(_JUNK)
    else:
        parent[path[-1]] = rng.choice(_JUNK)
    return node


def _assert_refusal_or_answer(response, case):
    assert response.status_code < 500, (case, response.status_code, response.text[:300])
    if response.status_code >= 400:
        assert response.headers["content-type"].startswith("application/json"), case
        body = response.json()
        assert body["status"] == response.status_code and body["error"], (case, body)


@pytest.mark.timeout(600)
def test_v2_fuzz_tabulated_and_generated_gives_no_5xx(server):
    jpeg = encode(random_image(24, 20, seed=3))
    statuses = []
    for case, body, status, words in _tabulated(jpeg):
        response = _v2(server, *body) if isinstance(body, tuple) else _v2(server, body)
        statuses.append(response.status_code)
        assert response.status_code == status, (case, response.status_code, response.text[:300])
        assert words in response.json()["error"], (case, response.json())
    rng = random.Random(15)
    pixels_request = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [2, 3, 3],
                                  "data": list(range(18))}],
                      "outputs": [{"name": "probabilities"}]}
    seeds = [_good_v2(jpeg), pixels_request]
    for index in range(GENERATED):
        request = _mutate(seeds[index % 2], rng)
        response = _v2(server, request)
        statuses.append(response.status_code)
        _assert_refusal_or_answer(response, request)
    server_errors = [s for s in statuses if s >= 500]
    print(f"v2 fuzz: {len(statuses)} requests, {len(server_errors)} 5xx, "
          f"{statuses.count(200)} answered")
    assert not server_errors
    assert server.alive()


def test_invocations_fuzz_gives_no_5xx(server):
    rng = random.Random(7)
    seeds = [encode(random_image(30, 20, seed=4)), encode(random_image(30, 20, seed=5), "PNG")]
    types = ["image/jpeg", "image/png", "application/x-image", "text/plain", "", "image/*",
             "image/png; charset=\u00e9", "application/json"]
    accepts = ["image/png", "application/json; output=probabilities", "application/x-protobuf",
               "application/json; output=nonsense", "*/*;q=abc", "", "text/html"]
    statuses = []
    for index in range(INVOCATION_MUTANTS):
        data = bytearray(rng.choice(seeds))
        mutation = index % 4
        if mutation == 0:  # flip bytes in the header, where the sizes and chunk lengths are
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(min(len(data), 64))] = rng.randrange(256)
        elif mutation == 1:
            del data[rng.randrange(8, len(data)):]
        elif mutation == 2:
            data = bytearray(rng.randbytes(rng.randint(0, 300)))
        headers = {}
        content_type, accept = rng.choice(types), rng.choice(accepts)
        if content_type:
            headers["Content-Type"] = content_type.encode("latin-1", "replace")
        if accept:
            headers["Accept"] = accept
        response = requests.post(server.url + "/invocations", data=bytes(data),
                                 headers=headers, timeout=60)
        statuses.append(response.status_code)
        _assert_refusal_or_answer(response, (index, content_type, accept))
    server_errors = [s for s in statuses if s >= 500]
    print(f"/invocations fuzz: {len(statuses)} requests, {len(server_errors)} 5xx")
    assert not server_errors


@pytest.mark.parametrize("height,width", [(1, 1), (2, 5), (7, 3), (1, 90)])
def test_tiny_images_are_padded_and_answered_at_their_size(server, height, width):
    pixels = np.random.default_rng(height * 100 + width).integers(
        0, 256, (height, width, 3), dtype=np.uint8)
    request = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [height, width, 3],
                           "data": pixels.reshape(-1).tolist()}]}
    response = _v2(server, request)
    assert response.status_code == 200, response.text
    (mask,) = response.json()["outputs"]
    assert mask["shape"] == [1, height, width]
    png = encode(Image.fromarray(pixels), "PNG")
    answer = requests.post(server.url + "/invocations", data=png,
                           headers={"Content-Type": "image/png"}, timeout=60)
    assert answer.status_code == 200
    assert np.asarray(Image.open(io.BytesIO(answer.content))).shape == (height, width)


def _metric(server, name: str, labels: str) -> float:
    text = requests.get(server.url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(part in line for part in labels.split(",")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_client_gone_mid_body_is_counted_as_a_disconnect_not_a_500(server):
    route = 'route="/invocations"'
    before_500 = _metric(server, "kubeseg_requests_total", f'{route},status="500"')
    before = _metric(server, "kubeseg_client_disconnects_total", route)
    port = urllib.parse.urlsplit(server.url).port
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                         b"Content-Length: 5000\r\n\r\n" + b"\x89PNG" + b"\0" * 100)
            time.sleep(0.2)
    deadline = time.monotonic() + 30
    while _metric(server, "kubeseg_client_disconnects_total", route) < before + 3:
        assert time.monotonic() < deadline, "disconnects were not counted"
        time.sleep(0.2)
    assert _metric(server, "kubeseg_requests_total", f'{route},status="500"') == before_500
    assert _metric(server, "kubeseg_requests_total", f'{route},status="499"') >= 3


def test_16_bit_png_is_scaled_not_saturated(server, reference):
    ramp = np.linspace(0, 65535, 48 * 40).reshape(40, 48).astype(np.uint16)
    rng = np.random.default_rng(0)
    ramp = np.clip(ramp.astype(np.int64) + rng.integers(-9000, 9000, ramp.shape), 0, 65535)
    grey16 = Image.fromarray(ramp.astype(np.uint16))
    buf = io.BytesIO()
    grey16.save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    response = requests.post(server.url + "/invocations", data=buf.getvalue(),
                             headers={"Content-Type": "image/png"}, timeout=60)
    assert response.status_code == 200
    eight_bit = Image.fromarray((ramp >> 8).astype(np.uint8), mode="L").convert("RGB")
    expected = expected_probabilities(reference, eight_bit)[0].argmax(axis=0)
    saturated = expected_probabilities(
        reference, Image.new("RGB", eight_bit.size, (255, 255, 255)))[0].argmax(axis=0)
    got = np.asarray(Image.open(io.BytesIO(response.content)))
    assert (got != expected).mean() <= 0.002
    assert (expected != saturated).any(), "the test image must not look like a white one"


def test_exif_rotated_jpeg_is_answered_upright(server, reference):
    image = random_image(48, 24, seed=9)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif.tobytes())
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))).convert("RGB")
    assert upright.size == (24, 48)
    response = requests.post(server.url + "/invocations", data=buf.getvalue(),
                             headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert response.status_code == 200
    got = np.asarray(Image.open(io.BytesIO(response.content)))
    assert got.shape == (48, 24)
    expected = expected_probabilities(reference, upright)[0].argmax(axis=0)
    assert (got != expected).mean() <= 0.002


def test_v2_images_per_request_cap_and_binary_bytes(server):
    jpeg = encode(random_image(20, 16, seed=2))
    raw = b"".join(struct.pack("<I", len(jpeg)) + jpeg for _ in range(16))
    body, headers = _binary_request({"name": "image", "datatype": "BYTES", "shape": [16],
                                     "parameters": {"binary_data_size": len(raw)}}, raw)
    response = requests.post(server.url + V2, data=body, headers=headers, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["shape"] == [16, 16, 20]
    raw += struct.pack("<I", len(jpeg)) + jpeg
    body, headers = _binary_request({"name": "image", "datatype": "BYTES", "shape": [17],
                                     "parameters": {"binary_data_size": len(raw)}}, raw)
    response = requests.post(server.url + V2, data=body, headers=headers, timeout=60)
    assert response.status_code == 413
    assert "17 images" in response.json()["error"]
