"""Text features: tokenisation, the vocabulary fitted on the train split, token-id encoding
and the synonym table for augmentation.

A text example is served as token ids ``tok_0..tok_{L-1}``: its lowercase words looked up in
the vocabulary (``transform["text"]["vocab"]``), unknown words ``UNK_ID`` (1), padded with
``PAD_ID`` (0) at the end to the fitted sequence length ``L``; see :func:`encode_texts`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from kubeloop_pipelines.ml.builtin_datasets import REVIEW_SYNONYMS

PAD_ID = 0
UNK_ID = 1
MIN_SEQ_LEN = 8
MAX_SEQ_LEN = 128
MAX_VOCAB = 20_000
_WORD = re.compile(r"[a-z0-9']+")


def tokenize(text: str) -> list[str]:
    """Lowercase words (letters, digits, apostrophes); punctuation separates them."""
    return _WORD.findall(text.lower())


def encode_texts(texts: Iterable[Any], vocab: Sequence[str], seq_len: int) -> npt.NDArray[np.int64]:
    """Token ids (n, seq_len): the first ``seq_len`` words, unknown words ``UNK_ID``, padded with
    ``PAD_ID`` at the end; a missing text is all padding."""
    index = {word: i for i, word in enumerate(vocab)}
    rows: list[list[int]] = []
    for text in texts:
        words = tokenize(text) if isinstance(text, str) else []
        ids = [index.get(w, UNK_ID) for w in words[:seq_len]]
        rows.append(ids + [PAD_ID] * (seq_len - len(ids)))
    return np.asarray(rows, dtype=np.int64).reshape(len(rows), seq_len)


def fit_vocab(texts: pd.Series) -> tuple[list[str], int]:
    """The vocabulary (``<pad>``, ``<unk>``, then the most frequent words) and the sequence
    length (the 95th percentile of the word counts, rounded up to a multiple of 8)."""
    counts: Counter[str] = Counter()
    lengths: list[int] = []
    for text in texts:
        words = tokenize(text) if isinstance(text, str) else []
        counts.update(words)
        lengths.append(len(words))
    # most frequent first, ties alphabetically, so the ids are deterministic
    words = sorted(counts, key=lambda w: (-counts[w], w))[: MAX_VOCAB - 2]
    p95 = float(np.percentile(lengths, 95)) if lengths else 0.0
    seq_len = int(min(max(math.ceil(p95 / 8) * 8, MIN_SEQ_LEN), MAX_SEQ_LEN))
    return ["<pad>", "<unk>", *words], seq_len


def synonym_ids(
    vocab: Sequence[str], groups: Iterable[Sequence[str]] = REVIEW_SYNONYMS
) -> dict[str, list[int]]:
    """Token id → ids of its synonyms in ``vocab`` (JSON keys are strings), for augmentation."""
    index = {word: i for i, word in enumerate(vocab)}
    out: dict[str, list[int]] = {}
    for group in groups:
        present = [index[w] for w in group if w in index]
        for token in present:
            others = [o for o in present if o != token]
            if others:
                out[str(token)] = others
    return out
