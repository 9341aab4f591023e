"""Prompt lookup decoding (Saxena, 2023): propose the tokens that followed the latest earlier occurrence
of the sequence's last n-gram (n from max_ngram down to min_ngram) in the prompt + output so far.
The proposal is deterministic, so its q is the point mass on each proposed token."""

from __future__ import annotations

import numpy as np

from specgrove.drafting.base import Proposer
from specgrove.engine.sequence import Sequence
from specgrove.trees.tree import TokenTree


class PromptLookupProposer(Proposer):
    name = "prompt_lookup"

    def __init__(self, min_ngram: int = 1, max_ngram: int = 3):
        if min_ngram < 1 or max_ngram < min_ngram:
            raise ValueError(f"prompt lookup needs 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.min_ngram = min_ngram
        self.max_ngram = max_ngram

    def lookup(self, tokens: list[int], num_tokens: int) -> list[int]:
        if num_tokens <= 0:
            return []
        arr = np.asarray(tokens, dtype=np.int64)
        length = len(arr)
        for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            pattern = arr[length - n :]
            windows = np.lib.stride_tricks.sliding_window_view(arr[: length - 1], n)  # starts 0..length-1-n
            hits = np.flatnonzero((windows == pattern).all(axis=1))
            hits = hits[hits + n < length]  # a continuation must exist (excludes the suffix itself)
            if hits.size:
                start = int(hits[-1]) + n
                return arr[start : start + num_tokens].tolist()
        return []

    def propose(self, seq: Sequence, num_tokens: int) -> TokenTree:
        return TokenTree.chain(self.lookup(seq.token_ids, num_tokens))
