"""Decoder (causal) language models: the built-in GGUF-packaged model, corpora, ONNX export with KV
cache, weight-only quantization, a lean ONNX Runtime generate loop and perplexity.

Small typed functions; the recipe/CLI wiring lives elsewhere. Every bad input is an
:class:`edgeft.errors.EdgeftError` with a one-line message, raised before anything is written.
"""
