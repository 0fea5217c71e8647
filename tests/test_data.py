"""Data loaders, tokenizers and fixed-shape batches: real files under ``data_dir`` and tiny synthetic ones."""

from __future__ import annotations

import time

import numpy as np
import pytest

from qslm_jax.data import (
    DATA_DIR_ENV,
    bert_tokenizer,
    encode_classification,
    gpt_neox_tokenizer,
    join_rows,
    lm_training_batches,
    load_glue,
    load_wikitext_rows,
    strided_windows,
    wikitext_windows,
)
from qslm_jax.data.extra_text import glue_sentences, word_ngrams
from qslm_jax.data.wikitext import rows_from_raw
from qslm_jax.errors import ConfigError, DataError
from qslm_jax.tasks.data import load_task_data
from qslm_jax.tasks.task import get_task

# Row counts from shared/data/PROVENANCE.md
ROWS = {("sst2", "train"): 67_349, ("sst2", "validation"): 872, ("mrpc", "train"): 3_668,
        ("mrpc", "validation"): 408, ("mrpc", "test"): 1_725, ("qnli", "validation"): 5_463,
        ("qnli", "test"): 5_463}


@pytest.fixture(scope="module")
def neox(data_dir):
    return gpt_neox_tokenizer(data_dir=data_dir)


@pytest.fixture(scope="module")
def bert(data_dir):
    return bert_tokenizer(data_dir=data_dir)


@pytest.mark.parametrize(("task", "split"), sorted(ROWS))
def test_glue_splits_from_the_local_directory(data_dir, task, split):
    s = load_glue(task, split, data_dir=data_dir)
    assert len(s) == len(s.labels) == ROWS[task, split]
    assert (s.second is not None) == (task != "sst2")
    assert all(s.first[:50]) and (s.second is None or all(s.second[:50]))
    if split == "test":
        assert set(s.labels.tolist()) == {-1}  # unlabelled, as on the hub
    else:
        assert set(s.labels.tolist()) == {0, 1}
    assert s.source.startswith("local:")


def test_tsv_quirks_on_synthetic_files(tmp_path):
    # MRPC: UTF-8 BOM before the header and an unbalanced quote; QNLI: textual labels; both need QUOTE_NONE
    (tmp_path / "glue/mrpc").mkdir(parents=True)
    (tmp_path / "glue/mrpc/dev.tsv").write_text(
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
        '1\t1\t2\tHe said "no.\tHe said no.\n'
        "0\t3\t4\tA\tB\n", encoding="utf-8")
    s = load_glue("mrpc", "validation", data_dir=tmp_path)
    assert s.first == ('He said "no.', "A") and s.second == ("He said no.", "B")
    assert s.labels.tolist() == [1, 0]
    (tmp_path / "glue/qnli").mkdir(parents=True)
    (tmp_path / "glue/qnli/dev.tsv").write_text(
        "index\tquestion\tsentence\tlabel\n0\tWhy?\tBecause.\tnot_entailment\n1\tWho?\tMe.\tentailment\n")
    assert load_glue("qnli", "validation", data_dir=tmp_path).labels.tolist() == [1, 0]
    (tmp_path / "glue/qnli/dev.tsv").write_text("index\tquestion\tsentence\tlabel\n0\tWhy?\tBecause.\n")
    with pytest.raises(DataError, match=r"dev\.tsv:2"):
        load_glue("qnli", "validation", data_dir=tmp_path)


def test_data_dir_from_environment(tmp_path, monkeypatch):
    (tmp_path / "glue/sst2").mkdir(parents=True)
    (tmp_path / "glue/sst2/dev.tsv").write_text("sentence\tlabel\ngood .\t1\nbad .\t0\n")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    s = load_glue("sst2", "validation")
    assert s.first == ("good .", "bad .") and s.labels.tolist() == [1, 0]


def test_every_spelling_of_a_data_dir_names_one_source(tmp_path, monkeypatch):
    """Relative, absolute and symlinked spellings give the same source string (journals fingerprint it)."""
    (tmp_path / "data/glue/sst2").mkdir(parents=True)
    (tmp_path / "data/glue/sst2/dev.tsv").write_text("sentence\tlabel\ngood .\t1\n")
    (tmp_path / "link").symlink_to(tmp_path / "data")
    monkeypatch.chdir(tmp_path / "link/glue")
    spellings = [tmp_path / "data", "../../data", tmp_path / "link", ".."]
    sources = {load_glue("sst2", "validation", data_dir=d).source for d in spellings}
    assert sources == {f"local:{(tmp_path / 'data/glue/sst2/dev.tsv').resolve()}"}

def test_missing_data_fails_fast_naming_both_ways(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    start = time.perf_counter()
    for load in (lambda: load_glue("sst2", "validation"), lambda: load_wikitext_rows("test"),
                 gpt_neox_tokenizer, bert_tokenizer):
        with pytest.raises(DataError) as info:
            load()
        message = str(info.value)
        assert DATA_DIR_ENV in message and "hub" in message and "offline" in message
    assert time.perf_counter() - start < 30
    # a local directory without the file: the expected path is named, the hub is not tried
    with pytest.raises(DataError, match=r"qnli/train\.tsv"):
        load_glue("qnli", "train", data_dir=tmp_path)


def test_gpt_neox_tokenizer_facts(neox):
    # spikegpt.md "Tokenizer": 50,277 ids, no BOS/EOS, <|padding|> = 1, "\n" = 187
    assert neox.vocab_size == 50_277 and neox.pad_id == 1
    assert neox.encode("\n").tolist() == [187]
    ids = neox.encode("Hello world")
    assert 0 not in ids and 1 not in ids and neox.backend.decode(ids.tolist()) == "Hello world"


def test_bert_tokenizer_matches_transformers_on_mrpc(data_dir, bert):
    from transformers import BertTokenizerFast

    vocab = data_dir / "tokenizers/bert-base-uncased/vocab.txt"
    reference = BertTokenizerFast(vocab=str(vocab), do_lower_case=True)
    s = load_glue("mrpc", "validation", data_dir=data_dir)
    first, second = list(s.first[:64]), list(s.second[:64])
    for length in (128, 24):  # 24 forces longest-first truncation of pairs
        ref = reference(first, second, padding="max_length", truncation=True, max_length=length,
                        return_tensors="np")
        ours = bert.encode_fixed(first, second, max_length=length)
        np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"])
        np.testing.assert_array_equal(ours["segment_ids"], ref["token_type_ids"])
        np.testing.assert_array_equal(ours["attention_mask"], ref["attention_mask"])


def test_bert_pair_layout(data_dir, bert):
    vocab = (data_dir / "tokenizers/bert-base-uncased/vocab.txt").read_text(encoding="utf-8").split("\n")
    cls_id, sep_id, pad_id = vocab.index("[CLS]"), vocab.index("[SEP]"), vocab.index("[PAD]")
    assert bert.vocab_size == 30_522 and bert.pad_id == pad_id == 0
    out = bert.encode_fixed(["Hello there"], ["General Kenobi"])
    ids, seg, mask = out["input_ids"][0], out["segment_ids"][0], out["attention_mask"][0]
    assert ids.shape == (128,)
    seps = np.flatnonzero(ids == sep_id)
    assert ids[0] == cls_id and len(seps) == 2
    assert (seg[:seps[0] + 1] == 0).all() and (seg[seps[0] + 1:seps[1] + 1] == 1).all()
    end = seps[1] + 1
    assert (mask[:end] == 1).all() and (mask[end:] == 0).all() and (ids[end:] == 0).all()


def test_classification_batches_have_fixed_shapes(data_dir, neox):
    ds = encode_classification(load_glue("sst2", "validation", data_dir=data_dir), neox, max_length=64)
    batches = list(ds.batches(100))
    assert len(batches) == ds.num_batches(100) == 9  # 872 = 8 * 100 + 72
    for b in batches:
        assert set(b) == {"idx", "attention_mask", "labels", "valid"}
        assert b["idx"].shape == b["attention_mask"].shape == (100, 64) and b["labels"].shape == (100,)
    last = batches[-1]
    assert last["valid"].tolist() == [1.0] * 72 + [0.0] * 28
    np.testing.assert_array_equal(last["idx"][72:], np.repeat(last["idx"][:1], 28, axis=0))  # dummy copies
    valid = np.concatenate([b["valid"] for b in batches]).astype(bool)
    np.testing.assert_array_equal(np.concatenate([b["labels"] for b in batches])[valid], ds.labels)
    # right padding with <|padding|>: the mask is 1 exactly where the ids are not padding here
    np.testing.assert_array_equal(ds.inputs["attention_mask"] == 0, ds.inputs["idx"] == neox.pad_id)
    assert "sst2 validation" in ds.description


def test_classification_training_batches(data_dir, neox):
    ds = encode_classification(load_glue("sst2", "validation", data_dir=data_dir), neox, max_length=16)
    batch_at = ds.training_batches(100, seed=3)
    np.testing.assert_array_equal(batch_at(5)["idx"], batch_at(5)["idx"])  # pure function of the step
    epoch = np.concatenate([batch_at(s)["labels"] for s in range(8)])
    assert len(epoch) == 800 and batch_at(0)["valid"].all()
    first, second = batch_at(0)["idx"], batch_at(8)["idx"]  # step 8 starts epoch 2: another permutation
    assert not np.array_equal(first, second)
    with pytest.raises(ConfigError):
        ds.training_batches(10_000)


def test_wikitext_rows_and_joins(data_dir):
    rows, source = load_wikitext_rows("test", data_dir=data_dir)
    raw = (data_dir / "wikitext-2-raw/wiki.test.raw").read_text(encoding="utf-8")
    assert len(rows) == 4_358 and source.startswith("local:")  # PROVENANCE.md: 4,358 lines
    assert join_rows(rows, "raw") == raw
    assert rows[0] == "" and rows[1] == " = Robert Boulter = \n"
    assert join_rows(rows, "hf") == "\n\n".join(rows)
    assert rows_from_raw(join_rows(["", " a \n", " b \n"], "raw")) == ["", " a \n", " b \n"]
    with pytest.raises(ConfigError):
        join_rows(rows, "other")
    with pytest.raises(DataError, match="train"):
        load_wikitext_rows("train", data_dir=data_dir)


@pytest.mark.parametrize(("n", "ctx", "stride"), [(2, 8, 4), (9, 8, 4), (10, 8, 4), (100, 8, 4), (101, 16, 5),
                                                  (37, 4, 4), (50, 6, 1)])
def test_strided_windows_score_every_token_once(n, ctx, stride):
    tokens = np.arange(100, 100 + n)
    w = strided_windows(tokens, ctx, stride=stride, pad_id=-7)
    assert w.scored_tokens == n - 1
    scored = []
    for i in range(len(w.idx)):
        starts = i * stride
        valid = w.score_mask[i] > 0
        # inputs and targets are the stream and the stream shifted by one, padded with the pad id
        stream = np.concatenate([tokens, np.full(ctx + 1, -7)])
        np.testing.assert_array_equal(w.idx[i], stream[starts:starts + ctx])
        np.testing.assert_array_equal(w.targets[i], stream[starts + 1:starts + ctx + 1])
        scored.extend(w.targets[i][valid].tolist())
        if i > 0:  # later windows score only their last `stride` positions, each with >= ctx - stride context
            assert not valid[:ctx - stride].any()
    assert w.score_mask[0].sum() == min(ctx, n - 1)  # the first window scores all its targets
    assert sorted(scored) == tokens[1:].tolist()  # x_1 .. x_{n-1}, each exactly once
    assert f"stride {stride}" in w.protocol and f"{n - 1} predicted" in w.protocol


def test_window_batches_pad_with_unscored_windows():
    w = strided_windows(np.arange(1000), 32)
    batches = list(w.batches(8))
    assert len(batches) == w.num_batches(8)
    assert all(b["idx"].shape == b["targets"].shape == b["score_mask"].shape == (8, 32) for b in batches)
    assert sum(b["score_mask"].sum() for b in batches) == 999
    fill = 8 * len(batches) - len(w.idx)
    assert fill > 0 and not batches[-1]["score_mask"][8 - fill:].any()
    assert (batches[-1]["idx"][8 - fill:] == w.pad_id).all()


def test_wikitext_test_windows_cover_every_token(data_dir, neox):
    w = wikitext_windows("test", neox, 1024, data_dir=data_dir)
    assert w.scored_tokens == w.num_tokens - 1
    assert w.idx.shape[1] == 1024 and w.stride == 512
    assert "WikiText-2 raw test" in w.protocol and "joined with '\\n\\n'" in w.protocol


def test_lm_training_batches():
    tokens = np.arange(500) * 3
    batch_at = lm_training_batches(tokens, 16, 4, seed=1)
    b = batch_at(7)
    assert b["idx"].shape == b["targets"].shape == (4, 16)
    starts = b["idx"][:, 0] // 3
    for row, s in enumerate(starts):  # contiguous windows and next tokens
        np.testing.assert_array_equal(b["idx"][row], tokens[s:s + 16])
        np.testing.assert_array_equal(b["targets"][row], tokens[s + 1:s + 17])
    np.testing.assert_array_equal(batch_at(7)["idx"], b["idx"])
    assert not np.array_equal(batch_at(8)["idx"], b["idx"])
    with pytest.raises(DataError):
        lm_training_batches(tokens[:10], 16, 4)


def test_fewer_windows_than_the_batch_size_make_one_unpadded_batch():
    w = strided_windows(np.arange(100), 32)
    (batch,) = w.batches(64)
    assert batch["idx"].shape == (len(w.idx), 32) and w.num_batches(64) == 1
    assert batch["score_mask"].sum() == 99


def test_glue_sentences_leave_out_every_text_sharing_a_run_with_the_evaluation_text(tmp_path):
    """Synthetic GLUE files: distinct texts of every source, both sides of a pair, minus the overlapping ones."""
    for task, files in (("qnli", ("dev", "test")), ("mrpc", ("train", "dev", "test"))):
        (tmp_path / "glue" / task).mkdir(parents=True)
        for name in files:
            if task == "qnli":
                rows = ["index\tquestion\tsentence\tlabel",
                        f"0\tWhat is {name}?\tThe river flows north past the old mill in {name}.\tentailment"]
            else:
                rows = ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String",
                        f"1\t1\t2\tShares rose {name} .\tThe cat sat on the mat beside the warm red fire {name} ."]
            (tmp_path / "glue" / task / f"{name}.tsv").write_text("\n".join(rows) + "\n")
    evaluation = "an essay in which the cat sat on the mat beside the warm red fire, and more"
    texts, description = glue_sentences(evaluation, data_dir=tmp_path)
    assert not any("mat beside" in t for t in texts)  # 8 shared words: left out wherever it appears
    assert "The river flows north past the old mill in dev." in texts and "What is test?" in texts
    assert "Shares rose train ." in texts and texts == sorted(set(texts))
    assert "3 sharing an 8-word run" in description  # the MRPC second sentences of train, dev and test
    assert word_ngrams("A b c d e f g h i", 8) == {tuple("abcdefgh"), tuple("bcdefghi")}


@pytest.mark.slow
def test_the_supplementary_lm_text_extends_wikitext_valid_and_avoids_test(data_dir, neox):
    """lm_train_text="wikitext2-valid+glue": WikiText-2 valid first, then sentences none of which shares an
    8-word run with WikiText-2 test; the evaluation windows are those of the plain recipe."""
    plain = load_task_data(get_task("wikitext2"), ctx_len=32, tokenizer=neox, data_dir=data_dir, eval_limit=4096)
    more = load_task_data(get_task("wikitext2"), ctx_len=32, tokenizer=neox, data_dir=data_dir, eval_limit=4096,
                          lm_train_text="wikitext2-valid+glue")
    valid = plain.token_streams.train
    assert len(more.token_streams.train) > 3 * len(valid)
    np.testing.assert_array_equal(more.token_streams.train[:len(valid) - 1], valid[:-1])
    np.testing.assert_array_equal(more.token_streams.test, plain.token_streams.test)
    assert more.protocol == plain.protocol
    test_runs = word_ngrams(join_rows(load_wikitext_rows("test", data_dir=data_dir)[0], "hf"))
    texts, _ = glue_sentences("", data_dir=data_dir)
    kept, _ = glue_sentences(join_rows(load_wikitext_rows("test", data_dir=data_dir)[0], "hf"), data_dir=data_dir)
    assert not any(word_ngrams(t) & test_runs for t in kept) and 0 < len(texts) - len(kept) < 50
    with pytest.raises(ConfigError, match="training text"):
        load_task_data(get_task("wikitext2"), ctx_len=32, tokenizer=neox, data_dir=data_dir,
                       lm_train_text="wikitext2-train")


def test_kd_training_data_leave_out_the_selection_rows(data_dir, bert):
    """load_glue_splits (extreme KD) trains on the train file less the QSLM selection rows, as fine-tuning does,
    so a search on a KD student never selects on sentences the student was trained on."""
    from qslm_jax.tasks.data import held_out_rows, load_glue_splits

    task = get_task("mrpc")
    data = load_glue_splits("mrpc", bert, data_dir=data_dir, max_length=128)
    raw = load_glue("mrpc", "train", data_dir=data_dir)
    assert len(data.train) == len(raw) - task.selection_examples == 3_268
    rows = held_out_rows(task, len(raw))
    held = encode_classification(load_glue("mrpc", "train", data_dir=data_dir), bert, max_length=128)
    trained = {tuple(r) for r in data.train.inputs["input_ids"]}
    assert not {tuple(held.inputs["input_ids"][i]) for i in rows} & trained
    assert "left out of training" in data.note
