"""Batched candidate evaluation: agreement with one-at-a-time evaluation, one compilation, devices, budget."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qslm_jax.data import strided_windows
from qslm_jax.errors import ConfigError, DataError
from qslm_jax.models.spikegpt import SpikeGPT, SpikeGPTConfig
from qslm_jax.qslm.evaluator import Evaluator, evaluate_candidates, stack_batches
from qslm_jax.qslm.journal import Journal
from qslm_jax.qslm.metrics import Accuracy, Perplexity, perplexity
from qslm_jax.qslm.outputs import journaled_f1
from qslm_jax.quant.apply import quantize_model
from qslm_jax.quant.plan import QuantPlan

REPO = Path(__file__).resolve().parent.parent
CONFIG = SpikeGPTConfig.preset("spikegpt-tiny", n_classes=2)
PLANS = [QuantPlan(), QuantPlan(8), QuantPlan(4), QuantPlan(8).with_block("attention_1", 3),
         QuantPlan(6).with_module("attention_0/ffn.key", 1.58), QuantPlan(2).with_block("output", 1)]


@pytest.fixture(scope="module")
def model():
    return SpikeGPT(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def lm_batches():
    tokens = np.random.default_rng(0).integers(2, CONFIG.vocab_size, 150)
    return list(strided_windows(tokens, 16, stride=8).batches(4))


def _reference_nll(model, batches) -> tuple[float, float]:
    """Summed NLL (float64) of the model's own forward pass, batch by batch."""
    forward = nnx.jit(lambda m, idx: m(idx))
    nll = tokens = 0.0
    for batch in batches:
        logits = np.asarray(forward(model, jnp.asarray(batch["idx"])), np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        target = np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
        nll -= float((target * batch["score_mask"]).sum())
        tokens += float(batch["score_mask"].sum())
    return nll, tokens


def test_batched_equals_one_at_a_time(model, lm_batches):
    with jax.default_matmul_precision("highest"):
        evaluator = Evaluator(model, Perplexity(), chunk_size=4)
        stats = evaluator.stats(PLANS, lm_batches)
        for plan, got in zip(PLANS, stats, strict=True):
            nll, tokens = _reference_nll(quantize_model(model, plan), lm_batches)
            assert got["tokens"] == tokens == 149  # every token but the first scored once
            assert got["nll"] == pytest.approx(nll, rel=1e-5)
    values = [perplexity(s["nll"], s["tokens"]) for s in stats]
    assert len(set(values)) == len(PLANS)  # the plans really differ


def test_perplexity_is_exact_over_the_split_not_a_mean_of_batches(model, lm_batches):
    evaluator = Evaluator(model, Perplexity())
    whole = evaluator([QuantPlan()], lm_batches)[0]
    per_batch = [evaluator.stats([QuantPlan()], [b])[0] for b in lm_batches]
    assert whole == pytest.approx(np.exp(sum(s["nll"] for s in per_batch) / sum(s["tokens"] for s in per_batch)),
                                  rel=1e-6)
    mean_of_ppl = np.mean([perplexity(s["nll"], s["tokens"]) for s in per_batch])
    assert abs(mean_of_ppl - whole) > 1e-3 * whole


def test_compiles_each_chunk_size_once_and_never_pads(model, lm_batches):
    evaluator = Evaluator(model, Perplexity(), chunk_size=4)
    assert evaluator.chunk_sizes(10) == (4, 2, 1)
    assert evaluator.split(7) == [4, 2, 1] and evaluator.split(9) == [4, 4, 1] and evaluator.split(2) == [2]
    compiles: list[str] = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    lists = [PLANS[:4], PLANS[2:], [QuantPlan(q) for q in (16, 12, 5, 3)]]
    first = evaluator(lists[0], lm_batches)
    assert evaluator.compilations == 1 and evaluator.compile_seconds > 0
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        rest = [evaluator(plans, lm_batches) for plans in lists[1:]]
        assert compiles == []  # same size: the first compilation is reused
        shorter = evaluator(PLANS[:3], lm_batches)  # 2 + 1: two more sizes, no padding
        longer = evaluator(PLANS, lm_batches)  # 4 + 2: nothing new to compile
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert evaluator.compilations == 3 and len(compiles) == 2
    assert longer[:4] == first and longer[2:4] == rest[0][:2]  # the same compiled program: bit for bit
    # A chunk of 2 or 1 is another XLA program (width-1 vmaps lose the batch axis), whose float32 sums may
    # round in another order: a candidate's score may move by float32 rounding, never more, with its chunk.
    assert shorter == pytest.approx(first[:3], rel=1e-6, abs=0)
    assert longer[4:] == pytest.approx(rest[0][2:], rel=1e-6, abs=0)
    assert evaluator.calls == 1 + 2 + 2 + 2
    assert evaluator.slots == 4 + 8 + 3 + 6  # every computed slot held a requested plan


def test_prepare_compiles_outside_the_call(model, lm_batches):
    evaluator = Evaluator(model, Perplexity(), chunk_size=8)
    evaluator.prepare(5, lm_batches)  # 4 + 1
    assert evaluator.compilations == 2 and evaluator.calls == 0
    seconds = evaluator.compile_seconds
    evaluator(PLANS[:5], lm_batches)
    assert evaluator.compile_seconds == seconds and evaluator.slots == 5


def test_accuracy_ignores_dummy_rows(model):
    rng = np.random.default_rng(1)
    idx = rng.integers(2, CONFIG.vocab_size, (3, 4, 12)).astype(np.int32)
    mask = np.ones_like(idx)
    mask[:, :, 9:] = 0
    labels = rng.integers(0, 2, (3, 4)).astype(np.int32)
    valid = np.ones((3, 4), np.float32)
    valid[2, 2:] = 0.0  # the last batch has two dummy rows
    batches = [{"idx": idx[i], "attention_mask": mask[i], "labels": labels[i], "valid": valid[i]} for i in range(3)]
    plans = [QuantPlan(), QuantPlan(4), QuantPlan(1)]
    got = evaluate_candidates(model, plans, batches, Accuracy())
    classify = nnx.jit(lambda m, idx, mask: m.classify(idx, mask))
    for plan, acc in zip(plans, got, strict=True):
        qmodel = quantize_model(model, plan)
        pred = np.concatenate([np.argmax(classify(qmodel, b["idx"], b["attention_mask"]), -1) for b in batches])
        hits = (pred == labels.ravel())[valid.ravel() > 0]
        assert acc == pytest.approx(100.0 * hits.mean())


def test_per_example_statistics_sum_to_the_batch_statistics(model, lm_batches):
    """One pass gives both: the per-window statistics (padding windows dropped) are the rows of the metric's
    own per-batch sums, and their totals are the metric."""
    plans = [QuantPlan(), QuantPlan(4)]
    real = np.concatenate([b["score_mask"].sum(axis=1) > 0 for b in lm_batches])
    assert not real.all()  # the last batch is padded with empty windows
    evaluator = Evaluator(model, Perplexity(), chunk_size=2)
    batch_stats = nnx.jit(lambda m, b: Perplexity().batch_stats(m, b))
    for plan, got in zip(plans, evaluator.evaluations(plans, lm_batches), strict=True):
        assert set(got.examples) == {"nll", "tokens"} and len(got.examples["nll"]) == real.sum()
        qmodel = quantize_model(model, plan)
        sums = [jax.device_get(batch_stats(qmodel, {k: jnp.asarray(v) for k, v in b.items()})) for b in lm_batches]
        assert got.examples["tokens"].sum() == sum(float(t["tokens"]) for t in sums) == 149
        assert got.examples["nll"].sum() == pytest.approx(sum(float(t["nll"]) for t in sums), rel=1e-5)
        assert (got.examples["tokens"] > 0).all()
        assert got.metric == Perplexity().finalize({k: v.sum() for k, v in got.examples.items()})
    assert [e.metric for e in evaluator.evaluations(plans, lm_batches)] == evaluator(plans, lm_batches)

    rng = np.random.default_rng(1)
    batches = [{"idx": rng.integers(2, CONFIG.vocab_size, (4, 12)).astype(np.int32),
                "attention_mask": np.ones((4, 12), np.int32), "labels": rng.integers(0, 2, 4).astype(np.int32),
                "valid": np.array([1, 1, 1, 0] if i == 2 else [1, 1, 1, 1], np.float32)} for i in range(3)]
    sentences = Evaluator(model, Accuracy()).evaluations([QuantPlan()], batches)[0]
    assert (sentences.examples["examples"] == 1).all() and len(sentences.examples["examples"]) == 11
    assert set(np.unique(sentences.examples["correct"])) <= {0.0, 1.0}
    assert sentences.metric == pytest.approx(100 * sentences.examples["correct"].mean())


def test_f1_counts_travel_with_the_sentences_into_the_journal(model, tmp_path):
    """Accuracy(f1_counts=True) keeps tp/fp/fn per sentence; the journaled F1 is GLUE's 2tp / (2tp + fp + fn)."""
    rng = np.random.default_rng(2)
    batches = [{"idx": rng.integers(2, CONFIG.vocab_size, (4, 12)).astype(np.int32),
                "attention_mask": np.ones((4, 12), np.int32), "labels": np.array([1, 1, 0, 0], np.int32),
                "valid": np.array([1, 1, 1, 0], np.float32)} for _ in range(2)]
    plain = Evaluator(model, Accuracy()).evaluations([QuantPlan()], batches)[0]
    counted = Evaluator(model, Accuracy(f1_counts=True)).evaluations([QuantPlan()], batches)[0]
    assert set(counted.examples) == {"correct", "examples", "tp", "fp", "fn"}
    assert counted.metric == plain.metric
    np.testing.assert_array_equal(counted.examples["correct"], plain.examples["correct"])
    labels = np.array([1, 1, 0] * 2)
    correct = counted.examples["correct"].astype(bool)
    pred = np.where(correct, labels, 1 - labels)  # two classes: a wrong answer is the other class
    tp, fp, fn = ((pred == 1) & (labels == 1)).sum(), ((pred == 1) & (labels == 0)).sum(), \
        ((pred == 0) & (labels == 1)).sum()
    np.testing.assert_array_equal([counted.examples[k].sum() for k in ("tp", "fp", "fn")], [tp, fp, fn])
    journal = Journal(tmp_path / "j.jsonl", {"test": "f1"})
    journal.record(QuantPlan(), counted.metric, 1, counted.examples)
    expected = 100.0 * 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    assert journaled_f1(Journal(tmp_path / "j.jsonl", {"test": "f1"}), QuantPlan()) == pytest.approx(expected)
    journal.record(QuantPlan(8), plain.metric, 1, None)
    with pytest.raises(DataError, match="no F1 counts"):
        journaled_f1(journal, QuantPlan(8))


def test_memory_budget_sets_the_chunk(model, lm_batches):
    stacked = stack_batches(lm_batches)
    roomy = Evaluator(model, Perplexity(), memory_budget_bytes=10**12)
    assert roomy.chunk_size(len(PLANS), stacked) == len(PLANS)  # all plans fit: never more than asked for
    per_device = roomy._budget_chunk(stacked)
    assert per_device > 1000  # a terabyte holds many tiny-model candidates
    tight = Evaluator(model, Perplexity(), memory_budget_bytes=10**12 // per_device * 3)
    assert 1 <= tight.chunk_size(len(PLANS), stacked) <= 3
    assert tight(PLANS, lm_batches) == roomy(PLANS, lm_batches)
    with pytest.raises(ConfigError, match="memory_budget_bytes"):
        Evaluator(model, Perplexity(), memory_budget_bytes=1000)(PLANS[:1], lm_batches)


def test_bad_batches_and_plans(model, lm_batches):
    with pytest.raises(DataError, match="share keys and shapes"):
        stack_batches([lm_batches[0], {k: v[:2] for k, v in lm_batches[0].items()}])
    with pytest.raises(ConfigError, match="unknown units"):
        evaluate_candidates(model, [QuantPlan(8, {"encoder_0": 4})], lm_batches, Perplexity())


MULTI_DEVICE = textwrap.dedent("""
    import jax, numpy as np
    from flax import nnx
    from qslm_jax.data import strided_windows
    from qslm_jax.models.spikegpt import SpikeGPT, SpikeGPTConfig
    from qslm_jax.qslm.evaluator import Evaluator
    from qslm_jax.qslm.metrics import Perplexity
    from qslm_jax.quant.plan import QuantPlan
    assert jax.local_device_count() == 4, jax.devices()
    model = SpikeGPT(SpikeGPTConfig.preset("spikegpt-tiny"), rngs=nnx.Rngs(0))
    batches = list(strided_windows(np.random.default_rng(0).integers(2, 100, 150), 16, stride=8).batches(4))
    plans = [QuantPlan(q) for q in (32, 16, 8, 6, 4, 3, 2, 1.58, 1)]
    four = Evaluator(model, Perplexity(), chunk_size=8)
    one = Evaluator(model, Perplexity(), chunk_size=8, devices=jax.devices()[:1])
    a, b = four.stats(plans, batches), one.stats(plans, batches)
    assert len(four.devices) == 4 and len(one.devices) == 1
    assert a == b, (a, b)
    print("IDENTICAL", len(plans))
""")


def test_four_devices_give_identical_results():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", MULTI_DEVICE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "IDENTICAL 9" in proc.stdout
