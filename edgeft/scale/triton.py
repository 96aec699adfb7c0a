"""`edgeft ship --triton`: a Triton Inference Server model repository inside the bundle, and its offline check.

``triton_part`` (a ship part, run after the default ones) writes ``triton/`` so that a stock
``tritonserver --model-repository BUNDLE/triton`` serves the bundle's model under the same KServe V2
API as ``edgeft serve``: model NAME, input ``text`` BYTES [N], outputs ``logits`` FP32 [N, C] and
``label`` BYTES [N]. Layout (NAME = the bundle's name, V = its Triton version)::

    triton/README.md                      how to run it, and where it differs from `edgeft serve`
    triton/NAME/config.pbtxt              ensemble (platform "ensemble", max_batch_size 0): the V2 API
    triton/NAME/V/README.txt              an ensemble has no model file, but Triton needs the folder
    triton/NAME_tokenizer/config.pbtxt    Python backend, max_batch_size 0: text [N] -> input_ids etc. [N, L]
    triton/NAME_tokenizer/V/model.py      the tokenizers library on tokenizer.json, as edgeft/serve/runner.py
    triton/NAME_tokenizer/V/tokenizer.json
    triton/NAME_onnx/config.pbtxt         onnxruntime backend, max_batch_size > 0, dynamic batching, KIND_CPU
    triton/NAME_onnx/V/model.onnx         a copy of model/model.onnx (+ its external data, if any)
    triton/NAME_postprocess/config.pbtxt  Python backend, max_batch_size 0: logits [N, C] -> label [N]
    triton/NAME_postprocess/V/model.py, labels.txt

Why this batching shape: a V2 request carries N texts as one tensor [N]. The ensemble and both Python
models are non-batching (dims include N, so [-1]); only the ONNX model batches (dims exclude the
batch dimension), which Triton's ensemble check accepts because the expanded shapes agree
([-1] + [-1] == [-1, -1]; see core's ensemble_utils.cc, ValidateTensorConsistency).

Versions: Triton versions are version *folders* with positive integer names (no leading zeros, see
core's model_lifecycle.cc), and /v2/models/NAME/versions/V takes that integer. edgeft's version string
(default "1") is used as it is when it is such an integer; any other version cannot be expressed, so
``--triton`` refuses it (:func:`triton_version`) instead of serving under a different number.

``check_triton(bundle_root)`` validates the repository offline: every config.pbtxt parsed into Triton's
own ``inference.ModelConfig`` protobuf (tritonclient's model_config_pb2), then the checks Triton's core
and backends make at load time (names vs folders, version folders and the files each backend needs,
I/O dims and max_batch_size rules, ensemble mappings, data flow and tensor consistency, the ONNX
model's real inputs/outputs vs its config) and the edgeft contract (the same V2 API, model, tokenizer
settings and labels as the bundle).
"""

from __future__ import annotations

import ast
import hashlib
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeft.bundle import MANIFEST, MODEL_DIR, MODEL_ONNX
from edgeft.errors import EdgeftError

from edgeft.bundle import TRITON_DIR

CONFIG = "config.pbtxt"
ROLE_KEY = "edgeft_role"  # a config parameter naming each model's part in the pipeline
ROLES = ("ensemble", "tokenizer", "onnx", "postprocess")
SUFFIX = {"tokenizer": "_tokenizer", "onnx": "_onnx", "postprocess": "_postprocess"}
TOKENIZER_IN, POST_IN, POST_OUT = "TEXT", "LOGITS", "LABEL"
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # what runner.py can feed
ENSEMBLE_README = "README.txt"
VERSION_PATTERN = re.compile(r"^[1-9][0-9]{0,17}$")  # Triton: an int64 folder name, no leading zeros
SKIP_DIRS = {"warmup", "initial_state", "configs"}  # version-level folders Triton does not take as versions
NO_REPO = "the bundle has no Triton model repository: re-ship it with `edgeft ship --triton`"
ONNX_TO_TRITON = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16",
                  6: "TYPE_INT32", 7: "TYPE_INT64", 8: "TYPE_STRING", 9: "TYPE_BOOL", 10: "TYPE_FP16",
                  11: "TYPE_FP64", 12: "TYPE_UINT32", 13: "TYPE_UINT64", 16: "TYPE_BF16"}  # onnx.TensorProto
MANIFEST_TO_TRITON = {"FP32": "TYPE_FP32", "FP16": "TYPE_FP16", "INT64": "TYPE_INT64", "INT32": "TYPE_INT32"}
CHECKS = ["config.pbtxt parses as inference.ModelConfig (tritonclient model_config_pb2)",
          "model names equal their folder names",
          "integer version folders hold the files each backend needs (model.py, model.onnx, tokenizer.json, labels.txt)",
          "I/O names, data types and dims; max_batch_size, dynamic batching and instance group rules",
          "ensemble steps: composing models and versions exist, input_map/output_map name real tensors, "
          "data flow, tensor data types and dims consistent along the ensemble, max_batch_size",
          "the ONNX model's inputs/outputs (onnx, no external data) match its config as the onnxruntime backend checks",
          "same V2 API, model bytes, tokenizer settings and labels as the bundle"]


# ---------------------------------------------------------------- the protobuf message


def model_config_pb2():
    """Triton's model_config_pb2 module (``inference.ModelConfig``) as tritonclient ships it.

    ``tritonclient.grpc`` imports grpcio in its package ``__init__``; the generated module itself needs only
    protobuf, so without grpcio the file is loaded on its own."""
    try:
        from tritonclient.grpc import model_config_pb2 as pb

        return pb
    except (ImportError, RuntimeError):  # tritonclient turns a missing grpcio into a RuntimeError
        pass
    import importlib.util
    import sys

    fix = "pip install 'edgeft[triton]' (tritonclient's model_config_pb2 is Triton's model configuration schema)"
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        raise EdgeftError("Triton's model configuration schema is not installed (tritonclient)", fix)
    path = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
    name = "edgeft_triton_model_config_pb2"
    if name in sys.modules:
        return sys.modules[name]
    file_spec = importlib.util.spec_from_file_location(name, path)
    if not path.is_file() or file_spec is None or file_spec.loader is None:
        raise EdgeftError(f"tritonclient has no {path.name}", fix)
    module = importlib.util.module_from_spec(file_spec)
    try:
        file_spec.loader.exec_module(module)
    except ImportError as e:  # protobuf missing or too old for the generated code
        raise EdgeftError(f"cannot load Triton's model configuration schema ({e})", fix) from None
    sys.modules[name] = module
    return module


# ---------------------------------------------------------------- naming and versions


def triton_version(version: str) -> int:
    """The Triton version (folder name and URL segment) for an edgeft version string: the same number.

    Call it before building anything: a version Triton cannot express is bad input."""
    if not VERSION_PATTERN.match(str(version)):
        raise EdgeftError(f"version '{version}' cannot be a Triton model version (Triton versions are positive "
                          "whole numbers without leading zeros, and `edgeft serve` answers under the same string)",
                          "ship with --version N (a whole number such as 1, the default) to add the Triton repository")
    return int(version)


def model_names(name: str) -> dict[str, str]:
    """Role -> Triton model name. The composing models carry the bundle name so that several bundles'
    repositories can be merged into one Triton model repository without clashes."""
    return {"ensemble": name, **{role: name + suffix for role, suffix in SUFFIX.items()}}


# ---------------------------------------------------------------- the model files (Python backend)

TOKENIZER_MODEL_PY = '''\
"""Triton Python-backend model written by `edgeft ship --triton`: texts -> token id tensors, exactly as
`edgeft serve` tokenizes (edgeft/serve/runner.py): the bundle's fast tokenizer (tokenizer.json beside this
file), no padding, truncation to max_length tokens, each request padded to its longest text. Texts longer
than max_chars characters are cut first, as `edgeft serve` does. Settings come from config.pbtxt."""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer


def _text(item, i):
    if isinstance(item, str):
        return item
    try:
        return bytes(item).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"text item {i} is not UTF-8 text") from None


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.max_length = int(params["max_length"])
        self.max_chars = int(params["max_chars"])
        self.pad_id = int(params["pad_id"])
        self.input_name = config["input"][0]["name"]
        self.output_names = [o["name"] for o in config["output"]]
        path = Path(__file__).resolve().parent / params.get("tokenizer_file", "tokenizer.json")
        self.tokenizer = Tokenizer.from_file(str(path))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length)

    def _encode(self, texts):
        encs = self.tokenizer.encode_batch(texts, add_special_tokens=True)
        n, width = len(encs), max(len(e.ids) for e in encs)
        ids = np.full((n, width), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        types = np.zeros((n, width), dtype=np.int64)
        for i, e in enumerate(encs):
            k = len(e.ids)
            ids[i, :k] = e.ids
            mask[i, :k] = 1
            types[i, :k] = e.type_ids
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                raw = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy().reshape(-1)
                if raw.size == 0:
                    raise ValueError(f"input '{self.input_name}' holds no text; send at least one")
                texts = [_text(x, i)[:self.max_chars] for i, x in enumerate(raw)]
                arrays = self._encode(texts)
                outputs = [pb_utils.Tensor(name, arrays[name]) for name in self.output_names]
                responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
            except ValueError as e:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e))))
        return responses
'''

POSTPROCESS_MODEL_PY = '''\
"""Triton Python-backend model written by `edgeft ship --triton`: logits [N, C] -> label [N], the arg-max
label (first one on ties, as `edgeft serve`) from labels.txt beside this file (one label a line)."""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        path = Path(__file__).resolve().parent / "labels.txt"
        self.labels = [x.encode("utf-8") for x in path.read_text(encoding="utf-8").splitlines()]

    def execute(self, requests):
        responses = []
        for request in requests:
            logits = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
            if logits.ndim != 2 or logits.shape[1] != len(self.labels):
                err = pb_utils.TritonError(f"expected logits [N, {len(self.labels)}], got {list(logits.shape)}")
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=err))
                continue
            labels = np.array([self.labels[j] for j in np.argmax(logits, axis=1)], dtype=np.object_)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, labels)]))
        return responses
'''


# ---------------------------------------------------------------- building the configs


@dataclass(frozen=True)
class Policy:
    """The bundle's serve defaults mapped onto Triton's scheduler (recorded in the manifest)."""

    max_batch_size: int  # Triton's: a request is never split, so it must hold edgeft's max_items texts
    preferred_batch_size: list[int]  # edgeft's max_batch_size: the batch the batcher aims for
    max_queue_delay_microseconds: int
    max_queue_size: int  # queue_capacity: more queued requests are rejected at once
    default_timeout_microseconds: int  # request_timeout_s: a request still queued then is rejected
    intra_op_thread_count: int  # threads; 0 = ONNX Runtime's default (the machine's physical cores)
    inter_op_thread_count: int  # 1, as edgeft's sessions (sequential executor)
    instance_count: int  # one ONNX Runtime session, as `edgeft serve` runs one batch worker
    max_chars: int
    not_mapped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def serving_policy(serving: dict[str, Any]) -> Policy:
    """The manifest's serving section (ServeConfig fields; the rest at ServeConfig's defaults) -> Policy."""
    from edgeft.serve.config import resolve_config

    cfg = resolve_config(serving)
    mbs = max(cfg.max_batch_size, cfg.max_items)
    return Policy(max_batch_size=mbs, preferred_batch_size=[cfg.max_batch_size] if cfg.max_batch_size < mbs else [],
                  max_queue_delay_microseconds=int(round(cfg.max_queue_delay_ms * 1000)),
                  max_queue_size=cfg.queue_capacity,
                  default_timeout_microseconds=int(round(cfg.request_timeout_s * 1_000_000)),
                  intra_op_thread_count=cfg.threads or 0, inter_op_thread_count=1, instance_count=1,
                  max_chars=cfg.max_chars,
                  not_mapped=[f"max_batch_tokens={cfg.max_batch_tokens} (Triton batches by requests, not tokens)",
                              "latency_budget_ms (an alerting figure, not a scheduler setting)",
                              "queue_capacity counts only requests waiting for the ONNX model, not those computing"])


def _io(pb, message, name: str, data_type: str, dims: list[int]):
    message.name, message.data_type = name, pb.DataType.Value(data_type)
    message.dims.extend(dims)
    return message


def _param(config, key: str, value: Any) -> None:
    config.parameters[key].string_value = str(value)


def _onnx_dims(shape: list[Any]) -> list[int]:
    return [d if isinstance(d, int) and d > 0 else -1 for d in shape]


def build_configs(name: str, version: int, labels: list[str], onnx_io: dict[str, Any], max_length: int,
                  pad_id: int, policy: Policy) -> dict[str, Any]:
    """Role -> inference.ModelConfig of the four models (see the module docstring)."""
    pb = model_config_pb2()
    names, n_labels = model_names(name), len(labels)
    inputs = onnx_io["inputs"]
    unknown = [i["name"] for i in inputs if i["name"] not in TOKEN_INPUTS]
    if unknown:
        raise EdgeftError(f"the ONNX model wants inputs {unknown} that edgeft's tokenizer does not produce",
                          "export the model with edgeft")
    for i in inputs:
        if i["datatype"] != "INT64" or len(i["shape"]) != 2 or _onnx_dims(i["shape"])[0] != -1:
            raise EdgeftError(f"ONNX input '{i['name']}' is {i['datatype']} {i['shape']}; the Triton repository "
                              "needs INT64 [batch, sequence] with a dynamic batch dimension", "re-export the model with edgeft")
    out = onnx_io["outputs"][0]
    out_dims = _onnx_dims(out["shape"])
    if out.get("datatype") != "FP32" or len(out_dims) != 2 or out_dims[0] != -1 or out_dims[1] not in (-1, n_labels):
        raise EdgeftError(f"ONNX output '{out['name']}' is {out.get('datatype')} {out['shape']}; expected FP32 "
                          f"[batch, {n_labels}]", "re-export the model with edgeft")

    tok = pb.ModelConfig(name=names["tokenizer"], backend="python", max_batch_size=0)
    _io(pb, tok.input.add(), TOKENIZER_IN, "TYPE_STRING", [-1])
    for i in inputs:
        _io(pb, tok.output.add(), i["name"], "TYPE_INT64", [-1, -1])
    tok.instance_group.add(count=1, kind=pb.ModelInstanceGroup.KIND_CPU)
    for k, v in {ROLE_KEY: "tokenizer", "max_length": max_length, "max_chars": policy.max_chars, "pad_id": pad_id,
                 "tokenizer_file": "tokenizer.json"}.items():
        _param(tok, k, v)

    onnx = pb.ModelConfig(name=names["onnx"], backend="onnxruntime", max_batch_size=policy.max_batch_size,
                          default_model_filename="model.onnx")
    for i in inputs:
        _io(pb, onnx.input.add(), i["name"], "TYPE_INT64", _onnx_dims(i["shape"])[1:])
    _io(pb, onnx.output.add(), out["name"], "TYPE_FP32", out_dims[1:])
    db = onnx.dynamic_batching
    db.preferred_batch_size.extend(policy.preferred_batch_size)
    db.max_queue_delay_microseconds = policy.max_queue_delay_microseconds
    qp = db.default_queue_policy
    qp.timeout_action = pb.ModelQueuePolicy.REJECT
    qp.default_timeout_microseconds = policy.default_timeout_microseconds
    qp.allow_timeout_override = True
    qp.max_queue_size = policy.max_queue_size
    onnx.instance_group.add(count=policy.instance_count, kind=pb.ModelInstanceGroup.KIND_CPU)
    _param(onnx, ROLE_KEY, "onnx")
    _param(onnx, "intra_op_thread_count", policy.intra_op_thread_count)
    _param(onnx, "inter_op_thread_count", policy.inter_op_thread_count)

    post = pb.ModelConfig(name=names["postprocess"], backend="python", max_batch_size=0)
    _io(pb, post.input.add(), POST_IN, "TYPE_FP32", [-1, n_labels])
    _io(pb, post.output.add(), POST_OUT, "TYPE_STRING", [-1])
    post.instance_group.add(count=1, kind=pb.ModelInstanceGroup.KIND_CPU)
    _param(post, ROLE_KEY, "postprocess")

    ens = pb.ModelConfig(name=names["ensemble"], platform="ensemble", max_batch_size=0)
    _io(pb, ens.input.add(), "text", "TYPE_STRING", [-1])
    _io(pb, ens.output.add(), "logits", "TYPE_FP32", [-1, n_labels])
    _io(pb, ens.output.add(), "label", "TYPE_STRING", [-1])
    _param(ens, ROLE_KEY, "ensemble")
    s1 = ens.ensemble_scheduling.step.add(model_name=names["tokenizer"], model_version=version)
    s1.input_map[TOKENIZER_IN] = "text"
    s2 = ens.ensemble_scheduling.step.add(model_name=names["onnx"], model_version=version)
    for i in inputs:
        s1.output_map[i["name"]] = i["name"]
        s2.input_map[i["name"]] = i["name"]
    s2.output_map[out["name"]] = "logits"
    s3 = ens.ensemble_scheduling.step.add(model_name=names["postprocess"], model_version=version)
    s3.input_map[POST_IN] = "logits"
    s3.output_map[POST_OUT] = "label"
    return {"ensemble": ens, "tokenizer": tok, "onnx": onnx, "postprocess": post}


def config_text(config) -> str:
    from google.protobuf import text_format

    lines = text_format.MessageToString(config).splitlines(keepends=True)
    if config.max_batch_size == 0:  # proto3 omits zeros; said outright so that a reader sees a non-batching model
        lines.insert(1, "max_batch_size: 0\n")
    return "# written by `edgeft ship --triton`; see ../README.md\n" + "".join(lines)


def _readme(name: str, version: int, names: dict[str, str], policy: Policy) -> str:
    return f"""# Triton model repository for {name} {version}

Written by `edgeft ship --triton`. It serves the bundle's model under the same KServe V2 API as
`edgeft serve`: model `{name}`, version `{version}`, input `text` (BYTES, shape [N]), outputs `logits`
(FP32, [N, C]) and `label` (BYTES, [N]).

    docker run --rm -p 8000:8000 -v "$PWD:/models:ro" nvcr.io/nvidia/tritonserver:<yy.mm>-py3 \\
      bash -c "pip install tokenizers && tritonserver --model-repository=/models"
    curl -s localhost:8000/v2/models/{name}/versions/{version}/infer \\
      -d '{{"inputs":[{{"name":"text","datatype":"BYTES","shape":[1],"data":["some text"]}}]}}'

Models: `{names['ensemble']}` (ensemble) = `{names['tokenizer']}` (Python backend, needs the `tokenizers`
package in Triton's Python) -> `{names['onnx']}` (onnxruntime backend, CPU, dynamic batching) ->
`{names['postprocess']}` (Python backend). Check it offline with `edgeft verify --triton BUNDLE`.

Serve defaults mapped: max_batch_size {policy.max_batch_size} (a request is never split, so it holds
`max_items` texts), preferred batch {policy.preferred_batch_size or '(max_batch_size)'}, queue delay
{policy.max_queue_delay_microseconds} us, at most {policy.max_queue_size} queued requests (more are
rejected), a request still queued after {policy.default_timeout_microseconds} us is rejected,
intra-op threads {policy.intra_op_thread_count or "ONNX Runtime's default"}.

Differences from `edgeft serve`: `text` must be shape [N] (not [N, 1]); no API keys, rate limits or
`truncated` response parameters; Triton's dynamic batcher only merges requests whose padded lengths are
equal (no ragged batching for onnxruntime), and it has no token budget (max_batch_tokens); the model
metadata says platform `ensemble`.
"""


def _copy_onnx(stage: Path, dest_dir: Path) -> list[str]:
    """model/model.onnx and its external data files (if any) into ``dest_dir``; their names."""
    import onnx

    from edgeft.safeio import onnx_tensors

    src = stage / MODEL_ONNX
    shutil.copyfile(src, dest_dir / "model.onnx")
    head = onnx.load(str(src), load_external_data=False)
    extra = sorted({e.value for _, t in onnx_tensors(head) if t.data_location == onnx.TensorProto.EXTERNAL
                    for e in t.external_data if e.key == "location"})
    for rel in extra:  # edgeft writes one file beside model.onnx (ship._copy_onnx)
        shutil.copyfile(src.parent / rel, dest_dir / rel)
    return ["model.onnx", *extra]


def triton_part(ctx) -> None:
    """triton/: the model repository (see the module docstring); then check_triton's checks on it."""
    from edgeft.serve.runner import _pad_token  # the pad token rule of the serving path itself
    from tokenizers import Tokenizer

    version = triton_version(ctx.version)
    m = ctx.manifest
    labels = list(m["labels"])
    max_length = int(m["tokenizer"]["max_length"])
    model_dir = ctx.stage / MODEL_DIR
    pad_id = Tokenizer.from_file(str(model_dir / "tokenizer.json")).token_to_id(_pad_token(model_dir)) or 0
    policy = serving_policy(m.get("serving") or {})
    configs = build_configs(ctx.name, version, labels, m["io"]["onnx"], max_length, pad_id, policy)
    names = model_names(ctx.name)
    repo = ctx.stage / TRITON_DIR
    repo.mkdir()
    files: dict[str, list[str]] = {}
    for role in ROLES:
        folder = repo / names[role]
        vdir = folder / str(version)
        vdir.mkdir(parents=True)
        (folder / CONFIG).write_text(config_text(configs[role]), encoding="utf-8")
        if role == "ensemble":
            (vdir / ENSEMBLE_README).write_text("An ensemble has no model file; Triton needs this version folder.\n",
                                                encoding="utf-8")
        elif role == "tokenizer":
            (vdir / "model.py").write_text(TOKENIZER_MODEL_PY, encoding="utf-8")
            shutil.copyfile(model_dir / "tokenizer.json", vdir / "tokenizer.json")
        elif role == "onnx":
            _copy_onnx(ctx.stage, vdir)
        else:
            (vdir / "model.py").write_text(POSTPROCESS_MODEL_PY, encoding="utf-8")
            (vdir / "labels.txt").write_text("".join(f"{x}\n" for x in labels), encoding="utf-8")
        files[names[role]] = sorted(p.relative_to(ctx.stage).as_posix() for p in folder.rglob("*") if p.is_file())
    (repo / "README.md").write_text(_readme(ctx.name, version, names, policy), encoding="utf-8")

    problems = check_repository(ctx.stage, m)
    if problems:  # the generator and the checker disagree: an edgeft bug, not the user's input
        raise RuntimeError(f"the generated Triton repository fails its own check: {'; '.join(problems[:3])}")
    pb = model_config_pb2()
    m["triton"] = {
        "repository": TRITON_DIR, "ensemble": names["ensemble"], "version": version,
        "version_rule": "the edgeft version string is the Triton version folder (positive integers only)",
        "models": [{"name": names[r], "role": r, "backend": configs[r].backend or configs[r].platform,
                    "max_batch_size": configs[r].max_batch_size, "files": files[names[r]]} for r in ROLES],
        "api": {"inputs": m["io"]["inputs"], "outputs": m["io"]["outputs"]},
        "policy": policy.to_dict(),
        "requires": {"backends": ["python", "onnxruntime"], "python_packages": ["numpy", "tokenizers"]},
        "tritonserver_run": False,
        "validated": {"by": "edgeft.scale.triton.check_triton", "schema": pb.ModelConfig.DESCRIPTOR.full_name, "checks": CHECKS,
                      "problems": 0},
    }


# ---------------------------------------------------------------- the offline check


@dataclass
class _Model:
    folder: str  # its folder name
    rel: str  # triton/<folder>/config.pbtxt, for messages
    config: Any
    versions: list[int]

    @property
    def role(self) -> str | None:
        p = self.config.parameters.get(ROLE_KEY)
        return p.string_value if p is not None else None


def _dt(pb, value: int) -> str:
    return pb.DataType.Name(value)


def _wild_eq(a: list[int], b: list[int]) -> bool:
    """Triton's CompareDimsWithWildcard: same rank, each pair equal or either -1."""
    return len(a) == len(b) and all(x == y or x == -1 or y == -1 for x, y in zip(a, b))


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _load_models(repo: Path, pb, problems: list[str]) -> dict[str, _Model]:
    from google.protobuf import text_format

    models: dict[str, _Model] = {}
    for folder in sorted(p for p in repo.iterdir() if p.is_dir()):
        rel = f"{TRITON_DIR}/{folder.name}/{CONFIG}"
        path = folder / CONFIG
        if not path.is_file():
            problems.append(f"{TRITON_DIR}/{folder.name}: no {CONFIG} (every model folder needs one)")
            continue
        config = pb.ModelConfig()
        try:
            text_format.Parse(path.read_text(encoding="utf-8"), config)
        except (text_format.ParseError, UnicodeDecodeError) as e:
            problems.append(f"{rel}: not a valid Triton model config ({_one_line(e)[:200]})")
            continue
        versions, ignored = [], []
        for sub in sorted(p for p in folder.iterdir() if p.is_dir() and p.name not in SKIP_DIRS):
            (versions.append(int(sub.name)) if VERSION_PATTERN.match(sub.name) else ignored.append(sub.name))
        for name in ignored:
            problems.append(f"{TRITON_DIR}/{folder.name}/{name}: Triton ignores this folder (version folders are "
                            "positive whole numbers without leading zeros)")
        if not versions:
            problems.append(f"{TRITON_DIR}/{folder.name}: no version folder (Triton loads integer-named folders such "
                            "as 1/ and fails a model without one)")
        models[folder.name] = _Model(folder.name, rel, config, sorted(versions))
    return models


def _check_io(pb, model: _Model, problems: list[str]) -> None:
    c = model.config
    for kind, ios in (("input", c.input), ("output", c.output)):
        seen = set()
        for io in ios:
            if not io.name:
                problems.append(f"{model.rel}: an {kind} has no name")
                continue
            if io.name in seen:
                problems.append(f"{model.rel}: {kind} '{io.name}' appears twice")
            seen.add(io.name)
            if io.data_type == pb.TYPE_INVALID:
                problems.append(f"{model.rel}: {kind} '{io.name}' has no data_type")
            if not io.dims:
                problems.append(f"{model.rel}: {kind} '{io.name}' has no dims")
            if any(d < 1 and d != -1 for d in io.dims):
                problems.append(f"{model.rel}: {kind} '{io.name}' dims {list(io.dims)}: each must be >= 1 or -1")


def _check_model(pb, repo: Path, model: _Model, problems: list[str]) -> None:
    """What Triton's core checks when it loads one model (model_config_utils.cc) + the files its backend needs."""
    c, rel = model.config, model.rel
    if c.name != model.folder:
        problems.append(f"{rel}: name '{c.name}' differs from its folder '{model.folder}' (Triton: the directory "
                        "name must equal the model name)")
    if c.max_batch_size < 0:
        problems.append(f"{rel}: max_batch_size {c.max_batch_size} must be >= 0")
    _check_io(pb, model, problems)
    if c.platform == "ensemble":
        if c.backend:
            problems.append(f"{rel}: an ensemble must have platform 'ensemble' and no backend")
        if c.instance_group:
            problems.append(f"{rel}: an ensemble must not have an instance_group")
        if c.HasField("optimization") or c.model_warmup:
            problems.append(f"{rel}: an ensemble must not have optimization or model_warmup")
        if not c.HasField("ensemble_scheduling"):
            problems.append(f"{rel}: platform 'ensemble' needs ensemble_scheduling")
        return
    if c.HasField("ensemble_scheduling"):
        problems.append(f"{rel}: ensemble_scheduling needs platform 'ensemble'")
    if c.backend not in ("python", "onnxruntime"):
        problems.append(f"{rel}: backend '{c.backend}' (this repository uses 'python' and 'onnxruntime')")
    if c.HasField("dynamic_batching"):
        if c.max_batch_size == 0:
            problems.append(f"{rel}: dynamic_batching needs max_batch_size > 0")
        bad = [s for s in c.dynamic_batching.preferred_batch_size if s <= 0 or s > c.max_batch_size]
        if bad:
            problems.append(f"{rel}: preferred_batch_size {bad} must be in 1..max_batch_size ({c.max_batch_size})")
    if not c.instance_group:
        problems.append(f"{rel}: no instance_group (Triton needs one; this repository runs on CPU: KIND_CPU)")
    for g in c.instance_group:
        if g.kind != pb.ModelInstanceGroup.KIND_CPU or g.gpus:
            problems.append(f"{rel}: instance_group kind {pb.ModelInstanceGroup.Kind.Name(g.kind)}: the bundle is "
                            "for CPU servers (KIND_CPU, no gpus)")
        if g.count < 0:
            problems.append(f"{rel}: instance_group count {g.count} must be >= 0")
    for key in ("intra_op_thread_count", "inter_op_thread_count"):
        p = c.parameters.get(key)
        if p is not None and not re.fullmatch(r"[0-9]{1,4}", p.string_value):
            problems.append(f"{rel}: parameter {key} '{p.string_value}' is not a thread count")
    default = c.default_model_filename or ("model.py" if c.backend == "python" else "model.onnx")
    needs = [default] + {"tokenizer": ["tokenizer.json"], "postprocess": ["labels.txt"]}.get(model.role or "", [])
    for v in model.versions:
        for name in needs:
            if not (repo / model.folder / str(v) / name).is_file():
                why = f"the {c.backend} backend loads it" if name == default else "its model.py reads it"
                problems.append(f"{TRITON_DIR}/{model.folder}/{v}: {name} is missing ({why})")
        if c.backend == "python" and (repo / model.folder / str(v) / default).is_file():
            try:
                ast.parse((repo / model.folder / str(v) / default).read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError) as e:
                problems.append(f"{TRITON_DIR}/{model.folder}/{v}/{default}: not valid Python ({_one_line(e)[:120]})")


@dataclass
class _Tensor:
    model: str
    data_type: int
    dims: list[int]
    full: list[int]


def _tensor(model: str, batching: bool, data_type: int, dims) -> _Tensor:
    dims = list(dims)
    return _Tensor(model, data_type, dims, ([-1] if batching else []) + dims)


def _consistent(pb, rel: str, tensor: str, a: _Tensor, b: _Tensor, problems: list[str]) -> None:
    """Triton's ValidateTensorConsistency: same data type; dims equal with wildcards, or full dims (batching)."""
    if a.data_type != b.data_type:
        problems.append(f"{rel}: ensemble tensor '{tensor}' is {_dt(pb, a.data_type)} in {a.model} but "
                        f"{_dt(pb, b.data_type)} in {b.model}")
    elif not _wild_eq(a.dims, b.dims) and not _wild_eq(a.full, b.full):
        problems.append(f"{rel}: ensemble tensor '{tensor}' has shape {a.full} in {a.model} but {b.full} in {b.model}")


def _check_ensemble(pb, ens: _Model, models: dict[str, _Model], problems: list[str]) -> None:
    """Triton's ValidateEnsembleSchedulingConfig (data flow) and ValidateEnsembleConfig (mappings, shapes)."""
    c, rel = ens.config, ens.rel
    steps = list(c.ensemble_scheduling.step)
    if not steps:
        problems.append(f"{rel}: ensemble_scheduling has no step")
        return
    batching = c.max_batch_size > 0
    tensors: dict[str, _Tensor] = {io.name: _tensor(c.name, batching, io.data_type, io.dims) for io in c.input}
    ready = set(tensors)
    used: set[str] = set()
    written: dict[str, int] = {}
    for out in c.output:
        tensors.setdefault(out.name, _tensor(c.name, batching, out.data_type, out.dims))
    for n, step in enumerate(steps, 1):
        where = f"{rel}: step {n} ({step.model_name or '?'})"
        if not step.model_name or not step.input_map or not step.output_map:
            problems.append(f"{where}: needs model_name, input_map and output_map")
            continue
        model = models.get(step.model_name)
        if model is None:
            problems.append(f"{where}: model '{step.model_name}' is not in the repository (no "
                            f"{TRITON_DIR}/{step.model_name}/{CONFIG} that parses)")
            continue
        mc = model.config
        if step.model_version != -1 and step.model_version not in model.versions:
            problems.append(f"{where}: asks for version {step.model_version}, but {TRITON_DIR}/{step.model_name} "
                            f"has {'versions ' + str(model.versions) if model.versions else 'no version folder'}")
        if mc.max_batch_size != 0 and mc.max_batch_size < c.max_batch_size:
            problems.append(f"{where}: max_batch_size {mc.max_batch_size} is below the ensemble's {c.max_batch_size}")
        step_batching = mc.max_batch_size > 0
        model_inputs = {io.name: io for io in mc.input}
        model_outputs = {io.name: io for io in mc.output}
        for key, value in step.input_map.items():
            if key not in model_inputs:
                problems.append(f"{where}: input_map maps ensemble tensor '{value}' to '{key}', which is no input "
                                f"of {step.model_name} (its inputs: {', '.join(model_inputs) or 'none'})")
                continue
            used.add(value)
            if value not in ready:
                problems.append(f"{where}: reads ensemble tensor '{value}', which no earlier step writes and is no "
                                "ensemble input")
            node = _tensor(step.model_name, step_batching, model_inputs[key].data_type, model_inputs[key].dims)
            if value in tensors:
                _consistent(pb, rel, value, tensors[value], node, problems)
            else:
                tensors[value] = node
        for name, io in model_inputs.items():
            if name not in step.input_map and not io.optional:
                problems.append(f"{where}: input '{name}' of {step.model_name} is not mapped to any ensemble tensor")
        for key, value in step.output_map.items():
            if key not in model_outputs:
                problems.append(f"{where}: output_map maps '{key}', which is no output of {step.model_name} (its "
                                f"outputs: {', '.join(model_outputs) or 'none'}), to ensemble tensor '{value}'")
                continue
            if value in written:
                problems.append(f"{where}: ensemble tensor '{value}' is already written by step {written[value]}")
            written[value] = n
            ready.add(value)
            node = _tensor(step.model_name, step_batching, model_outputs[key].data_type, model_outputs[key].dims)
            if value in tensors:
                _consistent(pb, rel, value, tensors[value], node, problems)
            else:
                tensors[value] = node
    for io in c.input:
        if io.name not in used:
            problems.append(f"{rel}: ensemble input '{io.name}' is not used by any step")
    for io in c.output:
        if io.name not in written:
            problems.append(f"{rel}: ensemble output '{io.name}' is not written by any step")
    outputs = {io.name for io in c.output}
    for name in sorted(set(written) - used - outputs):
        problems.append(f"{rel}: ensemble tensor '{name}' is written but never used")


def _onnx_values(path: Path) -> tuple[dict[str, tuple[str, list[int]]], dict[str, tuple[str, list[int]]]]:
    """(inputs, outputs) of an ONNX file: name -> (Triton data type, shape with -1 for symbolic dims)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    init = {t.name for t in model.graph.initializer}

    def desc(v) -> tuple[str, list[int]]:
        t = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        return ONNX_TO_TRITON.get(t.elem_type, f"onnx type {t.elem_type}"), shape

    return ({v.name: desc(v) for v in model.graph.input if v.name not in init},
            {v.name: desc(v) for v in model.graph.output})


def _check_onnx(pb, repo: Path, model: _Model, problems: list[str]) -> None:
    """What the onnxruntime backend checks at load time (ValidateInputs / ValidateOutputs, CompareDimsSupported)."""
    c = model.config
    filename = c.default_model_filename or "model.onnx"
    for v in model.versions:
        path = repo / model.folder / str(v) / filename
        if not path.is_file():
            continue  # reported by _check_model
        rel = f"{TRITON_DIR}/{model.folder}/{v}/{filename}"
        try:
            inputs, outputs = _onnx_values(path)
        except Exception as e:  # onnx raises DecodeError and friends for a damaged file
            problems.append(f"{rel}: onnx cannot read it ({type(e).__name__}: {_one_line(e)[:120]})")
            continue
        if len(c.input) != len(inputs):
            problems.append(f"{model.rel}: {len(c.input)} inputs configured, {rel} has {len(inputs)} "
                            f"({', '.join(inputs)})")
        for kind, ios, actual, exact in (("input", c.input, inputs, False), ("output", c.output, outputs, True)):
            for io in ios:
                if io.name not in actual:
                    problems.append(f"{model.rel}: {kind} '{io.name}' is not an {kind} of {rel} "
                                    f"(its {kind}s: {', '.join(actual)})")
                    continue
                dtype, shape = actual[io.name]
                if dtype != _dt(pb, io.data_type):
                    problems.append(f"{model.rel}: {kind} '{io.name}' is {_dt(pb, io.data_type)} but {rel} has {dtype}")
                dims = list(io.dims)
                if c.max_batch_size > 0:
                    if not shape or shape[0] != -1:
                        problems.append(f"{model.rel}: {kind} '{io.name}': batching (max_batch_size > 0) needs a "
                                        f"dynamic first dimension, {rel} has {shape}")
                        continue
                    dims = [-1] + dims
                ok = len(shape) == len(dims) and all(m == d if (exact or m != -1) else True for m, d in zip(shape, dims))
                if not ok:
                    what = " (with the batch dimension)" if c.max_batch_size > 0 else ""
                    problems.append(f"{model.rel}: {kind} '{io.name}' dims {list(io.dims)} give shape {dims}{what}, "
                                    f"but {rel} has {shape}")


def _sig(ios: list[tuple[str, str, list[int]]]) -> str:
    return ", ".join(f"{name} {dtype} {dims}" for name, dtype, dims in ios) or "nothing"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_contract(pb, root: Path, models: dict[str, _Model], manifest: dict[str, Any], problems: list[str]) -> None:
    """The edgeft side: the ensemble is the bundle's model under the same V2 API, the same model, tokenizer
    settings and labels."""
    name, labels = str(manifest.get("name", "")), [str(x) for x in manifest.get("labels", [])]
    try:
        version = triton_version(str(manifest.get("version", "")))
    except EdgeftError as e:
        problems.append(f"{MANIFEST}: {e.problem}")
        version = None
    ens = models.get(name)
    if ens is None:
        problems.append(f"{TRITON_DIR}/{name}: the ensemble named after the bundle ('{name}') is missing")
        return
    c, rel = ens.config, ens.rel
    if c.platform != "ensemble":
        problems.append(f"{rel}: model '{name}' must be the ensemble (platform 'ensemble'), not "
                        f"'{c.platform or c.backend}'")
        return
    if version is not None and version not in ens.versions:
        problems.append(f"{TRITON_DIR}/{name}: no version folder {version}/ (the bundle's version)")
    n = len(labels)
    want_in = [("text", "TYPE_STRING", [-1])]
    want_out = [("logits", "TYPE_FP32", [-1, n]), ("label", "TYPE_STRING", [-1])]
    have_in = [(io.name, _dt(pb, io.data_type), list(io.dims)) for io in c.input]
    have_out = [(io.name, _dt(pb, io.data_type), list(io.dims)) for io in c.output]
    if c.max_batch_size != 0:
        problems.append(f"{rel}: max_batch_size {c.max_batch_size}: the V2 API of `edgeft serve` takes text [N] "
                        "as one tensor, so the ensemble is non-batching (0)")
    if have_in != want_in or sorted(have_out) != sorted(want_out):
        problems.append(f"{rel}: I/O {_sig(have_in)} -> {_sig(have_out)} differs from `edgeft serve`'s "
                        f"{_sig(want_in)} -> {_sig(want_out)} ({n} labels)")
    for step in c.ensemble_scheduling.step:
        model = models.get(step.model_name)
        if model is None:
            continue
        mc = model.config
        vdirs = [root / TRITON_DIR / model.folder / str(v) for v in model.versions]
        if mc.backend == "onnxruntime":
            for vdir in vdirs:
                f = vdir / (mc.default_model_filename or "model.onnx")
                if f.is_file() and (root / MODEL_ONNX).is_file() and _sha(f) != _sha(root / MODEL_ONNX):
                    problems.append(f"{f.relative_to(root).as_posix()} differs from {MODEL_ONNX}: Triton would "
                                    "serve another model than `edgeft serve`")
            for io in mc.output:
                if io.dims and io.dims[-1] not in (-1, n):
                    problems.append(f"{model.rel}: output '{io.name}' has {io.dims[-1]} classes but the bundle has {n} labels")
        elif model.role == "tokenizer":
            _check_tokenizer(root, model, vdirs, manifest, problems)
        elif model.role == "postprocess":
            for io in mc.input:
                if list(io.dims)[-1:] != [n]:
                    problems.append(f"{model.rel}: input '{io.name}' dims {list(io.dims)} do not end in the "
                                    f"bundle's {n} labels")
            for vdir in vdirs:
                f = vdir / "labels.txt"
                if f.is_file() and f.read_text(encoding="utf-8").splitlines() != labels:
                    problems.append(f"{f.relative_to(root).as_posix()}: labels differ from the bundle's {labels}")
        elif mc.backend == "python":
            problems.append(f"{model.rel}: python model without parameter {ROLE_KEY} 'tokenizer' or 'postprocess'")


def _check_tokenizer(root: Path, model: _Model, vdirs: list[Path], manifest: dict[str, Any],
                     problems: list[str]) -> None:
    from edgeft.serve.runner import _pad_token

    params = {k: v.string_value for k, v in model.config.parameters.items()}
    max_length = (manifest.get("tokenizer") or {}).get("max_length")
    for key in ("max_length", "max_chars", "pad_id"):
        if not re.fullmatch(r"[0-9]{1,9}", params.get(key, "")):
            problems.append(f"{model.rel}: parameter {key} is {params.get(key)!r}, not a whole number")
    if params.get("max_length") != str(max_length):
        problems.append(f"{model.rel}: max_length {params.get('max_length')} differs from the bundle's {max_length}")
    bundle_tok = root / MODEL_DIR / "tokenizer.json"
    tok_file = params.get("tokenizer_file", "tokenizer.json")
    for vdir in vdirs:
        f = vdir / tok_file
        if not f.is_file():
            continue
        rel = f.relative_to(root).as_posix()
        if bundle_tok.is_file() and _sha(f) != _sha(bundle_tok):
            problems.append(f"{rel} differs from {MODEL_DIR}/tokenizer.json: Triton would tokenize differently")
        elif bundle_tok.is_file() and params.get("pad_id", "").isdigit():
            from tokenizers import Tokenizer

            pad = Tokenizer.from_file(str(f)).token_to_id(_pad_token(root / MODEL_DIR)) or 0
            if int(params["pad_id"]) != pad:
                problems.append(f"{model.rel}: pad_id {params['pad_id']} differs from the serving path's {pad}")


def check_repository(root: Path, manifest: dict[str, Any]) -> list[str]:
    """Problems with ``root``/triton for a bundle whose manifest is ``manifest`` (possibly not written yet)."""
    repo = root / TRITON_DIR
    if not repo.is_dir() or repo.is_symlink():
        return [NO_REPO]
    pb = model_config_pb2()
    problems: list[str] = []
    models = _load_models(repo, pb, problems)
    for model in models.values():
        _check_model(pb, repo, model, problems)
        if model.config.backend == "onnxruntime":
            _check_onnx(pb, repo, model, problems)
    ensembles = [m for m in models.values() if m.config.platform == "ensemble"]
    for ens in ensembles:
        _check_ensemble(pb, ens, models, problems)
    _check_contract(pb, root, models, manifest, problems)
    return problems


def check_triton(bundle_root: Path) -> list[str]:
    """One-line problems with the bundle's Triton model repository; an empty list means it is valid."""
    from edgeft.bundle import BundleError, read_manifest

    root = Path(bundle_root)
    if not (root / TRITON_DIR).is_dir():
        return [NO_REPO]
    try:
        manifest = read_manifest(root)
    except BundleError as e:
        return [e.one_line()]
    try:
        return check_repository(root, manifest)
    except EdgeftError as e:  # the schema (tritonclient) is not installed here
        return [e.one_line()]
