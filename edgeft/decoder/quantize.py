"""Weight-only quantization of an exported decoder with ONNX Runtime's ``MatMulNBitsQuantizer``
(MatMul weights -> ``MatMulNBits``, optionally the embedding Gather -> ``GatherBlockQuantized``),
every candidate checked against the fp32 ONNX parent, and the choice of one within a perplexity goal.

Algorithms (``WeightOnlyScheme.algorithm``):

- ``rtn``: ORT's default blockwise affine quantization (round to nearest), 4 or 8 bits.
- ``hqq``: Half-Quadratic Quantization (4 bits), calibration-free: optimises each block's scale and
  zero point for the weight error; better than round to nearest at the same size.
- ``gptq``: GPTQ (4 bits) with ORT's bundled implementation, calibrated on token blocks of the train
  split (the Hessian of each MatMul's input); the slowest to produce. Optimum exports only (on the
  fused graph it gave perplexity 4e4 on SmolLM2).
- ``k_quant``: ORT's k-quant (llama.cpp's search for each block's scale), 4 or 8 bits.

On a fused export (``genai_config.json`` beside the model: edgeft.decoder.genai) ``rtn`` and ``k_quant``
candidates are built by onnxruntime-genai's builder from the Hugging Face folder: it shares one
quantized matrix between a tied embedding and the lm_head, and ``int8_groups`` keeps layer groups
at 8 bits in a 4-bit model (``last_matmul``: the lm_head; ``mixed_layers``: llama.cpp's Q4_K_M choice of
sensitive layers). ``hqq`` there quantizes the fused graph's MatMuls in place.

Never ``quantize_dynamic(per_channel=True)``: with onnxruntime 1.32 it gives garbage on these
decoders (perplexity 1.7e7 on SmolLM2). :func:`check_candidate` catches such a model whatever made
it: a non-finite perplexity, teacher-forced top-1 agreement with the parent below
:data:`MIN_TOP1_AGREEMENT` or a perplexity more than :data:`MAX_SANE_INCREASE` above the parent's
rejects it outright; a rejected candidate is never chosen, not even as the best on a miss.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgeft.errors import DataError, ModelError

ONNX_NAME = "model.onnx"
ALGORITHMS = ("rtn", "hqq", "gptq", "k_quant")
INT8_GROUPS = ("last_matmul", "mixed_layers")  # onnxruntime-genai's matmul_mixed_precision selectors
BITS = (4, 8)
DEFAULT_MAX_PERPLEXITY_INCREASE = 0.02   # relative: 2%
MIN_TOP1_AGREEMENT = 0.5                 # below this the candidate is garbage, whatever its perplexity
MAX_SANE_INCREASE = 1.0                  # perplexity more than doubled: garbage
GPTQ_MIN_BLOCKS = 2


@dataclass(frozen=True)
class WeightOnlyScheme:
    """One weight-only quantization: bits, block size, symmetry, algorithm; ``embedding`` also
    quantizes the token embedding (Gather) to 4 bits with the same block size (round to nearest,
    whatever the MatMuls' algorithm); ``accuracy_level``
    is MatMulNBits' compute type (4, the default: int8 activations, 17x faster for 8-bit on
    SmolLM2 with ORT 1.32; None: ORT's default, which dequantizes to fp32 on every call)."""

    bits: int = 8
    block_size: int = 32
    symmetric: bool = True
    algorithm: str = "rtn"
    embedding: bool = False
    accuracy_level: int | None = 4
    int8_groups: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "int8_groups", tuple(self.int8_groups))
        bad = [g for g in self.int8_groups if g not in INT8_GROUPS]
        if bad:
            raise ModelError(f"int8 group '{bad[0]}' is not known", f"use {' and/or '.join(INT8_GROUPS)}")
        if self.int8_groups and self.bits != 4:
            raise ModelError("int8_groups keeps some layers at 8 bits in a 4-bit model", "set bits: 4, or drop int8_groups")
        if self.algorithm not in ALGORITHMS:
            raise ModelError(f"weight-only algorithm '{self.algorithm}' is not known", f"use one of {', '.join(ALGORITHMS)}")
        if self.bits not in BITS:
            raise ModelError(f"weight-only quantization to {self.bits} bits is not supported", "use 4 or 8 bits")
        if self.algorithm in ("hqq", "gptq") and self.bits != 4:
            raise ModelError(f"{self.algorithm} quantizes to 4 bits only, not {self.bits}", "use bits: 4, or algorithm rtn")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ModelError(f"block size {self.block_size} is not a power of two >= 16", "use 16, 32, 64 or 128")
        if self.algorithm == "hqq" and self.symmetric:
            raise ModelError("hqq is asymmetric (it optimises a zero point per block)", "set symmetric: false for hqq")
        if self.embedding and self.bits != 4:
            raise ModelError("ONNX Runtime quantizes the embedding (Gather) to 4 bits only", "set embedding: false for 8 bits")
        if self.accuracy_level not in (None, 0, 1, 2, 3, 4):
            raise ModelError(f"accuracy_level {self.accuracy_level} is not a MatMulNBits accuracy level", "use 0-4")

    @property
    def name(self) -> str:
        parts = [f"int{self.bits}", self.algorithm, f"b{self.block_size}", "sym" if self.symmetric else "asym"]
        if self.embedding:
            parts.append("emb")
        if self.int8_groups:
            parts.append("int8-" + "+".join(self.int8_groups))
        if self.accuracy_level is not None:
            parts.append(f"acc{self.accuracy_level}")
        return "-".join(parts)

    def describe(self) -> dict:
        return {"name": self.name, **asdict(self)}


class BlockReader:
    """ORT CalibrationDataReader over token blocks: one ``[1, L]`` block (empty past) per call."""

    def __init__(self, blocks: np.ndarray, input_names: list[str], kv_shape: tuple[int, int], kv_dtype=np.float32):
        self.blocks, self.names, self.kv_shape, self.kv_dtype = np.asarray(blocks, np.int64), input_names, kv_shape, kv_dtype
        self.i = 0

    def get_next(self):
        if self.i >= len(self.blocks):
            return None
        ids = self.blocks[self.i:self.i + 1]
        self.i += 1
        s = ids.shape[1]
        feeds = {"input_ids": ids}
        if "attention_mask" in self.names:
            feeds["attention_mask"] = np.ones_like(ids)
        if "position_ids" in self.names:
            feeds["position_ids"] = np.arange(s, dtype=np.int64)[None]
        heads, head_dim = self.kv_shape
        for n in self.names:
            if n.startswith("past_key_values."):
                feeds[n] = np.zeros((1, heads, 0, head_dim), dtype=self.kv_dtype)
        return feeds

    def __iter__(self):
        return self

    def __next__(self):
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


def _algo_config(scheme: WeightOnlyScheme, calibration: np.ndarray | None, src: Path):
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    ops = ("MatMul", "Gather") if scheme.embedding and scheme.algorithm == "rtn" else ("MatMul",)
    if scheme.algorithm == "hqq":
        return mnq.HQQWeightOnlyQuantConfig(block_size=scheme.block_size, bits=4, op_types_to_quantize=ops)
    if scheme.algorithm == "gptq":
        if calibration is None or len(calibration) < GPTQ_MIN_BLOCKS:
            raise DataError(f"gptq needs at least {GPTQ_MIN_BLOCKS} calibration token blocks from the train split",
                            "pass calibration blocks, or use algorithm rtn or hqq")
        from edgeft.decoder.generate import OrtDecoder

        dec = OrtDecoder(src, threads=1)
        reader = BlockReader(calibration, dec.input_names, (dec.kv_heads, dec.head_dim), dec.kv_dtype)
        return mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=reader, block_size=128, perchannel=True,
                                             op_types_to_quantize=("MatMul",))
    if scheme.algorithm == "k_quant":
        return mnq.KQuantWeightOnlyQuantConfig(op_types_to_quantize=("MatMul",))
    return mnq.DefaultWeightOnlyQuantConfig(block_size=scheme.block_size, is_symmetric=scheme.symmetric,
                                            accuracy_level=scheme.accuracy_level, bits=scheme.bits,
                                            op_types_to_quantize=ops, quant_axes=(("MatMul", 0), ("Gather", 1)))


def set_accuracy_level(model, level: int) -> int:
    """Set ``accuracy_level`` on every MatMulNBits node (ORT's HQQ and GPTQ paths do not take it; without
    it, ORT 1.32's CPU kernels dequantize to fp32 on every call: 8-bit RTN ran at 4 tok/s, with level 4
    at 71 tok/s on SmolLM2, 1 thread). Returns the number of nodes set."""
    from onnx import helper

    n = 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*kept, helper.make_attribute("accuracy_level", int(level))])
            n += 1
    return n


@contextlib.contextmanager
def _silence():
    """ORT's quantizer logs through python logging at INFO/ERROR level (it calls basicConfig on import)."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(previous)


def is_fused(onnx_path: str | Path) -> bool:
    """A fused export (onnxruntime-genai's builder wrote it)?"""
    from edgeft.decoder.genai import GENAI_CONFIG

    return (Path(onnx_path).parent / GENAI_CONFIG).is_file()


def builder_options(scheme: WeightOnlyScheme) -> tuple[str, dict[str, str]]:
    """The onnxruntime-genai builder's precision and extra options for ``scheme``."""
    opts = {"block_size": str(scheme.block_size), "is_symmetric": str(scheme.symmetric).lower(),
            "algo_config": scheme.algorithm}
    if scheme.accuracy_level is not None:
        opts["accuracy_level"] = str(scheme.accuracy_level)
    if scheme.embedding:
        opts["op_types_to_quantize"] = "MatMul/Gather"
    else:  # the builder would share (and so quantize) a tied embedding with the lm_head
        opts.update(op_types_to_quantize="MatMul", shared_embeddings="false")
    if scheme.int8_groups:
        opts["matmul_mixed_precision"] = ",".join(f"{g}:int8" for g in scheme.int8_groups)
    return f"int{scheme.bits}", opts


def check_scheme_for_exporter(scheme: WeightOnlyScheme, exporter: str) -> None:
    """One-line errors for a scheme the export cannot take (called before a run folder is made)."""
    _check_for_graph(scheme, exporter == "genai")
    if exporter == "genai":
        from edgeft.decoder import genai

        genai.require()


def _check_for_graph(scheme: WeightOnlyScheme, fused: bool) -> None:
    if fused and scheme.algorithm == "gptq":
        raise ModelError("gptq is for optimum exports (on the fused graph it gave garbage)",
                         "use k_quant, hqq or rtn, or set compress.exporter: optimum")
    if scheme.int8_groups and not fused:
        raise ModelError("int8_groups needs the fused export (onnxruntime-genai's builder)",
                         "set compress.exporter: genai, or drop int8_groups")


def _check_source(scheme: WeightOnlyScheme, fused: bool, source_model) -> None:
    if fused and scheme.algorithm in ("rtn", "k_quant") and source_model is None:
        raise ModelError("a fused export is quantized by onnxruntime-genai's builder from the Hugging Face folder",
                         "pass source_model (the folder the fp32 export came from)")


def quantize_weight_only(src: str | Path, dst_dir: str | Path, scheme: WeightOnlyScheme, *,
                         calibration: np.ndarray | None = None, source_model: str | Path | None = None) -> Path:
    """Quantize ``src`` (an fp32 decoder ``model.onnx``) into ``dst_dir/model.onnx`` with ``scheme``;
    the parent folder's config/tokenizer files are copied beside it. Built aside and swapped in whole.
    A fused ``src`` with ``rtn`` / ``k_quant`` is rebuilt by onnxruntime-genai's builder from
    ``source_model`` (the Hugging Face folder ``src`` was exported from)."""
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from edgeft.artifacts import atomic_dir
    from edgeft.export import quiet_logs
    from edgeft.safeio import load_onnx_checked

    src, dst_dir = Path(src), Path(dst_dir)
    fused = is_fused(src)
    _check_for_graph(scheme, fused)
    _check_source(scheme, fused, source_model)
    if fused and scheme.algorithm in ("rtn", "k_quant"):
        from edgeft.decoder import genai

        precision, opts = builder_options(scheme)
        with atomic_dir(dst_dir) as tmp:
            built = genai.build(source_model, tmp / ".build", precision=precision, options=opts)
            for p in built.parent.iterdir():
                shutil.move(str(p), tmp / p.name)
            shutil.rmtree(built.parent, ignore_errors=True)
            load_onnx_checked(tmp / ONNX_NAME)
        return dst_dir / ONNX_NAME
    model = load_onnx_checked(src)
    config = _algo_config(scheme, calibration, src)
    with atomic_dir(dst_dir) as tmp:
        with quiet_logs(), _silence(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = MatMulNBitsQuantizer(model, bits=scheme.bits, block_size=scheme.block_size,
                                     is_symmetric=scheme.symmetric, accuracy_level=scheme.accuracy_level,
                                     algo_config=config)
            q.process()
        out = q.model.model if hasattr(q.model, "model") else q.model
        if scheme.embedding and scheme.algorithm != "rtn":
            # hqq/gptq quantize MatMuls only: the embedding Gather gets round-to-nearest 4 bits in a second pass
            emb = mnq.DefaultWeightOnlyQuantConfig(block_size=scheme.block_size, is_symmetric=scheme.symmetric,
                                                   bits=4, op_types_to_quantize=("Gather",),
                                                   quant_axes=(("MatMul", 0), ("Gather", 1)))
            with quiet_logs(), _silence(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                q2 = MatMulNBitsQuantizer(out, bits=4, block_size=scheme.block_size, algo_config=emb)
                q2.process()
            out = q2.model.model
        if scheme.accuracy_level is not None:
            set_accuracy_level(out, scheme.accuracy_level)
        if not any(o.domain == "com.microsoft" for o in out.opset_import):  # ORT's GPTQ path leaves it out
            out.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
        if fused:  # the genai runtime reads the builder's external-data layout
            onnx.save_model(out, str(tmp / ONNX_NAME), save_as_external_data=True, location=ONNX_NAME + ".data")
        else:
            onnx.save_model(out, str(tmp / ONNX_NAME))
        for p in src.parent.iterdir():
            if p.is_file() and not p.is_symlink() and p.suffix not in (".onnx", ".onnx_data", ".data") \
                    and not p.name.startswith("."):
                shutil.copyfile(p, tmp / p.name)
        load_onnx_checked(tmp / ONNX_NAME)
    return dst_dir / ONNX_NAME


@dataclass
class CandidateCheck:
    """A quantized candidate measured against its fp32 ONNX parent."""

    name: str
    path: str
    size_mb: float
    perplexity: float
    parent_perplexity: float
    perplexity_increase: float        # relative: 0.02 = +2%
    top1_agreement: float             # teacher-forced next-token agreement with the parent
    greedy_prefix: float              # mean fraction of each prompt's greedy tokens equal to the parent's
    decode_tok_s: float | None = None
    rejected: bool = False
    problems: list[str] = field(default_factory=list)
    scheme: dict | None = None

    def summary(self) -> dict:
        return asdict(self)


@dataclass
class ParentReference:
    """What every candidate is compared with: the fp32 ONNX model's scores and greedy tokens."""

    path: str
    perplexity: object      # edgeft.decoder.evaluate.Perplexity
    greedy: list[list[int]]
    prompts: list[list[int]]
    new_tokens: int


def parent_reference(parent_onnx: str | Path, blocks: np.ndarray, prompts: list[list[int]], *,
                     new_tokens: int = 32, threads: int | None = None) -> ParentReference:
    from edgeft.decoder.evaluate import ort_perplexity
    from edgeft.decoder.generate import OrtDecoder

    dec = OrtDecoder(parent_onnx, threads=threads)
    return ParentReference(str(parent_onnx), ort_perplexity(dec, blocks), [dec.generate(p, new_tokens).tokens
                                                                            for p in prompts], prompts, new_tokens)


def onnx_size_mb(path: str | Path) -> float:
    """An exported model's size in MB: the .onnx file and its external data beside it (``model.onnx_data``)."""
    from edgeft.hardware import MB

    path = Path(path)
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file() and p.name.startswith(path.name)) / MB


def check_candidate(path: str | Path, parent: ParentReference, blocks: np.ndarray, *, name: str | None = None,
                    scheme: WeightOnlyScheme | None = None, measure_speed: bool = True,
                    threads: int | None = None) -> CandidateCheck:
    """Perplexity, top-1 agreement and greedy-token agreement of ``path`` vs the parent (and decode
    tok/s on the first prompt). Garbage is marked ``rejected`` (see the module docstring)."""
    from edgeft.decoder.evaluate import ort_perplexity, top1_agreement
    from edgeft.decoder.generate import OrtDecoder, common_prefix

    path = Path(path)
    dec = OrtDecoder(path, threads=threads)
    ppl = ort_perplexity(dec, blocks)
    base = parent.perplexity.perplexity
    value = ppl.perplexity
    increase = (value - base) / base if math.isfinite(value) else float("inf")
    agree = top1_agreement(ppl, parent.perplexity)
    prefixes, speed = [], None
    for prompt, ref in zip(parent.prompts, parent.greedy):
        res = dec.generate(prompt, parent.new_tokens)
        prefixes.append(common_prefix(res.tokens, ref) / len(ref))
    if measure_speed and parent.prompts:  # after the runs above: a warm session
        speed = max(dec.generate(parent.prompts[0], parent.new_tokens).decode_tok_s for _ in range(2))
    problems = []
    if not math.isfinite(value):
        problems.append("perplexity is not finite")
    elif increase > MAX_SANE_INCREASE:
        problems.append(f"perplexity {value:.4g} is more than {1 + MAX_SANE_INCREASE:g}x the parent's {base:.4g}")
    if agree < MIN_TOP1_AGREEMENT:
        problems.append(f"next-token agreement with the parent {agree:.3f} < {MIN_TOP1_AGREEMENT}")
    size = onnx_size_mb(path)
    return CandidateCheck(name or path.parent.name, str(path), size, value, base, increase, agree,
                          float(np.mean(prefixes)) if prefixes else 1.0, speed, bool(problems), problems,
                          scheme.describe() if scheme else None)


@dataclass
class Choice:
    chosen: CandidateCheck | None
    goal_met: bool
    reason: str
    candidates: list[CandidateCheck]

    def summary(self) -> dict:
        return {"chosen": self.chosen.name if self.chosen else None, "goal_met": self.goal_met,
                "reason": self.reason, "candidates": [c.summary() for c in self.candidates]}


def choose(candidates: list[CandidateCheck], *, max_perplexity_increase: float = DEFAULT_MAX_PERPLEXITY_INCREASE,
           by: str = "speed") -> Choice:
    """Among candidates that are not rejected and within ``max_perplexity_increase`` (relative), the
    fastest (``by="speed"``: decode tok/s, when every such candidate has it) or the smallest
    (``by="size"``); ties go to the smaller, then the lower perplexity. On a miss keep the best (the
    lowest perplexity among the non-rejected) with ``goal_met=False``. Every candidate rejected ->
    ModelError (garbage is never chosen)."""
    if by not in ("speed", "size"):
        raise ValueError(f"by={by!r}")
    sane = [c for c in candidates if not c.rejected]
    if not sane:
        why = "; ".join(f"{c.name}: {', '.join(c.problems)}" for c in candidates) or "no candidates"
        raise ModelError(f"every quantized candidate failed the checks ({why})",
                         "keep the fp32 ONNX model, or try 8 bits / a smaller block size")
    meeting = [c for c in sane if c.perplexity_increase <= max_perplexity_increase]
    if meeting:
        fast = by == "speed" and all(c.decode_tok_s is not None and math.isfinite(c.decode_tok_s) for c in meeting)
        key = (lambda c: (-c.decode_tok_s, c.size_mb, c.perplexity)) if fast else \
            (lambda c: (c.size_mb, c.perplexity))
        best = min(meeting, key=key)
        return Choice(best, True, f"{len(meeting)} of {len(candidates)} within +{max_perplexity_increase:.1%} "
                                  f"perplexity; {'fastest' if fast else 'smallest'} kept", candidates)
    best = min(sane, key=lambda c: (c.perplexity, c.size_mb))
    return Choice(best, False, f"no candidate within +{max_perplexity_increase:.1%} perplexity; the best "
                               f"({best.name}, {best.perplexity_increase:+.1%}) kept", candidates)


def quantize_and_choose(parent_onnx: str | Path, work_dir: str | Path, schemes: list[WeightOnlyScheme],
                        blocks: np.ndarray, prompts: list[list[int]], *, calibration: np.ndarray | None = None,
                        max_perplexity_increase: float = DEFAULT_MAX_PERPLEXITY_INCREASE, by: str = "speed",
                        new_tokens: int = 32, threads: int | None = None,
                        source_model: str | Path | None = None) -> Choice:
    """Quantize ``parent_onnx`` with every scheme into ``work_dir/<scheme name>/``, check each and
    choose one (see :func:`choose`). The caller moves the chosen folder where it belongs."""
    if not schemes:
        raise ModelError("no weight-only schemes to try", "give at least one scheme (e.g. int8 rtn block 32)")
    work_dir = Path(work_dir)
    parent = parent_reference(parent_onnx, blocks, prompts, new_tokens=new_tokens, threads=threads)
    checks = []
    for s in schemes:
        path = quantize_weight_only(parent_onnx, work_dir / s.name, s, calibration=calibration,
                                    source_model=source_model)
        checks.append(check_candidate(path, parent, blocks, name=s.name, scheme=s, threads=threads))
    return choose(checks, max_perplexity_increase=max_perplexity_increase, by=by)
