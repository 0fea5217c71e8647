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
