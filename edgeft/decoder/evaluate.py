"""Perplexity on fixed-length token blocks, for torch models and ONNX decoders alike.

Both runtimes go through the same scoring (:func:`score_logits`: summed cross-entropy of each
block's next-token predictions, in float32 like the logits), so their perplexities are directly
comparable. The teacher-forced argmax of every position is kept too: the fraction of positions
where a quantized model predicts the same next token as its parent (:func:`top1_agreement`) is
what catches a garbage quantization even when a perplexity alone looks borderline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgeft.errors import DataError


@dataclass
class Perplexity:
    nll: float             # summed negative log-likelihood (nats) of the predicted tokens
    tokens: int            # predicted tokens: blocks * (block_size - 1)
    argmax: np.ndarray     # [blocks, block_size - 1] teacher-forced next-token predictions

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")

    def summary(self) -> dict:
        return {"perplexity": self.perplexity, "nll_per_token": self.nll / self.tokens if self.tokens else None,
                "tokens": self.tokens, "blocks": int(self.argmax.shape[0])}


def _check_blocks(blocks: np.ndarray) -> np.ndarray:
    blocks = np.asarray(blocks, dtype=np.int64)
    if blocks.ndim != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise DataError(f"perplexity needs token blocks of shape [n >= 1, length >= 2], got {list(blocks.shape)}",
                        "pass more text or a longer block size")
    return blocks


def score_logits(logits, blocks: np.ndarray) -> tuple[float, np.ndarray]:
    """(summed NLL, argmax [b, s-1]) of ``logits`` [b, s, vocab] predicting ``blocks[:, 1:]``."""
    import torch

    lg = torch.as_tensor(np.asarray(logits) if not isinstance(logits, torch.Tensor) else logits).float()
    lg = lg[:, :-1]
    target = torch.as_tensor(blocks[:, 1:])
    nll = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), target.reshape(-1), reduction="sum")
    return float(nll), lg.argmax(-1).numpy()


def token_nll(logits, blocks: np.ndarray) -> np.ndarray:
    """Per-token NLL [b, s-1] (float64) of ``logits`` [b, s, vocab] predicting ``blocks[:, 1:]``: for
    scoring rules other than the mean over every position (e.g. llama-perplexity's second half)."""
    import torch

    lg = torch.as_tensor(np.asarray(logits) if not isinstance(logits, torch.Tensor) else logits).double()[:, :-1]
    target = torch.as_tensor(np.asarray(blocks)[:, 1:])
    nll = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), target.reshape(-1), reduction="none")
    return nll.reshape(target.shape).numpy()


def _perplexity(logits_fn, blocks: np.ndarray, batch_size: int) -> Perplexity:
    blocks = _check_blocks(blocks)
    total, preds = 0.0, []
    for i in range(0, len(blocks), batch_size):
        chunk = blocks[i:i + batch_size]
        nll, am = score_logits(logits_fn(chunk), chunk)
        if not math.isfinite(nll):
            nll = float("inf")
        total += nll
        preds.append(am)
    return Perplexity(total, int(blocks.shape[0] * (blocks.shape[1] - 1)), np.concatenate(preds))


def torch_perplexity(model, blocks: np.ndarray, *, batch_size: int = 4) -> Perplexity:
    """Perplexity of a torch causal LM on ``blocks`` [n, block_size] (each block scored alone)."""
    import torch

    def fn(chunk):
        with torch.inference_mode():
            return model(input_ids=torch.as_tensor(chunk), use_cache=False).logits

    return _perplexity(fn, blocks, batch_size)


def ort_perplexity(decoder, blocks: np.ndarray, *, batch_size: int = 4) -> Perplexity:
    """Perplexity of an :class:`edgeft.decoder.generate.OrtDecoder` (or a path to its model.onnx)."""
    from edgeft.decoder.generate import OrtDecoder

    if not isinstance(decoder, OrtDecoder):
        decoder = OrtDecoder(decoder)
    return _perplexity(decoder.logits, blocks, batch_size)


def relative_diff(a: float, b: float) -> float:
    """|a - b| / b (inf when a is not finite)."""
    if not math.isfinite(a):
        return float("inf")
    return abs(a - b) / b


def top1_agreement(a: Perplexity, b: Perplexity) -> float:
    """Fraction of positions where two models' teacher-forced next-token predictions agree."""
    if a.argmax.shape != b.argmax.shape:
        raise ValueError("the two scores come from different token blocks")
    return float((a.argmax == b.argmax).mean())
