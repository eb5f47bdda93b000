"""Codecs: RecordIO-protobuf read by the SageMaker SDK, PNG masks, JSON, content negotiation."""
from __future__ import annotations

import io
import json
import os
import struct

import numpy as np
import pytest
from PIL import Image

from kubeseg.serving import codecs

os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")


def _probabilities(c=3, h=5, w=7, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(1, c, h, w)).astype(np.float32)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def test_recordio_is_read_by_sagemaker_sdk():
    from sagemaker.amazon.common import read_records

    probs = _probabilities()
    data = codecs.encode_probabilities_recordio(probs)
    assert struct.unpack_from("<I", data)[0] == 0xCED7230A
    assert len(data) % 4 == 0
    records = read_records(io.BytesIO(data))
    assert len(records) == 1
    features = records[0].features
    assert list(features["shape"].int32_tensor.values) == [1, 3, 5, 7]
    target = np.array(features["target"].float32_tensor.values, dtype=np.float32)
    np.testing.assert_array_equal(target, probs.reshape(-1))  # class-major, exact floats


def test_record_payload_parses_with_generated_protobuf_class():
    from sagemaker.amazon.record_pb2 import Record

    probs = _probabilities(c=2, h=1, w=3)
    record = Record()
    record.ParseFromString(codecs.encode_probabilities_record(probs))
    assert set(record.features) == {"shape", "target"}
    assert record.features["target"].WhichOneof("value") == "float32_tensor"
    assert record.features["shape"].WhichOneof("value") == "int32_tensor"


def test_own_decoder_reads_sagemaker_encoded_record():
    from sagemaker.amazon.record_pb2 import Record
    from sagemaker.amazon.common import _write_recordio

    probs = _probabilities(c=4, h=3, w=2, seed=1)
    record = Record()
    record.features["shape"].int32_tensor.values.extend(probs.shape)
    record.features["target"].float32_tensor.values.extend(probs.reshape(-1).tolist())
    buf = io.BytesIO()
    _write_recordio(buf, record.SerializeToString())
    np.testing.assert_array_equal(codecs.decode_probabilities_recordio(buf.getvalue()), probs)
    np.testing.assert_array_equal(
        codecs.decode_probabilities_recordio(codecs.encode_probabilities_recordio(probs)), probs)


def test_recordio_decoder_rejects_bad_magic():
    from kubeseg.errors import DataError

    with pytest.raises(DataError, match="magic"):
        codecs.decode_probabilities_recordio(b"\0" * 16)


def test_png_mask_round_trip():
    mask = np.random.default_rng(0).integers(0, 21, size=(9, 13)).astype(np.uint8)
    data = codecs.encode_png_mask(mask)
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "L" and image.size == (13, 9)
    np.testing.assert_array_equal(codecs.decode_png_mask(data), mask)


def test_json_encodings():
    mask = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    body = json.loads(codecs.encode_json_mask(mask, ["a", "b", "c"]))
    assert body == {"shape": [2, 2], "class_names": ["a", "b", "c"], "mask": [[0, 1], [2, 1]]}
    probs = _probabilities(c=2, h=2, w=2)
    body = json.loads(codecs.encode_json_probabilities(probs, ["a", "b"]))
    assert body["shape"] == [1, 2, 2, 2]
    np.testing.assert_allclose(np.array(body["probabilities"]), probs[0], rtol=1e-6)


@pytest.mark.parametrize("header, expected", [
    (None, "image/png"), ("*/*", "image/png"), ("image/*", "image/png"),
    ("application/x-recordio-protobuf", "application/x-recordio-protobuf"),
    ("application/x-protobuf", "application/x-protobuf"),
    ("text/html;q=0.9, application/json", "application/json"),
    ("application/json;q=0.2, image/png;q=0.8", "image/png"),
])
def test_accept_negotiation(header, expected):
    assert codecs.choose_response_type(header).type == expected


def test_unsupported_accept_and_content_type():
    with pytest.raises(codecs.NotAcceptable, match="text/html") as err:
        codecs.choose_response_type("text/html")
    assert err.value.status == 406
    with pytest.raises(codecs.UnsupportedMediaType, match="image/jpeg") as err:
        codecs.check_content_type("text/plain")
    assert err.value.status == 415
    assert codecs.check_content_type("image/JPEG; charset=binary") == "image/jpeg"
    probabilities = codecs.choose_response_type("application/json; output=probabilities")
    assert codecs.wants_probabilities(probabilities)
    assert not codecs.wants_probabilities(codecs.choose_response_type("application/json"))


def png_header_claiming(width, height):
    """A PNG whose header claims ``width`` x ``height`` pixels, followed by a few bytes of data."""
    import zlib

    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)))


@pytest.mark.parametrize("side", [5_000, 100_000])  # under and over Pillow's own bomb limit
def test_decode_refuses_huge_header_before_decoding(side):
    with pytest.raises(codecs.PayloadTooLarge, match="--max-image-pixels") as err:
        codecs.decode_image(png_header_claiming(side, side), max_image_pixels=10**6)
    assert err.value.status == 413


@pytest.mark.parametrize("data", [b"", b"\0" * 100, os.urandom(500)])
def test_decode_garbage_is_400(data):
    with pytest.raises(codecs.RequestError) as err:
        codecs.decode_image(data, max_image_pixels=10**6)
    assert err.value.status == 400


def test_decode_truncated_jpeg_is_400():
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, format="JPEG")
    data = buf.getvalue()
    with pytest.raises(codecs.RequestError) as err:
        codecs.decode_image(data[: len(data) // 3], max_image_pixels=10**6)
    assert err.value.status == 400
    image = codecs.decode_image(data, max_image_pixels=10**6)
    assert image.mode == "RGB" and image.size == (40, 30)
