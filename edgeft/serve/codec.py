"""KServe V2 / Open Inference Protocol request parsing and response encoding.

Covers the JSON form, the binary tensor data extension (``Inference-Header-Content-Length``,
``parameters.binary_data_size``, BYTES elements as 4-byte little-endian length + bytes,
``binary_data`` / ``binary_data_output`` for outputs) and the classification extension
(``parameters.classification: k`` -> BYTES ``"score:index:label"``), as Triton implements them.
Every problem raises :class:`CodecError` with a message for a 400 answer.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import numpy as np

OUTPUT_NAMES = ("logits", "label")
INPUT_NAME = "text"


class CodecError(ValueError):
    """The request is malformed: HTTP 400 with this message."""


@dataclass
class OutputSpec:
    name: str
    binary: bool = False
    classification: int = 0


@dataclass
class InferRequest:
    texts: list[str]
    shape: list[int]
    id: str | None = None
    outputs: list[OutputSpec] = field(default_factory=list)


def _loads(raw: bytes, what: str):
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise CodecError(f"{what} is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise CodecError(f"{what} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise CodecError(f"{what} is nested too deeply") from None


def check_text(s: str, i: int) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise CodecError(f"text item {i} is not valid Unicode (a lone surrogate escape such as \\ud800)") from None
    return s


def decode_bytes_tensor(buf: bytes, count: int) -> list[str]:
    """BYTES elements framed as 4-byte little-endian length + bytes; exactly ``count`` and no bytes left."""
    out, pos = [], 0
    for i in range(count):
        if pos + 4 > len(buf):
            raise CodecError(f"binary data for input '{INPUT_NAME}' ends inside the length prefix of element {i}")
        (n,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if pos + n > len(buf):
            raise CodecError(f"binary element {i} of input '{INPUT_NAME}' claims {n} bytes but only "
                             f"{len(buf) - pos} remain")
        try:
            out.append(buf[pos:pos + n].decode("utf-8"))
        except UnicodeDecodeError:
            raise CodecError(f"binary element {i} of input '{INPUT_NAME}' is not UTF-8 text") from None
        pos += n
    if pos != len(buf):
        raise CodecError(f"binary data for input '{INPUT_NAME}' has {len(buf) - pos} bytes after its {count} elements")
    return out


def encode_bytes_tensor(items: list[str]) -> bytes:
    parts = []
    for s in items:
        b = s.encode("utf-8")
        parts.append(struct.pack("<I", len(b)) + b)
    return b"".join(parts)


def _shape(value, max_items: int) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise CodecError(f"input '{INPUT_NAME}' shape must be a list of integers, got {json.dumps(value)[:80]}")
    if not (len(value) == 1 or (len(value) == 2 and value[1] == 1)):
        raise CodecError(f"input '{INPUT_NAME}' shape must be [N] or [N, 1], got {value}")
    if value[0] < 1:
        raise CodecError(f"input '{INPUT_NAME}' shape {value} holds no text; send at least one")
    if value[0] > max_items:
        raise TooManyItems(f"{value[0]} texts in one request; the limit is {max_items} (max_items): split the request")
    return value


class TooManyItems(CodecError):
    """More texts than max_items: HTTP 413."""


def parse_infer(body: bytes, header_length: str | None, *, max_items: int) -> InferRequest:
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise CodecError("Inference-Header-Content-Length is not an integer") from None
        if not 0 < n <= len(body):
            raise CodecError(f"Inference-Header-Content-Length {n} does not fit a {len(body)}-byte body")
        head, binary = body[:n], body[n:]
    else:
        head, binary = body, b""
    req = _loads(head, "the request body" if header_length is None else "the JSON header")
    if not isinstance(req, dict):
        raise CodecError("the request must be a JSON object with an 'inputs' list")
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise CodecError(f"'inputs' must be a list with exactly one tensor named '{INPUT_NAME}'")
    inp = inputs[0]
    if inp.get("name") != INPUT_NAME:
        raise CodecError(f"unknown input {str(inp.get('name'))[:64]!r}; this model takes one BYTES input '{INPUT_NAME}'")
    if inp.get("datatype") != "BYTES":
        raise CodecError(f"input '{INPUT_NAME}' must have datatype BYTES, got {str(inp.get('datatype'))[:32]!r}")
    shape = _shape(inp.get("shape"), max_items)
    count = shape[0]
    params = inp.get("parameters") or {}
    if not isinstance(params, dict):
        raise CodecError(f"input '{INPUT_NAME}' parameters must be an object")
    if "shared_memory_region" in params:
        raise CodecError("shared memory inputs are not supported by this server; send the data in the request")
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise CodecError("binary_data_size must be a non-negative integer")
        if size != len(binary):
            raise CodecError(f"binary_data_size {size} does not match the {len(binary)} bytes after the JSON header")
        if "data" in inp:
            raise CodecError(f"input '{INPUT_NAME}' has both 'data' and binary_data_size; send one")
        texts = decode_bytes_tensor(binary, count)
    else:
        if binary:
            raise CodecError("the body has binary data but no input declares binary_data_size")
        data = inp.get("data")
        if not isinstance(data, list):
            raise CodecError(f"input '{INPUT_NAME}' needs 'data': a list of strings")
        if len(shape) == 2 and all(isinstance(x, list) for x in data):
            data = [x[0] if len(x) == 1 else x for x in data]
        if len(data) != count:
            raise CodecError(f"input '{INPUT_NAME}' shape {shape} says {count} texts but data has {len(data)}")
        for i, x in enumerate(data):
            if not isinstance(x, str):
                raise CodecError(f"text item {i} is {type(x).__name__}, not a string")
        texts = [check_text(x, i) for i, x in enumerate(data)]
    rp = req.get("parameters") or {}
    if not isinstance(rp, dict):
        raise CodecError("'parameters' must be an object")
    binary_default = rp.get("binary_data_output") is True
    outputs = []
    raw_outputs = req.get("outputs")
    if raw_outputs is None:
        outputs = [OutputSpec(n, binary_default) for n in OUTPUT_NAMES]
    else:
        if not isinstance(raw_outputs, list) or not raw_outputs:
            raise CodecError("'outputs' must be a non-empty list of {name, parameters}")
        for o in raw_outputs:
            name = o.get("name") if isinstance(o, dict) else None
            if name not in OUTPUT_NAMES:
                raise CodecError(f"unknown output {str(name)[:64]!r}; outputs are {', '.join(OUTPUT_NAMES)}")
            op = o.get("parameters") or {}
            if not isinstance(op, dict):
                raise CodecError(f"output '{name}' parameters must be an object")
            k = op.get("classification", 0)
            if not isinstance(k, int) or isinstance(k, bool) or k < 0:
                raise CodecError(f"output '{name}' classification must be a positive integer")
            if k and name != "logits":
                raise CodecError("the classification extension applies to the 'logits' output")
            b = op.get("binary_data", binary_default)
            outputs.append(OutputSpec(name, bool(b), k))
    rid = req.get("id")
    return InferRequest(texts, shape, rid if isinstance(rid, str) else None, outputs)


def _classes(row: np.ndarray, k: int, labels: list[str]) -> list[str]:
    order = np.argsort(-row, kind="stable")[:k]
    return [f"{row[j]:f}:{j}:{labels[j]}" for j in order]


def encode_infer(req: InferRequest, logits: np.ndarray, labels: list[str], *, model: str, version: str,
                 parameters: dict | None = None) -> tuple[bytes, dict[str, str]]:
    """(body, extra headers) for the answer; binary when any requested output asks for it."""
    n = logits.shape[0]
    out_json, blobs = [], []
    for spec in req.outputs:
        if spec.name == "logits" and spec.classification:
            k = min(spec.classification, logits.shape[1])
            items = [s for row in logits for s in _classes(row, k, labels)]
            entry = {"name": "logits", "datatype": "BYTES", "shape": [n, k]}
            value = items
        elif spec.name == "logits":
            entry = {"name": "logits", "datatype": "FP32", "shape": [n, int(logits.shape[1])]}
            value = logits.astype(np.float32)
        else:
            entry = {"name": "label", "datatype": "BYTES", "shape": [n]}
            value = [labels[int(j)] for j in logits.argmax(-1)]
        if spec.binary:
            blob = value.astype("<f4").tobytes() if isinstance(value, np.ndarray) else encode_bytes_tensor(value)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = [float(x) for x in value.ravel()] if isinstance(value, np.ndarray) else value
        out_json.append(entry)
    resp = {"model_name": model, "model_version": version, "outputs": out_json}
    if req.id is not None:
        resp["id"] = req.id
    if parameters:
        resp["parameters"] = parameters
    head = json.dumps(resp, ensure_ascii=False).encode("utf-8")
    if not blobs:
        return head, {"content-type": "application/json"}
    return head + b"".join(blobs), {"content-type": "application/octet-stream",
                                    "inference-header-content-length": str(len(head))}
