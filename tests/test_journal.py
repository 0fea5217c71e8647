"""Search journal: append/flush, resume after a crash without re-evaluating, fingerprint refusal, repair."""

from __future__ import annotations

import json
import math

import pytest
from test_search import DAMAGE, LEVELS, DamageModel, small_hierarchy

from qslm_jax.errors import ConfigError
from qslm_jax.qslm.journal import Journal, fingerprint
from qslm_jax.qslm.search import tiered_search
from qslm_jax.quant.plan import QuantPlan

META = {"model": "tiny", "task": "sst2-validation", "quantizer": "asymmetric per-tensor"}


def search(model, journal):
    return tiered_search(model.hierarchy, model, levels=LEVELS, const_a=2.0, const_m=1.0,
                         higher_is_better=True, journal=journal)


class Crash(RuntimeError):
    pass


class CrashingModel(DamageModel):
    """Raises on call number ``crash_at`` (1-based), as a killed evaluation would."""

    def __init__(self, *args, crash_at: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.crash_at = crash_at

    def __call__(self, plans):
        if self.calls + 1 == self.crash_at:
            self.batches.append(list(plans))
            raise Crash("simulated crash")
        return super().__call__(plans)


def test_every_evaluation_is_written_with_a_header(tmp_path):
    path = tmp_path / "journal.jsonl"
    model = DamageModel(small_hierarchy(), DAMAGE)
    result = search(model, Journal(path, META))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["journal"] == "qslm-search" and lines[0]["fingerprint"] == fingerprint(META)
    assert lines[0]["meta"] == META
    assert len(lines) - 1 == result.evaluations == 14  # the 14 steps of the sequential search (test_search)
    entry = lines[1]
    assert entry["key"] == QuantPlan().key() and entry["metric"] == 90.0
    assert entry["memory_bytes"] == model.hierarchy.fp32_bytes and entry["time"]
    assert QuantPlan.from_dict(lines[5]["plan"]).key() == lines[5]["key"]


@pytest.mark.parametrize("crash_at", [2, 4, 9])
def test_resume_after_crash_evaluates_only_missing_plans(tmp_path, crash_at):
    path = tmp_path / "journal.jsonl"
    hierarchy = small_hierarchy()
    crashing = CrashingModel(hierarchy, DAMAGE, crash_at=crash_at)
    with pytest.raises(Crash):
        search(crashing, Journal(path, META))
    done = {p.key() for batch in crashing.batches[:crash_at - 1] for p in batch}
    journal = Journal(path, META)
    assert {e["key"] for e in journal.entries()} == done  # everything before the crash, nothing of the crash

    rerun = DamageModel(hierarchy, DAMAGE)
    resumed = search(rerun, journal)
    evaluated_again = [p.key() for batch in rerun.batches for p in batch]
    assert not set(evaluated_again) & done  # nothing evaluated twice
    reference = search(DamageModel(hierarchy, DAMAGE), None)
    assert len(evaluated_again) == reference.evaluations - len(done)
    assert resumed.journal_hits == len(done)
    assert resumed.plan == reference.plan
    assert [(c.plan, c.metric, c.ok) for c in resumed.candidates] == [
        (c.plan, c.metric, c.ok) for c in reference.candidates]


def test_complete_journal_needs_no_evaluation(tmp_path):
    path = tmp_path / "journal.jsonl"
    first = search(DamageModel(small_hierarchy(), DAMAGE), Journal(path, META))
    again = DamageModel(small_hierarchy(), DAMAGE)
    second = search(again, Journal(path, META))
    assert again.calls == 0 and second.calls == 0 and second.evaluations == 0
    assert second.journal_hits == first.evaluations
    assert second.plan == first.plan


def test_journal_of_another_setup_is_refused(tmp_path):
    path = tmp_path / "journal.jsonl"
    Journal(path, META).record(QuantPlan(8), 88.0, 1000)
    with pytest.raises(ConfigError, match=r"different setup.*\['task'\]"):
        Journal(path, META | {"task": "wikitext2-test"})
    (tmp_path / "other.jsonl").write_text('{"something": "else"}\n')
    with pytest.raises(ConfigError, match="not a QSLM search journal"):
        Journal(tmp_path / "other.jsonl", META)


def test_cut_short_last_line_is_dropped_and_repaired(tmp_path):
    path = tmp_path / "journal.jsonl"
    journal = Journal(path, META)
    journal.record(QuantPlan(8), 88.5, 1000)
    with path.open("a") as handle:
        handle.write('{"key": "{\\"default\\":6')  # interrupted write: no closing brace, no newline
    reopened = Journal(path, META)
    assert reopened.repaired and len(reopened) == 1 and reopened.metric(QuantPlan(8).key()) == 88.5
    reopened.record(QuantPlan(6), 87.0, 800)  # appends on a clean line
    final = Journal(path, META)
    assert not final.repaired and len(final) == 2 and final.metric(QuantPlan(6).key()) == 87.0


def test_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "journal.jsonl"
    journal = Journal(path, META)
    journal.record(QuantPlan(8), 88.5, 1000)
    journal.record(QuantPlan(6), 87.0, 800)
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:10]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="line 2 is not valid JSON"):
        Journal(path, META)


def test_non_finite_metric_round_trips(tmp_path):
    path = tmp_path / "journal.jsonl"
    Journal(path, META).record(QuantPlan(2), math.nan, 10)
    assert math.isnan(Journal(path, META).metric(QuantPlan(2).key()))
    assert Journal(path, META).metric(QuantPlan(4).key()) is None


@pytest.mark.parametrize("content", [b"my notes\n", b"one line without newline", b"\x00\x01\xff binary",
                                     b'{"a": 1}\n{"key": "x", "metric": 1}\n'])
def test_a_file_that_is_not_a_journal_is_refused_and_left_untouched(tmp_path, content):
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=r"not a QSLM search journal.*left untouched"):
        Journal(path, META)
    assert path.read_bytes() == content


def test_an_empty_file_becomes_a_journal(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    Journal(path, META).record(QuantPlan(), 1.0, 10)
    assert len(Journal(path, META)) == 1


def _open_and_record(args):
    path, worker = args
    journal = Journal(path, META)
    journal.record(QuantPlan().with_default(8), float(worker), 100)
    return journal.fingerprint


def test_processes_creating_one_journal_at_once_write_one_header(tmp_path):
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.map(_open_and_record, [(tmp_path / "warm-up.jsonl", w) for w in range(4)])  # imports done
        for trial in range(3):
            path = tmp_path / f"shared-{trial}.jsonl"
            pool.map(_open_and_record, [(path, w) for w in range(8)])
            lines = [json.loads(line) for line in path.read_text().splitlines()]
            assert sum("journal" in line for line in lines) == 1 and "journal" in lines[0]
            assert len(lines) == 1 + 8
            assert len(Journal(path, META)) == 1  # eight records of one plan


def test_per_example_statistics_round_trip_exactly(tmp_path):
    """float64 per-window NLLs come back bit for bit (a resumed run recomputes identical intervals)."""
    import numpy as np

    path = tmp_path / "journal.jsonl"
    stats = {"nll": np.random.default_rng(0).uniform(0, 700, 33), "tokens": np.full(33, 64.0)}
    Journal(path, META).record(QuantPlan(4), 123.456, 10, stats)
    Journal(path, META).record(QuantPlan(8), 120.0, 20)  # an evaluate function without per-example statistics
    reopened = Journal(path, META)
    back = reopened.examples(QuantPlan(4).key())
    assert set(back) == {"nll", "tokens"} and all((back[k] == stats[k]).all() for k in stats)
    assert back["nll"].dtype == np.float64
    assert reopened.examples(QuantPlan(8).key()) is None and reopened.examples(QuantPlan(2).key()) is None


def test_a_version_1_journal_is_refused_with_what_to_do(tmp_path):
    """Written before per-example statistics were journaled: its intervals cannot be recomputed."""
    path = tmp_path / "old.jsonl"
    header = {"journal": "qslm-search", "version": 1, "fingerprint": "0" * 64, "meta": META, "created": "x"}
    entry = {"key": QuantPlan().key(), "plan": QuantPlan().to_dict(), "metric": 90.0, "memory_bytes": 10}
    content = json.dumps(header) + "\n" + json.dumps(entry) + "\n"
    path.write_text(content)
    with pytest.raises(ConfigError, match=r"format version 1, expected 2.*per-example statistics.*another "
                                          r"journal path"):
        Journal(path, META)
    assert path.read_text() == content

def test_the_fingerprint_covers_the_format_version(monkeypatch):
    """The default journal path is named by the fingerprint: a new format gets a new file, so a search left at
    its default journal re-evaluates rather than meeting a version-1 journal."""
    from qslm_jax.qslm import journal

    current = fingerprint(META)
    monkeypatch.setattr(journal, "JOURNAL_VERSION", 1)
    assert fingerprint(META) != current


@pytest.mark.parametrize(("examples", "message"), [
    ({"correct": [1, 0], "examples": [1]}, "same non-zero length"),
    ({"correct": [1, "x"], "examples": [1, 1]}, "list of numbers"),
    ({"correct": [1.0], "examples": [1.0]}, "one evaluation set"),
    ({"correct": "10"}, "list of numbers"),
])
def test_malformed_per_example_statistics_are_refused_on_reading(tmp_path, examples, message):
    path = tmp_path / "journal.jsonl"
    Journal(path, META).record(QuantPlan(), 90.0, 10, {"correct": [1.0, 1.0], "examples": [1.0, 1.0]})
    entry = {"key": QuantPlan(8).key(), "plan": QuantPlan(8).to_dict(), "metric": 1.0, "memory_bytes": 1,
             "examples": examples, "time": "x"}
    with path.open("a") as handle:
        handle.write(json.dumps(entry) + "\n")
    with pytest.raises(ConfigError, match=message):
        Journal(path, META)


def test_entries_over_different_example_sets_are_refused_before_writing(tmp_path):
    path = tmp_path / "journal.jsonl"
    journal = Journal(path, META)
    journal.record(QuantPlan(), 90.0, 10, {"correct": [1.0, 1.0], "examples": [1.0, 1.0]})
    with pytest.raises(ConfigError, match="one evaluation set"):
        journal.record(QuantPlan(8), 90.0, 10, {"correct": [1.0], "examples": [1.0]})
    assert len(Journal(path, META)) == 1
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1].replace('"examples": {', '"nope": {')]) + "\n")
    with pytest.raises(ConfigError, match="'key', 'metric' and 'examples'"):
        Journal(path, META)
