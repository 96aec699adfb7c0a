"""Structured pruning on tiny in-process models: really smaller, same function where it must be, reloadable."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeft.data import Split
from edgeft.errors import ModelError, RecipeError
from edgeft.prune import (Importance, PrunePlan, count_parameters, ffn_importance, ffn_sizes, head_counts,
                          head_importance, importance, make_plan, prune)


def tiny_split(n: int = 48) -> Split:
    rng = np.random.default_rng(0)
    pos, neg, filler = ["good", "great", "superb"], ["bad", "awful", "dull"], ["the", "movie", "plot", "was", "a"]
    texts, labels = [], []
    for i in range(n):
        words = list(rng.choice(filler, size=5)) + [str(rng.choice(pos if i % 2 else neg))]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(i % 2)
    return Split(texts, labels)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from edgeft.modeling import load_classifier, load_tokenizer

    return load_classifier(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


def _logits(model, tok, texts):
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


TEXTS = ["good movie", "the plot was very dull and the actor poor", "not a great film", "superb scene"]


def test_importance_shapes_and_ranking(tiny):
    model, tok = tiny
    split = tiny_split()
    imp = importance(model, tok, split, max_length=32, samples=32)
    assert [len(h) for h in imp.heads] == head_counts(model) == [4, 4]
    assert [len(f) for f in imp.ffn] == ffn_sizes(model) == [64, 64]
    assert all((h >= 0).all() for h in imp.heads) and any(h.sum() > 0 for h in imp.heads)
    assert imp.samples == 32
    # the wrappers give the same scores
    np.testing.assert_allclose(head_importance(model, tok, split, max_length=32, samples=32)[0], imp.heads[0],
                               rtol=1e-4, atol=1e-9)
    assert len(ffn_importance(model, tok, split, max_length=32, samples=32)) == 2
    assert not any(p.grad is not None for p in model.parameters())  # scoring leaves no gradients behind


def test_pruning_zeroed_heads_and_neurons_keeps_logits(tiny_model_dir):
    """Heads whose output-projection columns are zero (and FFN neurons whose down-projection columns are
    zero) contribute nothing, so removing them must leave the logits unchanged while the model shrinks."""
    from edgeft.modeling import load_classifier, load_tokenizer

    model, tok = load_classifier(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    head_dim = 32 // 4
    plan = PrunePlan(heads={0: [1, 3], 1: [0]}, ffn_keep={0: list(range(0, 64, 2)), 1: list(range(32))})
    with torch.no_grad():
        for layer, heads in plan.heads.items():
            w = model.bert.encoder.layer[layer].attention.output.dense.weight
            for h in heads:
                w[:, h * head_dim:(h + 1) * head_dim] = 0
        for layer, keep in plan.ffn_keep.items():
            drop = sorted(set(range(64)) - set(keep))
            model.bert.encoder.layer[layer].output.dense.weight[:, drop] = 0
    before = _logits(model, tok, TEXTS)
    n_before = count_parameters(model)
    prune(model, plan)
    after = _logits(model, tok, TEXTS)
    assert count_parameters(model) < n_before
    assert head_counts(model) == [2, 3]
    assert ffn_sizes(model) == [32, 32]
    assert model.bert.encoder.layer[0].attention.self.query.out_features == 2 * head_dim
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def test_pruned_model_saves_and_reloads_identically(tiny, tiny_model_dir, tmp_path):
    from edgeft.modeling import load_classifier

    model, tok = load_classifier(str(tiny_model_dir)), tiny[1]
    imp = importance(model, tok, tiny_split(), max_length=32, samples=16)
    prune(model, make_plan(imp, heads=0.5, ffn=0.5))
    model.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    reloaded = load_classifier(str(tmp_path))
    assert head_counts(reloaded) == [2, 2] and ffn_sizes(reloaded) == [32, 32]
    assert reloaded.config.intermediate_size == 32
    torch.testing.assert_close(_logits(reloaded, tok, TEXTS), _logits(model, tok, TEXTS), rtol=0, atol=1e-6)
    # pruning an already-pruned model maps positions to the original head ids
    prune(reloaded, PrunePlan(heads={0: [1]}))
    assert head_counts(reloaded) == [1, 2]
    assert len(reloaded.config.pruned_heads[0]) == 3


def test_plan_is_uniform_and_keeps_a_head_per_layer():
    imp = Importance(heads=[np.array([0.1, 0.9, 0.5, 0.2]), np.array([0.3, 0.2, 0.1, 0.4])],
                     ffn=[np.arange(8, dtype=float), np.arange(8, dtype=float)[::-1]])
    plan = make_plan(imp, heads=0.5, ffn=0.5)
    assert plan.heads == {0: [0, 3], 1: [1, 2]}
    assert plan.ffn_keep == {0: [4, 5, 6, 7], 1: [0, 1, 2, 3]}
    assert make_plan(imp, heads=0.0, ffn=0.0) == PrunePlan()
    with pytest.raises(RecipeError, match="would remove all 4 heads"):
        make_plan(imp, heads=0.9, ffn=0.0)
    with pytest.raises(RecipeError):
        make_plan(imp, heads=1.0, ffn=0.0)


def test_prune_refuses_removing_every_head(tiny_model_dir):
    from edgeft.modeling import load_classifier

    model = load_classifier(str(tiny_model_dir))
    with pytest.raises(RecipeError, match="every head"):
        prune(model, PrunePlan(heads={0: [0, 1, 2, 3]}))


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    model = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, pad_token_id=0))
    with pytest.raises(ModelError, match="does not support model type 'gpt2'.*bert"):
        head_counts(model)


def test_distilbert_prunes_and_reloads(tmp_path):
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    cfg = DistilBertConfig(vocab_size=40, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64)
    model = DistilBertForSequenceClassification(cfg).eval()
    ids = torch.randint(5, 40, (2, 7))
    prune(model, PrunePlan(heads={0: [0], 1: [2, 3]}, ffn_keep={0: list(range(16)), 1: list(range(16, 32))}))
    assert head_counts(model) == [3, 2] and ffn_sizes(model) == [16, 16]
    model.save_pretrained(tmp_path, safe_serialization=True)
    reloaded = DistilBertForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-6)


def test_prune_step_is_public_and_reports_through_a_dataclass(tiny_model_dir, tiny_csv, tmp_path):
    """The compress stage's prune step lives here (issue 8): it returns the student and a StepResult
    whose report has no private keys, with its own recovery settings recorded."""
    from edgeft.data import load_dataset
    from edgeft.evaluate import SplitEvaluator, StepResult
    from edgeft.modeling import load_classifier, load_tokenizer
    from edgeft.prune import prune_step
    from edgeft.recipe import DataConfig, PruneConfig

    ds = load_dataset(DataConfig(dataset=str(tiny_csv)), seed=0)
    teacher, tok = load_classifier(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    cfg = PruneConfig(heads=0.5, ffn=0.5, importance_samples=32, importance_batch_size=8,
                      recovery={"epochs": 0.25, "batch_size": 8})
    ev = SplitEvaluator(ds, tok, 32)
    student, step = prune_step(tiny_model_dir, teacher, tok, cfg, ds, ev, tmp_path / "pruned", max_length=32, seed=0)
    assert isinstance(step, StepResult) and step.path == tmp_path / "pruned"
    assert set(step.logits) == {"validation", "test"} and step.logits["validation"].shape == (len(ds.validation), 2)
    report = step.to_report()
    assert report["step"] == "prune" and report["path"] == "pruned" and not any(k.startswith("_") for k in report)
    assert report["recovery"]["batch_size"] == 8 and report["importance_batch_size"] == 8
    assert report["params"] < report["params_before"] == count_parameters(teacher)
    assert head_counts(student) == [2, 2] and ffn_sizes(student) == [32, 32]
    assert load_classifier(str(tmp_path / "pruned")).config.intermediate_size == 32
