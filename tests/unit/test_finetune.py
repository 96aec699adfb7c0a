import json

import pytest

from edgeft.data import load_dataset
from edgeft.finetune import finetune
from edgeft.modeling import load_classifier, load_tokenizer
from edgeft.recipe import load_recipe
from edgeft.train import evaluate


def _recipe(model_dir, csv, *extra):
    return load_recipe(None, [f"model.name={model_dir}", f"data.dataset={csv}", "finetune.epochs=8",
                              "finetune.lr=3e-3", "finetune.batch_size=16", "finetune.max_length=32",
                              "finetune.warmup_ratio=0", *extra])


@pytest.mark.parametrize("method", ["full", "lora"])
def test_finetune_learns_saves_and_reloads(tiny_model_dir, tiny_csv, tmp_path, method):
    extra = ["finetune.method=lora", "finetune.lr=1e-2", "finetune.epochs=2"] if method == "lora" else []
    recipe = _recipe(tiny_model_dir, tiny_csv, *extra)
    ds = load_dataset(recipe.data, seed=recipe.seed)
    metrics = finetune(recipe, ds, tmp_path, show_progress=False)

    if method == "full":
        # It learned the toy task (label = presence of a positive word) well above the majority class.
        # (LoRA on a randomly initialised tiny base learns too slowly for a unit test; the real-model
        # integration test covers its accuracy.)
        assert metrics["test"]["accuracy"] > metrics["majority_class"]["test"] + 0.2
    assert len(metrics["epochs"]) == recipe.finetune.epochs
    assert metrics["validation"]["accuracy"] == max(e["validation_accuracy"] for e in metrics["epochs"])
    assert set(metrics["test"]["per_class"]) == {"neg", "pos"}
    assert metrics["train_samples_per_s"] > 0
    assert json.loads((tmp_path / "metrics.json").read_text())["test"] == metrics["test"]

    # The saved folder is a plain model (LoRA merged) that reloads with the same accuracy.
    out = tmp_path / "finetuned"
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    model = load_classifier(str(out))
    assert model.config.id2label == {0: "neg", 1: "pos"}
    again = evaluate(model, load_tokenizer(str(out)), ds.test, ds.label_names, max_length=32)
    assert again["accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    if method == "lora":
        assert metrics["trainable_params"] < metrics["params"]


def test_lora_unknown_target_module(tiny_model_dir, tiny_csv, tmp_path):
    from edgeft.errors import RecipeError

    recipe = _recipe(tiny_model_dir, tiny_csv, "finetune.method=lora", "finetune.lora.target_modules=[q_proj]")
    ds = load_dataset(recipe.data)
    with pytest.raises(RecipeError, match="q_proj"):
        finetune(recipe, ds, tmp_path, show_progress=False)
