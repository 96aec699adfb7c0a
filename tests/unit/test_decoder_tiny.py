"""A tiny Llama and a byte-level BPE tokenizer built in-process (helpers for the decoder tests), and
sanity tests of the helpers themselves."""

from __future__ import annotations

from pathlib import Path

TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
        "arrows of outrageous fortune, or to take arms against a sea of troubles and by opposing end them. "
        "The capital of France is Paris. Once upon a time, in a small village by the sea, there lived a fisher. "
        "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n")
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer(*, chat_template: str | None = CHATML, vocab_size: int = 400):
    """A byte-level BPE (GPT-2 style) trained on TEXT, ChatML special tokens at ids 0-2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GPT2TokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([TEXT] * 20, trainer)
    tok = GPT2TokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                            unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.chat_template = chat_template
    return tok


def make_tiny_llama(folder: Path, *, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                    context: int = 128, tie: bool = True, seed: int = 0,
                    chat_template: str | None = CHATML) -> Path:
    """A tiny random Llama causal LM + tokenizer saved as a Hugging Face folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer(chat_template=chat_template)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=context,
                      tie_word_embeddings=tie, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the default init: peaked logits, no near-ties in greedy decoding
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def test_tiny_tokenizer_round_trips():
    tok = make_tokenizer()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == TEXT
    assert tok.convert_ids_to_tokens([0, 1, 2]) == SPECIALS
    assert tok.eos_token == "<|im_end|>"


def test_tiny_llama_loads(tmp_path):
    from edgeft.decoder.model import load_causal_lm, load_tokenizer

    folder = make_tiny_llama(tmp_path / "m")
    model, tok = load_causal_lm(folder), load_tokenizer(folder)
    assert model.config.num_hidden_layers == 2
    assert tok.pad_token_id == 0
