from pathlib import Path

import pytest

from edgeft.errors import RecipeError
from edgeft.recipe import Recipe, load_recipe, recipe_reference

RECIPES = sorted(Path(__file__).parents[2].joinpath("recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path, tmp_path):
    from edgeft.decoder.recipe import DecoderRecipe

    r = load_recipe(path)
    assert isinstance(r, DecoderRecipe if r.task == "text-generation" else Recipe)
    # The resolved recipe round-trips through YAML unchanged.
    out = tmp_path / path.name
    out.write_text(r.to_yaml())
    assert load_recipe(out) == r


def test_shipped_defaults_exist():
    names = {p.name for p in RECIPES}
    assert {"minilm-rotten-tomatoes.yaml", "minilm-20newsgroups.yaml", "smollm2-shakespeare.yaml"} <= names


def test_decoder_defaults_are_the_shipped_decoder_recipe():
    from edgeft.decoder.recipe import DecoderRecipe

    shipped = load_recipe(Path(__file__).parents[2] / "recipes" / "smollm2-shakespeare.yaml")
    assert shipped.model_dump() == DecoderRecipe().model_dump()


@pytest.mark.parametrize("override, message", [
    ("finetune.lr=-1", "finetune.lr: must be > 0"),
    ("finetune.lrr=1", "finetune.lrr: unknown field; did you mean 'lr'?"),
    ("finetune.epochs=abc", "finetune.epochs: must be a valid integer"),
    ("compress.prune.heads=1.5", "compress.prune.heads: must be < 1"),
    ("data.validation_fraction=0", "data.validation_fraction: must be > 0"),
    ("data.max_text_chars=0", "data.max_text_chars: must be >= 1"),
    ("data.max_text_chars=1.5", "data.max_text_chars: must be a valid integer"),
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


def test_builtin_defaults_are_the_default_recipe_file():
    # One set of defaults: the schema's built-ins are the values chosen on validation in the default recipe.
    default_file = Path(__file__).parents[2] / "recipes" / "minilm-rotten-tomatoes.yaml"
    assert load_recipe(None).model_dump() == load_recipe(default_file).model_dump()
    r = load_recipe(None)
    assert (r.finetune.batch_size, r.compress.prune.ffn, r.compress.optimize.level) == (16, 0.75, 1)


@pytest.mark.parametrize("override, message", [
    # validated at load time, before any work (they used to fail after the fine-tune)
    ("bench.runtimes=[cuda]", "bench.runtimes: unknown runtime 'cuda'"),
    ("bench.runtimes=[auto]", "bench.runtimes: auto is not a runtime name"),
    ("bench.runtimes=[]", "bench.runtimes: must be auto or a non-empty list"),
    ("compress.optimize.level=5", "compress.optimize.level: must be one of 0, 1, 2, 99"),
    ("compress.optimize.level=3", "compress.optimize.level: must be one of 0, 1, 2, 99"),
    # seeds torch accepts
    (f"seed={2**32}", "seed: must be <= 4294967295"),
    ("seed=-1", "seed: must be >= 0"),
    # the name is a run-folder name: never a path
    ("name=../../x", "name: '../../x' is not a plain name"),
    ("name=/tmp/x", "name: '/tmp/x' is not a plain name"),
    ("name=a/b", "name: 'a/b' is not a plain name"),
    ("name=..", "name: '..' is not a plain name"),
    ("name=''", "name: '' is not a plain name"),
    # strict types: a bool is not a number, a float is not an int
    ("finetune.epochs=true", "finetune.epochs: must be a valid integer (got true, a bool)"),
    ("finetune.lr=true", "finetune.lr: must be a valid number (got true, a bool)"),
    ("finetune.epochs=2.5", "finetune.epochs: must be a valid integer"),
    ("bench.batch_sizes=[true]", "bench.batch_sizes.0: must be a valid integer"),
    ("finetune.grad_clip=.inf", "finetune.grad_clip: must be a finite number"),
    ("stages=[]", "stages: name at least one of finetune, compress, bench"),
])
def test_values_refused_at_load_time(override, message):
    with pytest.raises(RecipeError) as e:
        load_recipe(None, [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_runtime_names_are_the_bench_runtimes():
    from edgeft.bench.runtimes import RUNTIMES

    for rt in RUNTIMES:
        assert load_recipe(None, [f"bench.runtimes=[{rt}]"]).bench.runtimes == [rt]


def test_strict_types_still_read_plain_yaml_numbers():
    r = load_recipe(None, ["finetune.lr=1e-4", "compress.prune.recovery.epochs=1", "compress.max_accuracy_drop=2",
                           "seed=0", f"seed={2**32 - 1}"])
    assert r.finetune.lr == pytest.approx(1e-4) and r.compress.prune.recovery.epochs == 1.0
    assert r.seed == 2**32 - 1 and r.compress.max_accuracy_drop == 2.0


@pytest.mark.parametrize("text, line", [
    ("? [a, b]\n: 1\n", 1),
    ("finetune: {[1]: x}\n", 1),
    ("finetune:\n  {a: 1}: 2\n", 2),
])
def test_unhashable_yaml_keys_are_recipe_errors(tmp_path, text, line):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert str(path) in str(e.value) and f"a key at line {line}" in str(e.value)


def test_unhashable_override_key_is_a_recipe_error():
    with pytest.raises(RecipeError, match=r"override 'finetune=\{\[1\]: x\}': a key at line 1 is a list"):
        load_recipe(None, ["finetune={[1]: x}"])
