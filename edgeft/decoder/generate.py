"""Greedy generation: a lean ONNX Runtime loop over an optimum-exported decoder with KV cache, and
the torch reference loop it is checked against.

The ORT loop binds its inputs and outputs with IO binding: each step's ``present.*`` outputs stay
OrtValues and are bound as the next step's ``past_key_values.*`` inputs (no copy through numpy);
the attention mask and position ids are views of arrays allocated once for the whole generation.
Prompt (prefill) and decode time are counted separately: time to first token, prompt tok/s and
decode tok/s (new tokens after the first, per second of decode steps).

``OrtDecoder.stream`` is the step API the server uses: the same loop as a generator of token ids,
greedy or sampled (:class:`Sampling`: temperature, top-p, seed); closing it stops the computation.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgeft.errors import DataError, ModelError

PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."
_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


@dataclass
class GenerateResult:
    """Tokens generated after the prompt, and where the time went."""

    tokens: list[int]
    prompt_tokens: int
    ttft_s: float           # prompt in -> first new token out (prefill + argmax)
    decode_s: float         # the remaining len(tokens) - 1 steps
    stopped_at_eos: bool = False
    runtime: str = "onnxruntime"
    extra: dict = field(default_factory=dict)

    @property
    def prompt_tok_s(self) -> float:
        return self.prompt_tokens / self.ttft_s if self.ttft_s > 0 else float("inf")

    @property
    def decode_tok_s(self) -> float:
        steps = len(self.tokens) - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")

    def summary(self) -> dict:
        out = asdict(self)
        out.update(prompt_tok_s=self.prompt_tok_s, decode_tok_s=self.decode_tok_s, new_tokens=len(self.tokens))
        return out


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked from the logits: ``temperature`` 0 is greedy (arg-max, no RNG);
    above 0 the softmax of logits / temperature, cut to the smallest set of tokens whose probability
    reaches ``top_p`` (nucleus sampling), sampled with a generator seeded by ``seed`` (None: fresh
    entropy, so two requests differ)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise DataError(f"temperature {self.temperature} must be a number >= 0", "use 0 (greedy) to 2")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise DataError(f"top_p {self.top_p} must be in (0, 1]", "use e.g. 0.9, or 1 for no cut")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def rng(self) -> np.random.Generator | None:
        return None if self.greedy else np.random.default_rng(self.seed)


GREEDY = Sampling()


def sample_next(logits: np.ndarray, sampling: Sampling = GREEDY, rng: np.random.Generator | None = None) -> int:
    """The next token id from one position's logits [vocab] (see :class:`Sampling`)."""
    if sampling.greedy:
        return int(np.argmax(logits))
    z = np.asarray(logits, dtype=np.float64) / sampling.temperature
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    if sampling.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = order[:int(np.searchsorted(cum, sampling.top_p)) + 1]  # at least one token
        q = p[keep] / p[keep].sum()
        return int(keep[(rng or np.random.default_rng()).choice(len(keep), p=q)])
    return int((rng or np.random.default_rng()).choice(len(p), p=p))


def check_prompt(prompt_ids, max_new_tokens: int, context: int) -> list[int]:
    """The prompt as a list of ints; a one-line DataError when it is empty or it and the new tokens
    do not fit the model's context."""
    ids = [int(i) for i in np.asarray(prompt_ids).reshape(-1)]
    if not ids:
        raise DataError("the prompt is empty (0 tokens)", "pass a prompt of at least one token")
    if max_new_tokens < 1:
        raise DataError(f"max_new_tokens={max_new_tokens} must be at least 1", "ask for one or more new tokens")
    if len(ids) + max_new_tokens > context:
        raise DataError(f"the prompt has {len(ids)} tokens; with {max_new_tokens} new tokens that exceeds the model's "
                        f"context of {context} tokens", f"shorten the prompt to at most {context - max_new_tokens} "
                        "tokens or ask for fewer new tokens")
    return ids


class OrtDecoder:
    """An ONNX Runtime session over an exported decoder (``model.onnx`` with ``past_key_values.*``
    inputs and ``present.*`` outputs, as optimum's ``text-generation-with-past`` writes it)."""

    def __init__(self, path: str | Path, *, threads: int | None = None, spinning: bool = True):
        from edgeft.onnx_eval import make_session

        self.path = Path(path)
        self.session = make_session(self.path, threads=threads, spinning=spinning)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_names = list(inputs)
        self.past_names = [n for n in inputs if n.startswith(PAST_PREFIX)]
        outputs = [o.name for o in self.session.get_outputs()]
        if "input_ids" not in inputs or "logits" not in outputs or not self.past_names:
            raise ModelError(f"{self.path} is not a decoder with KV cache (inputs: {', '.join(inputs)[:120]})",
                             "export it with edgeft.decoder.export (text-generation-with-past)")
        self.present_names = [PRESENT_PREFIX + n[len(PAST_PREFIX):] for n in self.past_names]
        missing = [n for n in self.present_names if n not in outputs]
        if missing:
            raise ModelError(f"{self.path} has no output {missing[0]} for its input {self.past_names[0]}",
                             "export it with edgeft.decoder.export")
        self.has_position_ids = "position_ids" in inputs
        self.has_attention_mask = "attention_mask" in inputs
        first = inputs[self.past_names[0]]
        self.kv_dtype = _NP_TYPES.get(first.type, np.float32)
        heads, head_dim = self._kv_dims(first.shape)
        self.kv_heads, self.head_dim = heads, head_dim
        self.context = folder_context_length(self.path.parent)
        # onnxruntime-genai's builder writes GroupQueryAttention, which updates a shared KV buffer in place
        self.shares_kv = (self.path.parent / "genai_config.json").is_file()
        self.vocab = int(_config(self.path.parent).get("vocab_size") or 0)
        if self.shares_kv and not self.vocab:
            self.shares_kv = False  # no config.json beside it: the per-step present tensors work everywhere

    def _kv_dims(self, shape) -> tuple[int, int]:
        dims = list(shape)
        if len(dims) == 4 and isinstance(dims[1], int) and isinstance(dims[3], int):
            return dims[1], dims[3]
        cfg = _config(self.path.parent)
        heads = cfg.get("num_key_value_heads") or cfg.get("num_attention_heads")
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        return int(heads), int(head_dim)

    def empty_past(self, batch: int) -> np.ndarray:
        return np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype)

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Logits [batch, seq, vocab] of full blocks (no past): for perplexity."""
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        b, s = ids.shape
        feeds = {"input_ids": ids}
        if self.has_attention_mask:
            feeds["attention_mask"] = np.ones((b, s), dtype=np.int64)
        if self.has_position_ids:
            feeds["position_ids"] = np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)).copy()
        past = self.empty_past(b)
        for n in self.past_names:
            feeds[n] = past
        return self.session.run(["logits"], feeds)[0]

    def generate(self, prompt_ids, max_new_tokens: int, *, eos_token_id: int | None = None) -> GenerateResult:
        """Greedy decoding of up to ``max_new_tokens`` after ``prompt_ids`` (batch 1); stops after
        ``eos_token_id`` when one is given. Times the prefill (to the first token) and every decode step."""
        ids = check_prompt(prompt_ids, max_new_tokens, self.context)
        steps = self._steps(ids, max_new_tokens, GREEDY, frozenset() if eos_token_id is None else {int(eos_token_id)})
        t0 = time.perf_counter()
        tokens = [next(steps)]
        t1 = t_step = time.perf_counter()
        step_s = []  # each decode step's seconds (extra["decode_step_s"]): the gate's raw samples
        for token in steps:
            tokens.append(token)
            t_prev, t_step = t_step, time.perf_counter()
            step_s.append(t_step - t_prev)
        stopped = eos_token_id is not None and tokens[-1] == eos_token_id
        return GenerateResult(tokens, len(ids), t1 - t0, t_step - t1, stopped_at_eos=stopped, extra={"decode_step_s": step_s})

    def stream(self, prompt_ids, max_new_tokens: int, *, sampling: Sampling = GREEDY,
               stop_token_ids: Iterable[int] = (), feed: list[int] | None = None) -> Iterator[int]:
        """New token ids one at a time after ``prompt_ids`` (batch 1): up to ``max_new_tokens``, ending
        after the first of ``stop_token_ids`` (yielded). Greedy by default (then the tokens are
        :meth:`generate`'s). The prompt is checked here, at the call (a one-line DataError); closing the
        generator (``close()``, or leaving a ``for`` loop) stops it before the next model step, so a
        caller whose client left frees the session at once.

        ``feed`` (teacher forcing): the i-th token fed back to the model is ``feed[i]`` instead of its
        i-th pick, through the same KV-cache steps; what is yielded is still the model's own pick."""
        ids = check_prompt(prompt_ids, max_new_tokens, self.context)
        if feed is not None and len(feed) < max_new_tokens - 1:
            raise DataError(f"feed has {len(feed)} tokens for {max_new_tokens} steps", "give max_new_tokens - 1 or more")
        return self._steps(ids, max_new_tokens, sampling, frozenset(int(t) for t in stop_token_ids), feed)

    def _steps(self, ids: list[int], max_new_tokens: int, sampling: Sampling, stops: frozenset,
               feed: list[int] | None = None) -> Iterator[int]:
        """The decode loop (prompt checked by the caller). A fused graph (GroupQueryAttention) reads and
        writes one KV buffer per layer, allocated once for prompt + new tokens and bound as both its past
        input and its present output; each step then binds only the new token, the mask and the logits.
        Other graphs get each step's ``present.*`` OrtValues bound as the next step's past."""
        n, total = len(ids), len(ids) + max_new_tokens
        mask = np.ones((1, total), dtype=np.int64)  # allocated once; each step binds a view
        positions = np.arange(total, dtype=np.int64).reshape(1, total)
        step_ids = np.zeros((1, 1), dtype=np.int64)
        binding = self.session.io_binding()
        rng = sampling.rng()

        def bind_step(input_ids: np.ndarray, length: int, start: int):
            binding.bind_cpu_input("input_ids", input_ids)
            if self.has_attention_mask:
                binding.bind_cpu_input("attention_mask", mask[:, :length])
            if self.has_position_ids:
                binding.bind_cpu_input("position_ids", positions[:, start:length])

        bind_step(np.asarray([ids], dtype=np.int64), n, 0)
        past = self.empty_past(1)
        for name in self.past_names:
            binding.bind_cpu_input(name, past)
        for name in ("logits", *self.present_names):
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        outs = binding.get_outputs()
        last = outs[0].numpy()[0, -1]
        if self.shares_kv:  # the prompt's keys/values into buffers for every position, then bound in place
            from onnxruntime import OrtValue

            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
            buffers = []  # the OrtValues (and the arrays they wrap) must outlive the binding
            for past_name, present_name, value in zip(self.past_names, self.present_names, outs[1:]):
                kv = np.zeros((1, self.kv_heads, total, self.head_dim), self.kv_dtype)
                kv[:, :, :n] = value.numpy()
                buffers.append(OrtValue.ortvalue_from_numpy(kv))
                binding.bind_ortvalue_input(past_name, buffers[-1])
                binding.bind_ortvalue_output(present_name, buffers[-1])
            logits = OrtValue.ortvalue_from_numpy(np.zeros((1, 1, self.vocab), np.float32))
            binding.bind_ortvalue_output("logits", logits)
        produced, length = 0, n
        while True:
            token = sample_next(last, sampling, rng)
            produced += 1
            yield token
            if produced >= max_new_tokens or token in stops:
                return
            step_ids[0, 0] = token if feed is None else int(feed[produced - 1])
            length += 1
            if self.shares_kv:
                bind_step(step_ids, length, length - 1)
                self.session.run_with_iobinding(binding)
                last = logits.numpy()[0, -1]
                continue
            presents = outs[1:]
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
            bind_step(step_ids, length, length - 1)
            for name, value in zip(self.past_names, presents):
                binding.bind_ortvalue_input(name, value)
            for name in ("logits", *self.present_names):
                binding.bind_output(name, "cpu")
            self.session.run_with_iobinding(binding)
            outs = binding.get_outputs()
            last = outs[0].numpy()[0, -1]


def torch_greedy(model, prompt_ids, max_new_tokens: int, *, eos_token_id: int | None = None) -> GenerateResult:
    """The reference: greedy decoding with the torch model and its KV cache (batch 1, no sampling)."""
    import torch

    from edgeft.decoder.model import context_length

    ids = check_prompt(prompt_ids, max_new_tokens, context_length(model.config))
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
        token = int(out.logits[0, -1].argmax())
        t1 = time.perf_counter()
        tokens = [token]
        past = out.past_key_values
        stopped = eos_token_id is not None and token == eos_token_id
        step_s, t_step = [], t1  # as OrtDecoder.generate: extra["decode_step_s"]
        while len(tokens) < max_new_tokens and not stopped:
            out = model(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
            stopped = eos_token_id is not None and token == eos_token_id
            t_prev, t_step = t_step, time.perf_counter()
            step_s.append(t_step - t_prev)
        t2 = time.perf_counter()
    return GenerateResult(tokens, len(ids), t1 - t0, t2 - t1, stopped_at_eos=stopped, runtime="torch",
                          extra={"decode_step_s": step_s})


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two generations share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def folder_context_length(folder: Path) -> int:
    cfg = _config(folder)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(cfg.get(key), int) and cfg[key] > 0:
            return cfg[key]
    return 2048
