"""Runtimes: presence detection, and one engine per (model, runtime, precision).

Runtimes: ``torch-cpu`` and ``torch-cuda`` (PyTorch eager; fp32, and fp16 on CUDA) run Hugging Face folders;
``ort-cpu``, ``ort-cuda`` and ``ort-trt`` (ONNX Runtime execution providers) run ONNX files. Every engine
uses the same intra-op thread count and one inter-op thread. An ORT session whose first provider is not
the one asked for (ORT falls back to CPU silently when CUDA libraries fail to load) is refused: CPU
numbers are never reported as GPU numbers.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeft.errors import EdgeftError, ModelError
from edgeft.hardware import MB, MIB

RUNTIMES = ("torch-cpu", "ort-cpu", "torch-cuda", "ort-cuda", "ort-trt")
MODEL_FORMAT = {"torch-cpu": "hf", "torch-cuda": "hf", "ort-cpu": "onnx", "ort-cuda": "onnx", "ort-trt": "onnx"}
ORT_PROVIDER = {"ort-cpu": "CPUExecutionProvider", "ort-cuda": "CUDAExecutionProvider",
                "ort-trt": "TensorrtExecutionProvider"}
INT8_OPS = {"MatMulInteger", "QLinearMatMul", "DynamicQuantizeLinear", "QuantizeLinear", "QAttention",
            "DynamicQuantizeMatMul", "QGemm", "MatMulIntegerToFloat", "QLinearConv", "MatMulNBits"}


class RuntimeUnavailable(EdgeftError):
    """A runtime named on the command line is not present here."""


# ---------------------------------------------------------------- presence


def _cuda_available() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, f"no CUDA GPU visible to torch {torch.__version__}"
    return True, torch.cuda.get_device_name(0)


def _nvidia_smi(query: str) -> list[str] | None:
    """Rows of ``nvidia-smi --query-gpu=QUERY`` (CSV, no header), or None without a usable nvidia-smi."""
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return None
    try:
        p = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [r.strip() for r in p.stdout.splitlines() if r.strip()]
    return rows if p.returncode == 0 and rows else None


def _gpu_present() -> tuple[bool, str]:
    """A GPU for ONNX Runtime: torch may be the CPU build while onnxruntime-gpu is installed."""
    ok, text = _cuda_available()
    if ok:
        return ok, text
    rows = _nvidia_smi("name")
    if rows:
        return True, rows[0]
    return False, "no CUDA GPU found (torch sees none and nvidia-smi lists none)"


def gpu_used_mb() -> float | None:
    """Device-wide used GPU memory (MB, 10^6 bytes) of GPU 0; None without a GPU."""
    ok, _ = _cuda_available()
    if ok:
        import torch

        free, total = torch.cuda.mem_get_info()
        return (total - free) / MB
    rows = _nvidia_smi("memory.used")
    try:
        return float(rows[0].split(",")[0]) * MIB / MB if rows else None  # nvidia-smi reports MiB
    except ValueError:
        return None


def _ort_providers() -> tuple[list[str], str | None]:
    try:
        import onnxruntime as ort
    except ImportError:
        return [], "onnxruntime is not installed (make install, or make install-gpu for onnxruntime-gpu)"
    return list(ort.get_available_providers()), None


def detect_runtimes() -> dict[str, dict]:
    """``{runtime: {"present": bool, "reason": str | None}}`` for every known runtime."""
    has_cuda, cuda_text = _cuda_available()
    has_gpu, gpu_text = _gpu_present() if not has_cuda else (True, cuda_text)
    providers, ort_missing = _ort_providers()
    out: dict[str, dict] = {"torch-cpu": {"present": True, "reason": None}}
    out["torch-cuda"] = {"present": has_cuda, "reason": None if has_cuda else cuda_text}
    for rt, prov in ORT_PROVIDER.items():
        if ort_missing:
            out[rt] = {"present": False, "reason": ort_missing}
        elif prov not in providers:
            hint = "" if rt == "ort-cpu" else " (the CPU onnxruntime package is installed; 'make install-gpu' " \
                                               "replaces it with onnxruntime-gpu)"
            out[rt] = {"present": False, "reason": f"onnxruntime has no {prov}{hint}"}
        elif rt != "ort-cpu" and not has_gpu:
            out[rt] = {"present": False, "reason": f"{prov} is built in but {gpu_text}"}
        else:
            out[rt] = {"present": True, "reason": None}
    return {rt: out[rt] for rt in RUNTIMES}


def select_runtimes(requested: list[str] | str, detected: dict[str, dict]) -> list[str]:
    """Runtimes to use. ``auto``: every present one. Named: each must be known and present."""
    if requested == "auto":
        return [rt for rt in RUNTIMES if detected[rt]["present"]]
    present = [rt for rt in RUNTIMES if detected[rt]["present"]]
    for rt in requested:
        if rt not in RUNTIMES:
            raise EdgeftError(f"unknown runtime '{rt}'", f"use auto or a comma list of {', '.join(RUNTIMES)}")
    missing = [rt for rt in requested if not detected[rt]["present"]]
    if missing:
        rt = missing[0]
        raise RuntimeUnavailable(f"runtime {rt} is not present here: {detected[rt]['reason']}",
                                 f"present runtimes: {', '.join(present)}; or use --runtimes auto")
    return list(dict.fromkeys(requested))


# ---------------------------------------------------------------- memory


def _proc_status_kb(field: str) -> float | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    return None


class PeakMemory:
    """Peak resident memory of a block of code: the process high-water mark (VmHWM) is reset through
    /proc/self/clear_refs before the block (Linux); elsewhere the RSS after the block is used."""

    def __init__(self, cuda: bool = False):
        self.cuda = cuda
        self.rss_before_mb = self.peak_rss_mb = 0.0
        self.gpu_used_mb: float | None = None
        self.is_exact_peak = False

    def __enter__(self) -> PeakMemory:
        import psutil

        self._proc = psutil.Process()
        self.rss_before_mb = self._proc.memory_info().rss / MB
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.is_exact_peak = _proc_status_kb("VmHWM") is not None
        except OSError:
            self.is_exact_peak = False
        if self.cuda:
            self._gpu0 = gpu_used_mb()
        return self

    def __exit__(self, *exc) -> None:
        hwm = _proc_status_kb("VmHWM") if self.is_exact_peak else None
        self.peak_rss_mb = hwm * 1024 / MB if hwm is not None else self._proc.memory_info().rss / MB  # VmHWM: kB = KiB
        if self.cuda and self._gpu0 is not None:
            if _cuda_available()[0]:
                import torch

                torch.cuda.synchronize()
            after = gpu_used_mb()
            # device-wide: includes the CUDA context, and other processes' allocations made meanwhile
            self.gpu_used_mb = None if after is None else max(0.0, after - self._gpu0)

    def to_dict(self) -> dict:
        return {"peak_rss_mb": round(self.peak_rss_mb, 1),
                "rss_delta_mb": round(max(0.0, self.peak_rss_mb - self.rss_before_mb), 1),
                "is_exact_peak": self.is_exact_peak,
                "gpu_mb": None if self.gpu_used_mb is None else round(self.gpu_used_mb, 1)}


# ---------------------------------------------------------------- ONNX helpers


def onnx_files(path: Path) -> list[Path]:
    """The .onnx file and the external-data files it references (for the size on disk)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors

    model = onnx.load(str(path), load_external_data=False)
    files = {path}
    for t in _get_all_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            files.add(path.parent / ExternalDataInfo(t).location)
    return sorted(files)


def onnx_precision(path: Path) -> str:
    """int8 when the graph holds quantized operators, fp16 when its weights are half, else fp32."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    for f in model.functions:
        ops |= {n.op_type for n in f.node}
    if ops & INT8_OPS:
        return "int8"
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer):
        return "fp16"
    return "fp32"


# ---------------------------------------------------------------- engines


@dataclass
class Engine:
    """One loaded model on one runtime. ``prepare`` converts numpy inputs once (outside the timed region);
    ``run`` is one engine-only inference (synchronised on CUDA); ``logits`` returns numpy."""

    runtime: str
    precision: str
    input_names: list[str]
    providers: list[str] | None = None

    def prepare(self, arrays: dict[str, np.ndarray]):
        raise NotImplementedError

    def run(self, prepared) -> object:
        raise NotImplementedError

    def logits(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError


class TorchEngine(Engine):
    def __init__(self, folder: Path, runtime: str, precision: str):
        import torch

        from edgeft.modeling import load_classifier

        super().__init__(runtime=runtime, precision=precision, input_names=[])
        self.device = torch.device("cuda" if runtime == "torch-cuda" else "cpu")
        model = load_classifier(str(folder))
        if precision == "fp16":
            model = model.half()
        self.model = model.to(self.device).eval()
        import inspect

        accepted = set(inspect.signature(self.model.forward).parameters)
        self.input_names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in accepted]
        self._torch = torch

    def prepare(self, arrays):
        return {k: self._torch.from_numpy(np.ascontiguousarray(arrays[k])).to(self.device)
                for k in self.input_names if k in arrays}

    def run(self, prepared):
        with self._torch.inference_mode():
            out = self.model(**prepared).logits
        if self.device.type == "cuda":
            self._torch.cuda.synchronize()
        return out

    def logits(self, arrays):
        return self.run(self.prepare(arrays)).float().cpu().numpy()


class OrtEngine(Engine):
    def __init__(self, path: Path, runtime: str, precision: str, threads: int):
        from edgeft.onnx_eval import make_session

        wanted = ORT_PROVIDER[runtime]
        providers = {"ort-cpu": ["CPUExecutionProvider"],
                     "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                     "ort-trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}[runtime]
        sess = make_session(path, threads=threads, providers=providers)
        got = sess.get_providers()
        if not got or got[0] != wanted:
            raise RuntimeUnavailable(f"{runtime}: onnxruntime created the session on {got[0] if got else 'nothing'}, "
                                     f"not {wanted} (its libraries failed to load); refusing to report CPU numbers as {runtime}",
                                     "check the CUDA/TensorRT libraries match onnxruntime-gpu (see 'make install-gpu')")
        super().__init__(runtime=runtime, precision=precision, input_names=[i.name for i in sess.get_inputs()],
                         providers=got)
        self.session = sess
        self._types = {i.name: (np.int32 if i.type == "tensor(int32)" else np.int64) for i in sess.get_inputs()}
        outs = [o.name for o in sess.get_outputs()]
        self.output = "logits" if "logits" in outs else outs[0]

    def prepare(self, arrays):
        missing = [n for n in self.input_names if n not in arrays]
        if missing:
            raise ModelError(f"ONNX model wants inputs {missing} that the tokenizer does not produce",
                             "export the model with input_ids/attention_mask(/token_type_ids) inputs")
        return {n: np.ascontiguousarray(arrays[n], dtype=self._types[n]) for n in self.input_names}

    def run(self, prepared):
        return self.session.run([self.output], prepared)[0]

    def logits(self, arrays):
        return np.asarray(self.run(self.prepare(arrays)), dtype=np.float32)


def set_torch_threads(threads: int) -> dict:
    """Same intra-op threads for torch as for ORT; one inter-op thread (settable once per process)."""
    import torch

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already set, or parallel work already ran
        torch.set_num_interop_threads(1)
    return {"torch_intra_op": torch.get_num_threads(), "torch_inter_op": torch.get_num_interop_threads()}


def load_engine(model_format: str, path: Path, runtime: str, precision: str, threads: int) -> tuple[Engine, float]:
    """Load a model on a runtime; returns (engine, load time in ms)."""
    t0 = time.perf_counter()
    if model_format == "hf":
        engine: Engine = TorchEngine(path, runtime, precision)
    else:
        engine = OrtEngine(path, runtime, precision, threads)
    return engine, (time.perf_counter() - t0) * 1000


def gpu_info() -> dict | None:
    ok, name = _cuda_available()
    if not ok:
        rows = _nvidia_smi("name,memory.total,driver_version")
        if not rows:
            return None
        parts = [p.strip() for p in rows[0].split(",")]
        try:
            memory_mb = round(float(parts[1]) * MIB / MB) if len(parts) > 1 else None  # nvidia-smi: MiB
        except ValueError:
            memory_mb = None
        return {"name": parts[0], "memory_mb": memory_mb,
                "driver": parts[2] if len(parts) > 2 else None, "count": len(rows), "seen_by": "nvidia-smi"}
    import torch

    props = torch.cuda.get_device_properties(0)
    return {"name": name, "memory_mb": round(props.total_memory / MB), "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda, "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
