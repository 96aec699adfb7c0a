"""The one place that opens model files.

- Hugging Face folders: config + safetensors weights + tokenizer must be there;
  pickle checkpoints are refused; ``trust_remote_code`` stays off unless asked.
- safetensors files: the header is parsed before use, so a truncated file is a
  clear error naming the file.
- ONNX: external data must be a relative path to a regular file inside the
  model folder (no ``..``, no links, offset+length within the file) before the
  model is loaded (CVE-2022-25882, CVE-2024-27318).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

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


def check_onnx_external_data(model_path: str | Path) -> None:
    """Refuse external-data references that leave the model folder or point at links."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors

    model_path = Path(model_path)
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise ModelError(f"{model_path} is not a valid ONNX file ({type(e).__name__})",
                         "re-export it; the file is truncated or corrupt") from None
    root = model_path.parent.resolve()
    for tensor in _get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = ExternalDataInfo(tensor)
        loc = info.location
        bad = None
        if not loc or os.path.isabs(loc) or ".." in Path(loc).parts:
            bad = "is absolute or climbs out with '..'"
        else:
            target = model_path.parent / loc
            if target.is_symlink():
                bad = "is a symbolic link"
            elif not target.resolve().is_relative_to(root):
                bad = "resolves outside the model folder"
            elif not target.is_file():
                bad = "is not a regular file in the model folder"
            elif os.stat(target).st_nlink > 1:
                bad = "is a hard link"
            else:
                offset, length = int(info.offset or 0), info.length
                if length is not None and offset + int(length) > target.stat().st_size:
                    bad = "declares data past the end of the file"
        if bad:
            raise ModelError(f"{model_path}: external data '{loc}' of tensor '{tensor.name}' {bad}; refusing to load it",
                             "keep external data files inside the model folder")


def load_onnx_checked(model_path: str | Path, *, full_check: bool = False):
    """Load an ONNX model after the external-data check; run the checker."""
    import onnx

    check_onnx_external_data(model_path)
    try:
        onnx.checker.check_model(str(model_path), full_check=full_check)
        return onnx.load(str(model_path))
    except Exception as e:
        raise ModelError(f"{model_path} fails the ONNX checker ({str(e).splitlines()[0][:200]})",
                         "re-export the model") from None
