"""A preallocated KV cache that takes token trees.

Layout: keys and values of all layers in one tensor each, [layers, batch, kv_heads, max_len, head_dim],
allocated once (as gpt-fast does), so committing a tree path is one gather over all layers.

Each sequence b has a committed length `lengths[b]`. A forward over T new tokens writes their keys and
values into slots lengths[b] .. lengths[b] + T - 1 without committing them; afterwards `commit(b, keep)`
keeps any subset of those new slots (e.g. the accepted path of a token tree), moving them to be
contiguous after the committed prefix, and drops the rest. Slots past `lengths[b]` are never attended
to unless a forward writes them again, so nothing needs clearing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        # Host-side committed lengths: the engine's bookkeeping never waits on the device for them.
        self.lengths: list[int] = [0] * batch_size
        self.pending: list[int] = [0] * batch_size  # new (uncommitted) slots written by the last forward

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def check_room(self, num_new: int, rows: Sequence[int] | None = None) -> None:
        rows = range(self.batch_size) if rows is None else rows
        for b in rows:
            if self.lengths[b] + num_new > self.max_len:
                raise ValueError(
                    f"sequence {b} needs {self.lengths[b] + num_new} cache slots but the cache holds {self.max_len}; "
                    f"raise max_model_len or shorten the prompt / max_new_tokens"
                )

    def commit(self, row: int, keep: Sequence[int] | torch.Tensor | None = None) -> None:
        """Keep the new slots `keep` (indices relative to the first new slot, increasing) of sequence `row`.

        None keeps every slot the last forward wrote. A prefix 0..n-1 needs no copy.
        """
        start = self.lengths[row]
        if keep is None:
            n = self.pending[row]
        else:
            keep_list = keep.tolist() if isinstance(keep, torch.Tensor) else list(keep)
            n = len(keep_list)
            if keep_list != list(range(n)):
                if any(b <= a for a, b in zip(keep_list, keep_list[1:])) or (n and keep_list[0] < 0):
                    raise ValueError(f"kept positions must be increasing and non-negative, got {keep_list}")
                index = torch.tensor(keep_list, device=self.k.device) + start
                # Advanced indexing copies first, so the overlapping move is safe.
                self.k[:, row, :, start : start + n] = self.k[:, row, :, index]
                self.v[:, row, :, start : start + n] = self.v[:, row, :, index]
        self.lengths[row] = start + n
        self.pending[row] = 0

    def truncate(self, row: int, length: int) -> None:
        """Forget everything of sequence `row` past `length` committed tokens."""
        if length > self.lengths[row]:
            raise ValueError(f"cannot truncate sequence {row} of length {self.lengths[row]} up to {length}")
        self.lengths[row] = length
        self.pending[row] = 0

    def reset(self, row: int) -> None:
        self.truncate(row, 0)

    def grow(self, batch_size: int) -> None:
        """Make room for `batch_size` rows, keeping the existing rows (one copy of the tensors)."""
        old = self.batch_size
        if batch_size <= old:
            return
        for name in ("k", "v"):
            t = getattr(self, name)
            bigger = torch.zeros((t.shape[0], batch_size, *t.shape[2:]), dtype=t.dtype, device=t.device)
            bigger[:, :old] = t
            setattr(self, name, bigger)
        self.lengths += [0] * (batch_size - old)
        self.pending += [0] * (batch_size - old)


class NoFreeRowError(RuntimeError):
    """Every cache row is in use (the engine's max_num_seqs requests are running)."""


class CachePool:
    """Rows of one KV cache handed out to sequences, so that running sequences share one cache and one
    batched forward. The cache is created with one row and doubles (up to `max_rows`) when every row is
    taken; `release` gives a row back. Memory: rows x max_len positions, allocated when first needed."""

    def __init__(self, model, max_len: int, max_rows: int | None = None):
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"a cache pool needs at least one row, got max_rows={max_rows}")
        self.model = model
        self.max_len = max_len
        self.max_rows = max_rows
        self.cache = None
        self.free: list[int] = []

    @property
    def in_use(self) -> int:
        return (0 if self.cache is None else self.cache.batch_size) - len(self.free)

    def acquire(self) -> int:
        if self.free:
            row = self.free.pop(0)
            self.cache.reset(row)
            return row
        if self.cache is None:
            self.cache = self.model.new_cache(1, self.max_len)
            return 0
        size = self.cache.batch_size
        if (self.max_rows is not None and size >= self.max_rows) or not hasattr(self.cache, "grow"):
            raise NoFreeRowError(
                f"all {size} cache rows are in use; finish or abort a sequence first"
                + ("" if hasattr(self.cache, "grow") else " (the transformers fallback runs one sequence at a time)")
            )
        new_size = size * 2 if self.max_rows is None else min(size * 2, self.max_rows)
        self.cache.grow(new_size)
        self.free.extend(range(size + 1, new_size))
        self.cache.reset(size)
        return size

    def release(self, row: int) -> None:
        if row in self.free or self.cache is None or not 0 <= row < self.cache.batch_size:
            raise ValueError(f"cache row {row} is not in use")
        self.free.append(row)
        self.free.sort()


PREFILL_CHUNK = 512  # prompt tokens per prefill forward


def forward_chunked(
    model,
    cache,
    row: int,
    tokens: list[int],
    start: int,
    want_logits: bool = False,
    features: tuple[int, ...] | None = None,
    feature_chunks: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor | None, int]:
    """Run `tokens` (positions start..) through `model` into cache row `row`, PREFILL_CHUNK at a time,
    committing each chunk. Returns (the logits [V] after the last token when asked, the forwards run).
    `features` (layer indices, as `LlamaModel.forward` takes them): each chunk's features [n, F] are appended
    to `feature_chunks`."""
    logits, forwards = None, 0
    end = start + len(tokens)
    for begin in range(start, end, PREFILL_CHUNK):
        stop = min(begin + PREFILL_CHUNK, end)
        out = model.forward(
            torch.tensor([tokens[begin - start : stop - start]]),
            torch.arange(begin, stop)[None],
            cache,
            rows=[row],
            logits_at="last" if want_logits and stop == end else None,
            features=features,
        )
        if features is not None:
            out, feats = out
            feature_chunks.append(feats[0])
        cache.commit(row)
        forwards += 1
        if out is not None:
            logits = out[0, -1]
    return logits, forwards
