"""KServe's Open Inference Protocol v2 for one segmentation model: parsing a request and
encoding a response, as pure functions (no app, no model).

A request carries one image input (named ``image``, else the first): BYTES, one encoded
JPEG/PNG per element, or UINT8 ``[H, W, 3]`` / ``[N, H, W, 3]`` pixels, each given in the JSON
``data`` or as binary data after the JSON part (``parameters.binary_data_size``, the JSON part's
length in the ``Inference-Header-Content-Length`` header). It may ask for outputs ``mask``
(UINT8 ``[N, H, W]``) and ``probabilities`` (FP32 ``[N, C, H, W]``), each in JSON or as binary
data. Every malformed part is refused with a :class:`kubeseg.serving.codecs.RequestError` (400)
whose message names the field, e.g. ``inputs[0].parameters.binary_data_size``.
"""
from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from kubeseg.serving import codecs

OUTPUTS = ("mask", "probabilities")


def _json_type(value) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _object(value, field: str) -> dict:
    """``value`` if it is a JSON object (or absent: ``{}``); else a 400 naming ``field``."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise codecs.RequestError(f"{field} must be a JSON object, not {_json_type(value)}")
    return value


def _count(value, field: str) -> int:
    """A non-negative JSON integer (not a boolean), or a 400 naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        shown = repr(value)[:60] if isinstance(value, (int, float, str)) else _json_type(value)
        raise codecs.RequestError(f"{field} must be a non-negative integer, not {shown}")
    return value


def _flatten(value, field: str, out: list) -> list:
    """The leaves of a nested JSON array, row-major."""
    stack = [(value, field)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed([(v, f"{where}[{i}]") for i, v in enumerate(item)]))
        else:
            out.append((item, where))
    return out


def _bytes_elements(data, field: str) -> list:
    """BYTES elements given in JSON: strings, each character one byte (Latin-1)."""
    if data is None:
        raise codecs.RequestError(f"{field} is missing: give the BYTES elements as strings, or "
                                  "send them as binary data (parameters.binary_data_size)")
    items = []
    for value, where in _flatten(data, field, []):
        if not isinstance(value, str):
            raise codecs.RequestError(f"{where} is {_json_type(value)}; BYTES elements are "
                                      "strings (one character per byte, Latin-1)")
        try:
            items.append(value.encode("latin-1"))
        except UnicodeEncodeError as exc:
            raise codecs.RequestError(
                f"{where} has a character outside Latin-1 at position {exc.start}: BYTES "
                "elements hold one byte per character (send encoded images as binary data)") \
                from None
    return items


def _uint8_elements(data, field: str):
    """UINT8 values given in JSON, as a flat uint8 array."""
    import numpy as np

    if data is None:
        raise codecs.RequestError(f"{field} is missing: give the UINT8 values 0..255, or send "
                                  "them as binary data (parameters.binary_data_size)")
    values = _flatten(data, field, [])
    for value, where in values:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
            shown = (repr(value)[:60] if isinstance(value, (int, float, str))
                     else _json_type(value))
            raise codecs.RequestError(f"{where} is {shown}; UINT8 values are integers 0..255")
    return np.fromiter((v for v, _ in values), dtype=np.uint8, count=len(values))


def images_of(name: str, datatype: str, array, *,
              max_images: Optional[int] = None) -> Tuple[list, str]:
    """Images of one v2 input: (items, "encoded" | "pixels")."""
    import numpy as np

    field = f"input '{name}'"
    if datatype == "BYTES":
        items = [v if isinstance(v, bytes) else str(v).encode("latin-1")
                 for v in np.asarray(array, dtype=object).reshape(-1)]
        kind = "encoded"
    elif datatype == "UINT8":
        pixels = np.asarray(array, dtype=np.uint8)
        if pixels.ndim == 3:
            pixels = pixels[None]
        if pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise codecs.RequestError(f"{field} UINT8 has shape {list(pixels.shape)}; "
                                      "expected [H, W, 3] or [N, H, W, 3]")
        if pixels.shape[0] and (pixels.shape[1] < 1 or pixels.shape[2] < 1):
            raise codecs.RequestError(f"{field} has shape {list(pixels.shape)}: an image of "
                                      f"{pixels.shape[2]}x{pixels.shape[1]} pixels has no "
                                      "pixels")
        items, kind = list(pixels), "pixels"
    else:
        raise codecs.RequestError(f"{field} has datatype {datatype!r}; send BYTES "
                                  "(encoded JPEG/PNG) or UINT8 pixels [H, W, 3]")
    if not items:
        raise codecs.RequestError(f"{field} is empty: it holds no image")
    if max_images is not None and len(items) > max_images:
        raise codecs.PayloadTooLarge(f"{field} holds {len(items)} images; one request may "
                                     f"carry at most {max_images} (server option "
                                     "--max-images-per-request): split the request")
    return items, kind


def _deserialize_bytes(raw: bytes, field: str = "binary BYTES tensor data") -> list:
    """The v2 binary BYTES layout: each element is a uint32 little-endian length, then bytes."""
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise codecs.RequestError(f"{field} ends inside a length prefix")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise codecs.RequestError(f"{field} is shorter than its lengths say")
        items.append(raw[offset:offset + length])
        offset += length
    return items


@dataclass(frozen=True)
class V2Request:
    """A parsed v2 inference request: its image input, the outputs asked for (name, binary flag
    or None), the default of ``parameters.binary_data_output`` and the request's id."""

    image: Tuple[str, str, Any]  # (name, datatype, array)
    outputs: List[Tuple[str, Optional[bool]]]
    binary_default: bool
    request_id: Optional[str]

    def requested(self) -> List[str]:
        return [name for name, _ in self.outputs] or ["mask"]

    def binary(self) -> Dict[str, bool]:
        """Whether each output is sent as binary data (its own flag, else the default)."""
        return {name: (flag if flag is not None else self.binary_default)
                for name, flag in (self.outputs or [("mask", None)])}


def _json_part(body: bytes, header_length: Optional[str]) -> Tuple[dict, int]:
    """The request's JSON object and its byte length (``Inference-Header-Content-Length``)."""
    import orjson

    json_length = len(body)
    if header_length is not None:
        text = header_length.strip()
        if not text.isdigit() or int(text) > len(body):
            raise codecs.RequestError(
                f"header Inference-Header-Content-Length is {header_length!r}: it must be the "
                f"byte length of the JSON part, at most the body's {len(body)} bytes")
        json_length = int(text)
    try:
        request = orjson.loads(body[:json_length])
    except orjson.JSONDecodeError as exc:
        raise codecs.RequestError(f"the v2 inference request is not valid JSON ({exc})") \
            from None
    if not isinstance(request, dict):
        raise codecs.RequestError(f"the v2 inference request must be a JSON object, not "
                                  f"{_json_type(request)}")
    return request, json_length


def _input_header(entry, where: str) -> Tuple[str, str, list, dict]:
    """``(name, datatype, shape, parameters)`` of one v2 input, each checked."""
    if not isinstance(entry, dict):
        raise codecs.RequestError(f"{where} must be a JSON object, not {_json_type(entry)}")
    name = entry.get("name", "image")
    if not isinstance(name, str) or not name:
        raise codecs.RequestError(f"{where}.name must be a non-empty string")
    datatype = entry.get("datatype")
    if not isinstance(datatype, str):
        raise codecs.RequestError(f"{where}.datatype must be a string such as \"BYTES\" or "
                                  f"\"UINT8\", not {_json_type(datatype)}")
    shape = entry.get("shape", [])
    if not isinstance(shape, list):
        raise codecs.RequestError(f"{where}.shape must be an array of integers, not "
                                  f"{_json_type(shape)}")
    shape = [_count(v, f"{where}.shape[{i}]") for i, v in enumerate(shape)]
    return name, datatype, shape, _object(entry.get("parameters"), f"{where}.parameters")


def _input_array(entry: dict, where: str, binary: bytes, offset: int) -> Tuple[Any, int]:
    """One v2 input's data (from the binary part after ``offset``, or from its JSON ``data``)
    and the offset after it."""
    import numpy as np

    name, datatype, shape, parameters = _input_header(entry, where)
    size = parameters.get("binary_data_size")
    if size is not None:
        size = _count(size, f"{where}.parameters.binary_data_size")
        if offset + size > len(binary):
            raise codecs.RequestError(
                f"{where}.parameters.binary_data_size is {size} but only "
                f"{len(binary) - offset} bytes of binary data follow the JSON")
        raw = binary[offset:offset + size]
        offset += size
        array = (_deserialize_bytes(raw, f"{where} binary BYTES data") if datatype == "BYTES"
                 else np.frombuffer(raw, dtype=np.uint8) if datatype == "UINT8" else raw)
    elif datatype == "BYTES":
        array = _bytes_elements(entry.get("data"), f"{where}.data")
    elif datatype == "UINT8":
        array = _uint8_elements(entry.get("data"), f"{where}.data")
    else:
        array = entry.get("data")
    if datatype == "UINT8":
        try:
            array = np.asarray(array, dtype=np.uint8).reshape(shape)
        except ValueError:
            raise codecs.RequestError(f"{where}: {np.size(array)} UINT8 values do not fit "
                                      f"{where}.shape {shape}") from None
    return (name, datatype, array), offset


def _image_input(inputs, binary: bytes) -> Tuple[str, str, Any]:
    """The input named ``image`` (else the first); every input is checked."""
    if not inputs or not isinstance(inputs, list):
        raise codecs.RequestError("the request has no inputs: send input 'image' (BYTES with "
                                  "encoded JPEG/PNG, or UINT8 [H, W, 3] pixels)")
    offset, chosen = 0, None
    for index, entry in enumerate(inputs):
        tensor, offset = _input_array(entry, f"inputs[{index}]", binary, offset)
        if chosen is None or tensor[0] == "image":
            chosen = tensor
    return chosen


def _requested_outputs(outputs_given) -> List[Tuple[str, Optional[bool]]]:
    """``[(name, binary_data flag or None)]`` of the request's ``outputs``."""
    if outputs_given is not None and not isinstance(outputs_given, list):
        raise codecs.RequestError(f"outputs must be an array, not {_json_type(outputs_given)}")
    outputs = []
    for index, entry in enumerate(outputs_given or []):
        where = f"outputs[{index}]"
        if not isinstance(entry, dict):
            raise codecs.RequestError(f"{where} must be a JSON object, not {_json_type(entry)}")
        name = entry.get("name")
        if name not in OUTPUTS:
            raise codecs.RequestError(f"{where}.name is {name!r}: this model has outputs "
                                      "'mask' and 'probabilities'")
        flag = _object(entry.get("parameters"), f"{where}.parameters").get("binary_data")
        if flag is not None and not isinstance(flag, bool):
            raise codecs.RequestError(f"{where}.parameters.binary_data must be true or false")
        outputs.append((name, flag))
    return outputs


def parse_request(body: bytes, header_length: Optional[str]) -> V2Request:
    """The image input, requested outputs, binary default and id of a v2 request.

    Every malformed part is refused with a :class:`codecs.RequestError` (400) naming the field.
    """
    request, json_length = _json_part(body, header_length)
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise codecs.RequestError(f"id must be a string, not {_json_type(request_id)}")
    request_parameters = _object(request.get("parameters"), "parameters")
    image = _image_input(request.get("inputs"), body[json_length:])
    outputs = _requested_outputs(request.get("outputs"))
    binary_default = request_parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise codecs.RequestError("parameters.binary_data_output must be true or false")
    return V2Request(image, outputs, binary_default, request_id)


def stack_outputs(predictions: Sequence, requested: Sequence[str]) -> List[Tuple[str, str, Any]]:
    """``[(output name, datatype, array)]`` of one request's predictions (each a
    :class:`kubeseg.serving.predictor.Prediction`), in the order requested."""
    import numpy as np

    sizes = {p.mask.shape for p in predictions}
    if len(sizes) > 1:
        raise codecs.RequestError(f"the images of one request must share a size; got "
                                  f"{sorted(sizes)}")
    outputs = []
    for output in requested:
        if output == "mask":
            outputs.append(("mask", "UINT8", np.stack([p.mask for p in predictions])))
        else:
            outputs.append(("probabilities", "FP32",
                            np.concatenate([p.probabilities for p in predictions])))
    return outputs


def encode_response(model_name: str, request_id, outputs) -> Tuple[bytes, Optional[int]]:
    """v2 JSON response, binary outputs appended (``Inference-Header-Content-Length``)."""
    import orjson

    described, raw = [], []
    for name, datatype, array, binary in outputs:
        entry = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            data = array.tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            raw.append(data)
        else:
            entry["data"] = array.reshape(-1)
        described.append(entry)
    head = orjson.dumps({"id": request_id or str(uuid.uuid4()), "model_name": model_name,
                         "outputs": described}, option=orjson.OPT_SERIALIZE_NUMPY)
    if raw:
        return head + b"".join(raw), len(head)
    return head, None


__all__ = ["OUTPUTS", "V2Request", "parse_request", "images_of", "stack_outputs",
           "encode_response"]
