"""Test helpers for text-generation bundles: a real decoder run folder (`edgeft run` on a tiny recipe:
the tiny random Llama of test_decoder_tiny, a toy corpus, compress with int8 + int4, a short bench),
shipped in-process."""

from __future__ import annotations

from pathlib import Path

import yaml
from test_decoder_tiny import CHATML, TEXT, make_tiny_llama


def make_decoder_run(base: Path, *, context: int = 128, chat_template: str | None = CHATML, bench: bool = True,
                     name: str = "tiny-dec", exporter: str = "optimum") -> Path:
    """``base/run``: a complete text-generation run folder (compress/onnx_fp32, candidates, report, bench)."""
    from edgeft.decoder.pipeline import run_decoder
    from edgeft.decoder.recipe import DecoderCompressConfig
    from edgeft.recipe import load_recipe

    model = make_tiny_llama(base / "llama", context=context, chat_template=chat_template)
    corpus = base / "corpus.txt"
    corpus.write_text("\n\n".join(TEXT.replace("sea", f"sea {i}") for i in range(30)))
    recipe = {"task": "text-generation", "name": name, "model": {"name": str(model)},
              "data": {"corpus": str(corpus), "block_size": 32, "eval_blocks": 2},
              "compress": {"max_perplexity_increase": 1.0, "threads": 1,
                           "schemes": [{"bits": 8, "block_size": 16}, {"bits": 4, "block_size": 16}]},
              "bench": {"threads": [1], "prompt_tokens": 8, "new_tokens": 8, "repeats": 1, "torch": False},
              "stages": ["compress", "bench"] if bench else ["compress"]}
    if "exporter" in DecoderCompressConfig.model_fields:  # optimum's graph: any causal LM, no builder process
        recipe["compress"]["exporter"] = exporter
    path = base / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return run_decoder(load_recipe(path), base / "run", show_progress=False)


def ship_run(run: Path, out: Path, **kw) -> Path:
    from edgeft.ship import ShipConfig, ship

    return ship(ShipConfig(run_dir=run, out=out, **kw)).bundle
