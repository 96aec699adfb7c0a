"""Shared fixtures: tiny models built in-process from a config, and tiny datasets."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ["good", "great", "fine", "superb", "bad", "awful", "poor", "dull", "movie", "plot", "actor",
         "the", "a", "was", "is", "very", "not", "story", "scene", "film"]
POSITIVE, NEGATIVE = WORDS[:4], WORDS[4:8]


def make_tiny_classifier(folder: Path, *, num_labels: int = 2, layers: int = 2, heads: int = 4,
                         hidden: int = 32, intermediate: int = 64, seed: int = 0) -> Path:
    """A tiny BERT sequence classifier + a real WordPiece tokenizer, saved as a HF folder."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=intermediate, max_position_embeddings=256, num_labels=num_labels,
                     id2label={i: f"c{i}" for i in range(num_labels)}, label2id={f"c{i}": i for i in range(num_labels)})
    model = BertForSequenceClassification(cfg).eval()
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def make_tiny_csv(path: Path, n: int = 240, seed: int = 0) -> Path:
    """Learnable toy sentiment data: label 1 iff the text holds a positive word."""
    rng = random.Random(seed)
    rows = ["text,label"]
    for i in range(n):
        label = i % 2
        key = rng.choice(POSITIVE if label else NEGATIVE)
        filler = [rng.choice(WORDS[8:]) for _ in range(rng.randint(3, 12))]
        filler.insert(rng.randint(0, len(filler)), key)
        rows.append(f"{' '.join(filler)},{'pos' if label else 'neg'}")
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_classifier(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory) -> Path:
    return make_tiny_csv(tmp_path_factory.mktemp("data") / "toy.csv")


def has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none here)")
    if not has_cuda():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random Llama + byte-level BPE tokenizer (tests/unit/test_decoder_tiny.py), built once; read-only."""
    from test_decoder_tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture(scope="session")
def tiny_llama_tok(tiny_llama):
    from edgeft.decoder.model import load_tokenizer

    return load_tokenizer(tiny_llama)


@pytest.fixture(scope="session")
def tiny_llama_blocks(tiny_llama_tok):
    """Four 48-token blocks of the tiny corpus text: the export and quantization checks' validation blocks."""
    from test_decoder_tiny import TEXT

    from edgeft.decoder.corpus import token_blocks

    return token_blocks(tiny_llama_tok, [TEXT] * 4, 48, max_blocks=4)


@pytest.fixture(scope="session")
def tiny_decoder_run(tmp_path_factory) -> Path:
    """A real text-generation run folder (`edgeft run` on a tiny recipe: the tiny Llama with an 8192-token
    context, so a generation can run long enough to be interrupted; compress int8 + int4, a short bench),
    built once (tests/unit/decoder_helpers.py); read-only: copy it to change it."""
    from decoder_helpers import make_decoder_run

    return make_decoder_run(tmp_path_factory.mktemp("decoder-run"), context=8192)
