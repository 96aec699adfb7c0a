"""The one place that opens model files.

- Hugging Face folders: config + safetensors weights + tokenizer must be there;
  pickle checkpoints are refused; ``trust_remote_code`` stays off unless asked.
- safetensors files: the header is parsed before use, so a truncated file is a
  clear error naming the file.
- ONNX: external data must be a relative path to a regular file inside the
  model folder (no ``..``, no symbolic or hard links, offset+length within the
  file) before the model is loaded (CVE-2022-25882, CVE-2024-27318), for every
  tensor: initializers, sparse initializers, tensor attributes (``Constant``),
  subgraphs and function bodies.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgeft.errors import ModelError

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model", "vocab.json")


def check_safetensors(path: str | Path) -> None:
    """Validate a safetensors file's header and that the data it declares is all there."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than its header")
            (n,) = struct.unpack("<Q", head)
            if n <= 0 or 8 + n > size or n > 100_000_000:
                raise ValueError("header length out of range")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError(f"truncated: {size} bytes, header declares {8 + n + end}")
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path} is not a valid safetensors file ({e})",
                         "re-create or re-download it; the file is truncated or corrupt") from None


def check_hf_folder(folder: str | Path, *, need_tokenizer: bool = True) -> Path:
    """Check a local Hugging Face model folder before loading it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"model folder {folder} not found", "pass a Hugging Face model folder, a hub id or minilm-l6")
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} has no config.json", "pass a Hugging Face model folder (config.json, model.safetensors, tokenizer)")
    try:
        json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{folder}/config.json is not valid JSON ({e})", "re-create the model folder") from None
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        if list(folder.glob("*.bin")) or list(folder.glob("*.pt")) or list(folder.glob("*.pth")):
            raise ModelError(f"{folder} has only pickle weights (.bin/.pt), which edgeft does not load",
                             "convert them to model.safetensors (model.save_pretrained(..., safe_serialization=True))")
        raise ModelError(f"{folder} has no model weights (model.safetensors)", "pass a folder holding the model's safetensors weights")
    for w in weights:
        check_safetensors(w)
    if need_tokenizer and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(f"{folder} has no tokenizer (tokenizer.json or vocab.txt)",
                         "save the tokenizer into the folder (tokenizer.save_pretrained(folder))")
    return folder


ORT_MEMORY_TAG = "_ORT_MEM_ADDR_"  # ORT reads "*/_ORT_MEM_ADDR_/*" locations from process memory
EXTERNAL_DATA_KEYS = ("location", "offset", "length", "checksum", "basepath")


def _walk_graph(graph, where: str, stack: list) -> Iterator[tuple[str, Any]]:
    """The tensors of one graph (initializers, sparse initializers, node attributes); queue its subgraphs."""
    for t in graph.initializer:
        yield f"initializer '{t.name}'{where}", t
    for s in graph.sparse_initializer:
        yield f"sparse initializer '{s.values.name}' (values){where}", s.values
        yield f"sparse initializer '{s.values.name}' (indices){where}", s.indices
    for node in graph.node:
        yield from _walk_node(node, where, stack)


def _walk_node(node, where: str, stack: list) -> Iterator[tuple[str, Any]]:
    for attr in node.attribute:
        yield from _walk_attribute(attr, f"attribute '{attr.name}' of node '{node.name or node.op_type}'", where, stack)


def _walk_attribute(attr, label: str, where: str, stack: list) -> Iterator[tuple[str, Any]]:
    # Every field is visited whatever attr.type says: a loader may read a field its type does not name.
    if attr.HasField("t"):
        yield f"{label}{where}", attr.t
    for t in attr.tensors:
        yield f"{label}{where}", t
    sparse = ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(attr.sparse_tensors)
    for s in sparse:
        yield f"{label} (sparse values){where}", s.values
        yield f"{label} (sparse indices){where}", s.indices
    inner = f" in the subgraph of {label}{where}"
    if attr.HasField("g"):
        stack.append((attr.g, inner))
    for g in attr.graphs:
        stack.append((g, inner))


def onnx_tensors(model) -> Iterator[tuple[str, Any]]:
    """Every TensorProto of ``model`` a loader may fill from external data, as (where it is, tensor):
    initializers and sparse initializers (values and indices), tensor and sparse-tensor attributes
    (``Constant`` ``value``/``sparse_value`` and any other), in the main graph, in subgraphs
    (If/Loop/Scan, recursively), in function bodies and their attribute defaults, and in training info.
    onnx's own ``_get_all_tensors`` skips the sparse ones."""
    stack: list = [(model.graph, "")]
    for f in model.functions:
        where = f" in function '{f.name}'"
        for node in f.node:
            yield from _walk_node(node, where, stack)
        for attr in f.attribute_proto:
            yield from _walk_attribute(attr, f"default of attribute '{attr.name}'", where, stack)
    for i, info in enumerate(model.training_info):
        stack.append((info.initialization, f" in training info {i} (initialization)"))
        stack.append((info.algorithm, f" in training info {i} (algorithm)"))
    while stack:  # a list, not recursion: a deeply nested crafted model cannot exhaust the Python stack
        graph, where = stack.pop()
        yield from _walk_graph(graph, where, stack)


def onnx_nodes(model) -> Iterator[Any]:
    """Every node of ``model``: main graph, subgraphs (recursively), function bodies, training info."""
    stack = [model.graph, *(g for info in model.training_info for g in (info.initialization, info.algorithm))]
    nodes = [n for f in model.functions for n in f.node]
    while nodes or stack:
        if not nodes:
            nodes = list(stack.pop().node)
            continue
        node = nodes.pop()
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                stack.append(attr.g)
            stack.extend(attr.graphs)


# Nodes that make ONNX Runtime open a file the node names (a compiled-EP cache): edgeft never writes them.
FILE_READING_OPS = ("EPContext",)


def _tensor_nbytes(tensor) -> int | None:
    """Bytes the tensor's dims and type call for, or None when that cannot be told."""
    import numpy as np
    from onnx import helper

    try:
        n = 1
        for d in tensor.dims:
            if d < 0:
                return None
            n *= int(d)
        dt = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        if dt.name in ("int4", "uint4", "float4_e2m1fn"):
            return (n + 1) // 2
        if dt == np.dtype(object) or dt.itemsize == 0:
            return None
        return n * dt.itemsize
    except Exception:  # unknown or undefined data type: the checker/loader will refuse it
        return None


def _external_problem(folder: Path, root: Path, tensor) -> tuple[str, str | None]:
    """(location, why it is refused or None) for one tensor that uses external data."""
    import onnx

    entries: dict[str, str] = {}
    for e in tensor.external_data:
        if e.key in entries:
            return entries.get("location", ""), f"names the key '{e.key}' twice"
        entries[e.key] = e.value
    loc = entries.get("location", "")
    unknown = sorted(set(entries) - set(EXTERNAL_DATA_KEYS))
    if unknown:
        return loc, f"has an unknown key '{unknown[0]}'"
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return loc, "carries external-data entries but is not marked external"
    if not loc or "\0" in loc or ORT_MEMORY_TAG in loc or not Path(loc).parts:
        return loc, "is empty or not a file name"
    if os.path.isabs(loc) or ".." in Path(loc).parts:
        return loc, "is absolute or climbs out with '..'"
    numbers = {}
    for key in ("offset", "length"):
        text = entries.get(key)
        if text is None:
            continue
        if not (text.isascii() and text.isdigit()):
            return loc, f"has {key} '{text}', not a whole number >= 0"
        numbers[key] = int(text)
    # Walk the location one component at a time with lstat: no component may be a link.
    current = folder
    try:
        for part in Path(loc).parts:
            current = current / part
            st = os.lstat(current)
            if stat.S_ISLNK(st.st_mode):
                return loc, "is or passes through a symbolic link"
    except OSError as e:
        return loc, f"cannot be opened in the model folder ({e.strerror or type(e).__name__})"
    if not stat.S_ISREG(st.st_mode):
        return loc, "is not a regular file in the model folder"
    if not current.resolve().is_relative_to(root):
        return loc, "resolves outside the model folder"
    if st.st_nlink > 1:
        return loc, (f"is a hard link ({st.st_nlink} names for one file; it may be a file outside the folder); "
                     "edgeft never writes hard links")
    offset, size = numbers.get("offset", 0), st.st_size
    need = max(numbers.get("length", 0), _tensor_nbytes(tensor) or 0)
    if offset > size or offset + need > size:
        return loc, f"declares data past the end of the file (offset {offset} + {need} bytes > {size})"
    return loc, None


def check_onnx_external_data(model_path: str | Path) -> None:
    """Refuse external-data references that leave the model folder, pass through links, point at
    hard links or at data past the end of the file, for every tensor in the model (see
    :func:`onnx_tensors`). Call before anything (onnx.load with data, the checker, ONNX Runtime)
    reads the model's data."""
    import onnx

    model_path = Path(model_path)
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise ModelError(f"{model_path} is not a valid ONNX file ({type(e).__name__})",
                         "re-export it; the file is truncated or corrupt") from None
    folder = model_path.parent
    root = folder.resolve()
    for node in onnx_nodes(model):
        if node.op_type in FILE_READING_OPS:
            raise ModelError(f"{model_path}: node '{node.name}' is an {node.op_type} node, which makes ONNX Runtime "
                             "read a file it names; refusing to load it", "pass a plain ONNX model (edgeft export)")
    for where, tensor in onnx_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL and not len(tensor.external_data):
            continue
        loc, bad = _external_problem(folder, root, tensor)
        if bad:
            raise ModelError(f"{model_path}: external data '{loc}' of {where} {bad}; refusing to load it",
                             "keep external data files inside the model folder, as regular files")


# Fused ops ONNX Runtime registers in the default ONNX domain (onnxruntime-genai's graphs use them).
ORT_DEFAULT_DOMAIN_OPS = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization")


def load_onnx_checked(model_path: str | Path, *, full_check: bool = False):
    """Load an ONNX model after the external-data check; run the checker."""
    import onnx

    check_onnx_external_data(model_path)
    try:
        onnx.checker.check_model(str(model_path), full_check=full_check)
        return onnx.load(str(model_path))
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        if any(f"No Op registered for {op} with domain_version" in first for op in ORT_DEFAULT_DOMAIN_OPS):
            # ONNX Runtime registers these fused ops in the default domain; the checker does not know them,
            # and the ORT session that loads the model next checks it instead
            return onnx.load(str(model_path))
        raise ModelError(f"{model_path} fails the ONNX checker ({str(e).splitlines()[0][:200]})",
                         "re-export the model") from None


def load_fast_tokenizer(folder: str | Path):
    """``folder/tokenizer.json`` with the ``tokenizers`` library (no transformers import: servers start
    fast), padding and truncation off; a missing or unreadable file is one ModelError."""
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise ModelError(f"{path} not found: the bundle has no fast tokenizer", "re-ship the bundle with edgeft ship")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises plain Exceptions for bad files
        raise ModelError(f"cannot read {path} ({' '.join(str(e).split())[:200]})", "re-ship the bundle") from None
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer
