from pathlib import Path

import pytest

from edgeft.errors import RecipeError
from edgeft.recipe import Recipe, load_recipe, recipe_reference

RECIPES = sorted(Path(__file__).parents[2].joinpath("recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path, tmp_path):
    r = load_recipe(path)
    assert isinstance(r, Recipe)
    # The resolved recipe round-trips through YAML unchanged.
    out = tmp_path / path.name
    out.write_text(r.to_yaml())
    assert load_recipe(out) == r


def test_shipped_defaults_exist():
    names = {p.name for p in RECIPES}
    assert {"minilm-rotten-tomatoes.yaml", "minilm-20newsgroups.yaml"} <= names


@pytest.mark.parametrize("override, message", [
    ("finetune.lr=-1", "finetune.lr: must be > 0"),
    ("finetune.lrr=1", "finetune.lrr: unknown field; did you mean 'lr'?"),
    ("finetune.epochs=abc", "finetune.epochs: must be a valid integer"),
    ("compress.prune.heads=1.5", "compress.prune.heads: must be < 1"),
    ("data.validation_fraction=0", "data.validation_fraction: must be > 0"),
    ("stages=[bench,finetune]", "stages: must be in the order"),
    ("bench.batch_sizes=[]", "bench.batch_sizes: must be a non-empty list"),
    ("finetune.method=qlora", "finetune.method: must be 'full' or 'lora'"),
])
def test_bad_fields_name_their_path(override, message):
    with pytest.raises(RecipeError) as e:
        load_recipe(None, [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_overrides_are_typed_and_nested():
    r = load_recipe(None, ["finetune.epochs=3", "finetune.lr=1e-4", "compress.prune=null", "bench.seq_lengths=[32, 64]"])
    assert r.finetune.epochs == 3 and r.finetune.lr == pytest.approx(1e-4)
    assert r.compress.prune is None and r.bench.seq_lengths == [32, 64]


def test_override_without_equals_is_an_error():
    with pytest.raises(RecipeError, match="not KEY=VALUE"):
        load_recipe(None, ["finetune.epochs"])


def test_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("finetune:\n  epochs: [1,\n")
    with pytest.raises(RecipeError, match="invalid YAML at line"):
        load_recipe(bad)
    dup = tmp_path / "dup.yaml"
    dup.write_text("finetune:\n  epochs: 1\n  epochs: 2\n")
    with pytest.raises(RecipeError, match="duplicate key 'epochs'"):
        load_recipe(dup)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="mapping at the top level"):
        load_recipe(top)
    code = tmp_path / "code.yaml"
    code.write_text("name: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(RecipeError):  # the safe loader never runs code
        load_recipe(code)


def test_reference_lists_every_section():
    table = recipe_reference()
    for field in ("finetune.lr", "compress.prune.heads", "compress.quantize.calibration.method", "bench.runtimes"):
        assert f"`{field}`" in table
