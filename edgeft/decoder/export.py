"""ONNX export of a causal LM with KV cache, validated.

Two exporters (``exporter``):

- ``genai`` (the default): onnxruntime-genai's model builder (edgeft.decoder.genai), ONNX Runtime's
  fused graph (GroupQueryAttention, SkipSimplifiedLayerNormalization): 341 nodes for SmolLM2-135M,
  faster than optimum's (SmolLM2 fp32: 47.5 vs 41.8 tok/s at 1 thread, 61.7 vs 40.9 at 2). Llama-family models only; it keeps a tied lm_head tied (its
  quantizer shares one quantized matrix between the embedding and the lm_head).
- ``optimum``: optimum's ``text-generation-with-past`` (any causal LM optimum supports; 7,425 nodes
  for SmolLM2). The lm_head is untied from the embedding first: tied, the exporter writes it as a
  transpose of the embedding, which weight-only quantizers leave in fp32 (the largest matrix of a
  small LM).

Either export is validated against torch and the folder is only put in place when every check passes:
greedy tokens equal torch on fixed prompts, perplexity within ``ppl_rtol`` (relative) on token
blocks. A failed check raises; nothing is written.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgeft.errors import ModelError, from_os_error

ONNX_NAME = "model.onnx"
REPORT_NAME = "edgeft-export.json"
REPORT_SCHEMA = "edgeft.decoder-export/1"
# Fixed prompts whose greedy continuations must match torch token for token.
DEFAULT_PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "To be, or not to be, that is the question:",
)
DEFAULT_NEW_TOKENS = 32
DEFAULT_PPL_RTOL = 1e-3
EXPORTERS = ("genai", "optimum")


@dataclass
class ParityReport:
    """How an ONNX decoder compares with its torch parent."""

    prompts: int
    new_tokens: int
    greedy_equal: int                 # prompts whose greedy continuations equal torch's exactly
    first_mismatch: list[int | None]  # per prompt: index of the first differing token (None: equal)
    perplexity_torch: float
    perplexity_onnx: float
    perplexity_rel_diff: float
    ppl_rtol: float
    tokens_scored: int
    ok: bool
    problems: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return asdict(self)


def prompt_ids(tokenizer, prompts=DEFAULT_PROMPTS) -> list[list[int]]:
    """Token ids of ``prompts`` (plain text, no special tokens added)."""
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


def default_blocks(tokenizer, block_size: int = 64) -> np.ndarray:
    """One block from the fixed prompts (a last resort when the caller gives no validation text)."""
    ids = tokenizer(" ".join(DEFAULT_PROMPTS) * 4, add_special_tokens=False)["input_ids"]
    size = min(block_size, len(ids))
    return np.asarray([ids[:size]], dtype=np.int64)


def compare_with_torch(model, onnx_path: str | Path, prompts: list[list[int]], blocks: np.ndarray, *,
                       new_tokens: int = DEFAULT_NEW_TOKENS, ppl_rtol: float = DEFAULT_PPL_RTOL,
                       threads: int | None = None) -> ParityReport:
    """Greedy tokens (``new_tokens`` per prompt, eos ignored) and perplexity of the ONNX decoder vs
    the torch ``model``. ``ok`` only when every prompt matches and perplexity is within ``ppl_rtol``."""
    from edgeft.decoder.evaluate import ort_perplexity, relative_diff, torch_perplexity
    from edgeft.decoder.generate import OrtDecoder, common_prefix, torch_greedy

    dec = OrtDecoder(onnx_path, threads=threads)
    mismatch: list[int | None] = []
    for ids in prompts:
        ref = torch_greedy(model, ids, new_tokens).tokens
        got = dec.generate(ids, new_tokens).tokens
        k = common_prefix(ref, got)
        mismatch.append(None if k == len(ref) == len(got) else k)
    pt = torch_perplexity(model, blocks)
    po = ort_perplexity(dec, blocks)
    rel = relative_diff(po.perplexity, pt.perplexity)
    equal = sum(m is None for m in mismatch)
    problems = []
    if equal < len(prompts):
        problems.append(f"greedy tokens differ from torch on {len(prompts) - equal} of {len(prompts)} prompts "
                        f"(first mismatch at token {min(m for m in mismatch if m is not None)} of {new_tokens})")
    if not rel <= ppl_rtol:
        problems.append(f"perplexity {po.perplexity:.4f} vs torch {pt.perplexity:.4f} "
                        f"(relative difference {rel:.2e} > {ppl_rtol:g})")
    return ParityReport(len(prompts), new_tokens, equal, mismatch, pt.perplexity, po.perplexity, rel, ppl_rtol,
                        pt.tokens, not problems, problems)


def _optimum_export(src: Path, dst: Path, opset: int | None) -> None:
    from optimum.exporters.onnx import main_export

    from edgeft.export import quiet_logs

    quiet = io.StringIO()
    kwargs = {"opset": opset} if opset else {}
    try:
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet), quiet_logs(), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            main_export(str(src), output=str(dst), task="text-generation-with-past", library_name="transformers",
                        do_validation=False, device="cpu", **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        env = from_os_error(e, dst)
        if env is not None:
            raise env from None
        raise ModelError(f"ONNX export of {src} failed: {' '.join(str(e).split())[:200]}",
                         "check the model folder; edgeft exports causal LMs optimum supports") from None


def export_decoder(model_dir: str | Path, out_dir: str | Path, *, blocks: np.ndarray | None = None,
                   prompts: list[list[int]] | None = None, new_tokens: int = DEFAULT_NEW_TOKENS,
                   ppl_rtol: float = DEFAULT_PPL_RTOL, opset: int | None = None,
                   threads: int | None = None, exporter: str = "genai") -> tuple[Path, ParityReport]:
    """Export the causal LM in ``model_dir`` to ``out_dir/model.onnx`` (KV cache) with ``exporter``
    (see the module docstring), its config and tokenizer beside it, validated against torch (see :func:`compare_with_torch`;
    ``blocks`` default to one block of the fixed prompts, ``prompts`` to :data:`DEFAULT_PROMPTS`).
    A failed validation raises ModelError and leaves ``out_dir`` as it was."""
    from edgeft.artifacts import atomic_dir, write_json_atomic
    from edgeft.decoder.model import load_causal_lm, load_tokenizer, untie_lm_head
    from edgeft.safeio import check_hf_folder

    if exporter not in EXPORTERS:
        raise ModelError(f"decoder exporter '{exporter}' is not known", f"use one of {', '.join(EXPORTERS)}")
    if exporter == "genai":
        from edgeft.decoder import genai

        genai.require()
    model_dir, out_dir = check_hf_folder(model_dir), Path(out_dir)
    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir)
    prompts = prompts if prompts is not None else prompt_ids(tok)
    blocks = blocks if blocks is not None else default_blocks(tok)
    with atomic_dir(out_dir) as tmp:
        produced = tmp / ".export"
        if exporter == "genai":
            genai.build(model_dir, produced)
            untied = False
        else:
            src = tmp / ".untied"
            untied = untie_lm_head(model)
            model.save_pretrained(src, safe_serialization=True)
            tok.save_pretrained(src)
            _optimum_export(src, produced, opset)
            shutil.rmtree(src, ignore_errors=True)
        if not (produced / ONNX_NAME).is_file():
            raise ModelError(f"ONNX export of {model_dir} produced no {ONNX_NAME}", "check the model folder")
        for p in produced.iterdir():
            shutil.move(str(p), tmp / p.name)
        shutil.rmtree(produced, ignore_errors=True)
        report = compare_with_torch(model, tmp / ONNX_NAME, prompts, blocks, new_tokens=new_tokens,
                                    ppl_rtol=ppl_rtol, threads=threads)
        if not report.ok:
            raise ModelError(f"the ONNX export of {model_dir} does not match torch: {'; '.join(report.problems)}",
                             "report it as an edgeft bug; the export was not written")
        write_json_atomic(tmp / REPORT_NAME, {"schema": REPORT_SCHEMA, "source": str(model_dir),
                                              "exporter": exporter, "lm_head_untied": untied,
                                              "task": "text-generation-with-past",
                                              "validation": report.summary()})
    return out_dir / ONNX_NAME, report
