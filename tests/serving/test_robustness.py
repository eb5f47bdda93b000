"""A bounded storm of good and bad requests, 8 at a time: no 5xx, no crash, every good answer
correct."""
from __future__ import annotations

import io
import os
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from serving_support import MAX_REQUEST_BYTES, encode, expected_probabilities, random_image
from test_server import png_header_claiming

REQUESTS = 300
CONCURRENCY = 8


def _cases(reference):
    """(kind, body, content type, accept, expected status, expected mask or None)."""
    good = []
    for seed, (w, h) in enumerate([(40, 32), (40, 32), (24, 48), (130, 70)]):
        jpeg = encode(random_image(w, h, seed=10 + seed))
        probs = expected_probabilities(reference, Image.open(io.BytesIO(jpeg)).convert("RGB"))
        good.append((jpeg, probs[0].argmax(axis=0)))
    png = encode(random_image(32, 32, seed=20), "PNG")
    png_mask = expected_probabilities(reference, Image.open(io.BytesIO(png)).convert("RGB"))[0] \
        .argmax(axis=0)
    jpeg = good[0][0]
    cases = [("good-jpeg", body, "image/jpeg", "image/png", 200, mask) for body, mask in good]
    cases += [
        ("good-png", png, "image/png", "image/png", 200, png_mask),
        ("good-protobuf", jpeg, "image/jpeg", "application/x-recordio-protobuf", 200, good[0][1]),
        ("random-bytes", os.urandom(2048), "image/jpeg", "image/png", 400, None),
        ("truncated-jpeg", jpeg[: len(jpeg) // 2], "image/jpeg", "image/png", 400, None),
        ("zero-bytes", b"", "image/png", "image/png", 400, None),
        ("huge-header", png_header_claiming(60000, 60000), "image/png", "image/png", 413, None),
        ("bomb-header", png_header_claiming(1 << 20, 1 << 20), "image/png", "image/png", 413,
         None),
        ("too-long", b"\xff" * (MAX_REQUEST_BYTES + 10), "image/jpeg", "image/png", 413, None),
        ("wrong-type", jpeg, "text/plain", "image/png", 415, None),
        ("no-type", jpeg, None, "image/png", 415, None),
        ("wrong-accept", jpeg, "image/jpeg", "text/html", 406, None),
    ]
    return cases


def _send(server, case):
    kind, body, content_type, accept, status, mask = case
    headers = {"Accept": accept}
    if content_type:
        headers["Content-Type"] = content_type
    response = requests.post(server.url + "/invocations", data=body, headers=headers,
                             timeout=120)
    return case, response.status_code, response.headers.get("content-type", ""), \
        response.content


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_storm_of_good_and_bad_requests(server, reference):
    from kubeseg.serving.codecs import decode_probabilities_recordio

    cases = _cases(reference)
    rng = random.Random(0)
    plan = [rng.choice(cases) for _ in range(REQUESTS)]
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        answers = list(pool.map(lambda c: _send(server, c), plan))
    statuses = [status for _, status, _, _ in answers]
    assert not [s for s in statuses if s >= 500], "5xx answers"
    good = 0
    for (kind, _, _, accept, expected_status, mask), status, content_type, content in answers:
        assert status == expected_status, (kind, status, content[:200])
        if status != 200:
            assert content_type == "application/json", kind
            continue
        good += 1
        if accept == "image/png":
            got = np.asarray(Image.open(io.BytesIO(content)))
        else:
            got = decode_probabilities_recordio(content)[0].argmax(axis=0)
        assert got.shape == mask.shape, kind
        # batched forward passes may round differently from the reference in the last bits;
        # a class flip is allowed only where two classes are tied to that precision
        assert (got != mask).mean() <= 0.002, (kind, (got != mask).mean())
    assert good >= REQUESTS // 4
    assert server.alive()
    assert requests.get(server.url + "/ping", timeout=10).status_code == 200
