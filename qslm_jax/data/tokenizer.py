"""The two tokenizers of the project, as ``tokenizers`` fast tokenizers with the facts batching needs.

* GPT-NeoX-20B byte-level BPE (SpikeGPT; spikegpt.md "Tokenizer"): 50,277 ids, no BOS/EOS added,
  ``<|padding|>`` = id 1 is the pad id. Hub ``EleutherAI/gpt-neox-20b`` (``tokenizer.json``) or local
  ``tokenizers/gpt-neox-20b/20B_tokenizer.json``. Sentence pairs are joined into one text with "\\n".
* bert-base-uncased WordPiece (SpikingBERT and its teacher; spikingbert.md "Teacher, tokenizer, KD"):
  lower-case, ``[CLS] A [SEP] B [SEP]`` with segment ids 0/1, pad id 0, max length 128. Hub
  ``google-bert/bert-base-uncased`` (``vocab.txt``) or local ``tokenizers/bert-base-uncased/vocab.txt``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

from qslm_jax.data.sources import from_hub, hub_file, local_file, resolve_data_dir

NEOX_HUB, NEOX_LOCAL = "EleutherAI/gpt-neox-20b", "tokenizers/gpt-neox-20b/20B_tokenizer.json"
BERT_HUB, BERT_LOCAL = "google-bert/bert-base-uncased", "tokenizers/bert-base-uncased/vocab.txt"


@dataclass(frozen=True, eq=False)
class TextTokenizer:
    """A fast tokenizer plus its pad id, the name of the token-id field in batches and the pair format.

    ``pair_separator`` None: sentence pairs go through the tokenizer's own pair template and batches carry
    ``segment_ids`` (BERT); a string: the two texts are joined with it and there are no segment ids
    (GPT-NeoX).
    """

    name: str
    backend: Tokenizer
    pad_id: int
    ids_field: str  # "idx" (SpikeGPT) or "input_ids" (BERT)
    pair_separator: str | None
    default_max_length: int
    source: str

    @property
    def vocab_size(self) -> int:
        """Number of ids including added tokens (50,277 for GPT-NeoX-20B, 30,522 for bert-base-uncased)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def uses_segments(self) -> bool:
        """True when batches carry ``segment_ids`` (pairs through the tokenizer's template)."""
        return self.pair_separator is None

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` (int32), with the tokenizer's special tokens (none for GPT-NeoX)."""
        return np.asarray(self.backend.encode(text).ids, np.int32)

    def encode_fixed(self, first: Sequence[str], second: Sequence[str] | None = None, *,
                     max_length: int | None = None) -> dict[str, np.ndarray]:
        """Encode texts (or pairs) to ``(N, max_length)`` int32 arrays, truncated and right-padded with the
        pad id.

        Returns ``{ids_field, "attention_mask"(, "segment_ids")}``; pairs are truncated longest-first.
        """
        length = max_length or self.default_max_length
        tok = Tokenizer.from_str(self.backend.to_str())  # configured copy: the shared backend stays unpadded
        tok.enable_truncation(length)
        tok.enable_padding(length=length, pad_id=self.pad_id, pad_token=self.backend.id_to_token(self.pad_id))
        if second is None:
            inputs: list = list(first)
        elif self.pair_separator is not None:
            inputs = [a + self.pair_separator + b for a, b in zip(first, second, strict=True)]
        else:
            inputs = list(zip(first, second, strict=True))
        encodings = tok.encode_batch(inputs)

        def stacked(name: str) -> np.ndarray:
            return np.asarray([getattr(e, name) for e in encodings], np.int32).reshape(-1, length)

        out = {self.ids_field: stacked("ids"), "attention_mask": stacked("attention_mask")}
        if self.uses_segments:
            out["segment_ids"] = stacked("type_ids")
        return out


def _tokenizer_file(hub_repo: str, hub_filename: str, relative: str, what: str,
                    data_dir: str | Path | None) -> tuple[Path, str]:
    root = resolve_data_dir(data_dir)
    if root is not None:
        path = local_file(root, relative, what, hub_repo)
        return path, f"local:{path}"
    path = from_hub(lambda: hub_file(hub_repo, hub_filename), what, relative, hub_repo)
    return path, f"hub:{hub_repo}"


def gpt_neox_tokenizer(*, data_dir: str | Path | None = None) -> TextTokenizer:
    """The GPT-NeoX-20B tokenizer of SpikeGPT (pad ``<|padding|>`` = 1, ids field ``idx``, fixed length
    128)."""
    path, source = _tokenizer_file(NEOX_HUB, "tokenizer.json", NEOX_LOCAL, "GPT-NeoX-20B tokenizer",
                                   data_dir)
    backend = Tokenizer.from_file(str(path))
    pad_id = backend.token_to_id("<|padding|>")
    return TextTokenizer("gpt-neox-20b", backend, pad_id, "idx", "\n", 128, source)


def bert_tokenizer(*, data_dir: str | Path | None = None) -> TextTokenizer:
    """bert-base-uncased WordPiece: BERT normaliser (lower-case, accents stripped), ``[CLS] A [SEP] B
    [SEP]``."""
    path, source = _tokenizer_file(BERT_HUB, "vocab.txt", BERT_LOCAL, "bert-base-uncased vocabulary",
                                   data_dir)
    backend = Tokenizer(WordPiece.from_file(str(path), unk_token="[UNK]"))
    backend.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])  # already in the vocabulary
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.BertProcessing(("[SEP]", sep_id), ("[CLS]", cls_id))
    backend.decoder = decoders.WordPiece()
    pad_id = backend.token_to_id("[PAD]")
    return TextTokenizer("bert-base-uncased", backend, pad_id, "input_ids", None, 128, source)
