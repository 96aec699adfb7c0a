"""ModelRunner: the bundle's fast tokenizer + one ONNX Runtime session.

Texts are tokenized without padding, then a batch is padded to its LONGEST text (not to
max_length): short texts cost short compute. ``run`` is called from ONE thread at a time
(the batcher's worker); it is not meant for concurrent callers.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeft.errors import ModelError


@dataclass
class Encoded:
    ids: list[int]
    type_ids: list[int]

    @property
    def tokens(self) -> int:
        return len(self.ids)


@dataclass
class RunStats:
    tokenize_s: float
    compute_s: float
    batch_size: int
    padded_length: int


def _pad_token(model_dir: Path) -> str:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        p = model_dir / name
        if p.is_file():
            tok = json.loads(p.read_text(encoding="utf-8")).get("pad_token")
            if isinstance(tok, dict):
                tok = tok.get("content")
            if isinstance(tok, str):
                return tok
    return "[PAD]"


class ModelRunner:
    def __init__(self, model_dir: str | Path, onnx_path: str | Path, *, max_length: int, threads: int | None = None,
                 spinning: bool = True):
        from edgeft.onnx_eval import make_session
        from edgeft.safeio import load_fast_tokenizer

        model_dir = Path(model_dir)
        self.tokenizer = load_fast_tokenizer(model_dir)
        self.tokenizer.enable_truncation(max_length)
        self.pad_id = self.tokenizer.token_to_id(_pad_token(model_dir)) or 0
        self.max_length = max_length
        self.session = make_session(onnx_path, threads=threads, spinning=spinning)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.num_labels = int(self.session.get_outputs()[0].shape[-1]) if isinstance(
            self.session.get_outputs()[0].shape[-1], int) else None

    def encode(self, texts: list[str]) -> list[Encoded]:
        encs = self.tokenizer.encode_batch(list(texts), add_special_tokens=True)
        return [Encoded(e.ids, e.type_ids) for e in encs]

    def run_encoded(self, encs: list[Encoded]) -> np.ndarray:
        """Logits [len(encs), C] for already-tokenized texts, padded to the longest one."""
        n, width = len(encs), max(e.tokens for e in encs)
        ids = np.full((n, width), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        types = np.zeros((n, width), dtype=np.int64)
        for i, e in enumerate(encs):
            ids[i, :e.tokens] = e.ids
            mask[i, :e.tokens] = 1
            types[i, :e.tokens] = e.type_ids
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        feeds = {name: arrays[name] for name in self.input_names if name in arrays}
        missing = [name for name in self.input_names if name not in arrays]
        if missing:
            raise ModelError(f"the ONNX model wants inputs {missing} this server does not produce", "export it with edgeft")
        return np.asarray(self.session.run(None, feeds)[0], dtype=np.float32)

    def predict(self, texts: list[str]) -> tuple[np.ndarray, RunStats]:
        """Tokenize and run one batch; logits and the time split."""
        t0 = time.perf_counter()
        encs = self.encode(texts)
        t1 = time.perf_counter()
        logits = self.run_encoded(encs)
        t2 = time.perf_counter()
        return logits, RunStats(t1 - t0, t2 - t1, len(texts), max(e.tokens for e in encs))

    def batch_agreement(self, texts: list[str], batch_size: int = 32) -> dict:
        """Label agreement between batch-of-1 and batched answers for ``texts`` (dynamic int8 picks one
        activation scale per batch tensor, so a text's answer can depend on its batch-mates).

        Batches are consecutive chunks of ``texts`` in the given order (shuffle them to mimic
        serving traffic). Returns counts, the agreement fraction and the largest logit difference.
        """
        single = np.concatenate([self.predict([t])[0] for t in texts]) if texts else np.zeros((0, 0))
        batched = np.concatenate([self.predict(texts[i:i + batch_size])[0]
                                  for i in range(0, len(texts), batch_size)]) if texts else np.zeros((0, 0))
        same = int((single.argmax(-1) == batched.argmax(-1)).sum()) if len(texts) else 0
        return {"texts": len(texts), "batch_size": batch_size, "same_label": same,
                "agreement": same / len(texts) if texts else 1.0,
                "max_abs_logit_diff": float(np.abs(single - batched).max()) if len(texts) else 0.0}
