"""edgeft: fine-tune, compress, benchmark and gate transformer models for on-prem servers."""

__version__ = "0.1.0"
