"""CUDA graphs for the fast runtime's small forwards (decode, verification, drafting).

On a GPU a 1.5B model's eager forward is bound by launching ~1,000 small kernels, not by reading its
weights. A CUDA graph records the kernels of one forward once and replays them with one launch. A graph
has fixed shapes and fixed memory addresses, so `GraphRunner` keeps one graph per (rows in the batch B,
new tokens T, key span S) of the KV cache in use, with static input buffers (a new or grown cache drops
the graphs of the old one, which they hold on to); the host-side work of a forward (the
attention mask over the tree and the committed keys, the KV slots, which cache rows) stays outside the
graph and is copied into those buffers before each replay. S is the attended key range rounded up to
`SPAN_BUCKET`, the keys past each row's own ones masked, so one graph serves 256 consecutive lengths.

What a graph captures is `LlamaModel.hidden_states` and `logits` for every new token: the same
functions the eager path runs. Forwards with more than `GRAPH_MAX_TOKENS` new tokens (prefill) or
without logits stay eager. `capture=False` runs the same static-buffer path eagerly, which is how the
CPU tests check the buffers, the span buckets and the masking against the plain eager forward.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

GRAPH_MAX_TOKENS = 32
SPAN_BUCKET = 256
MAX_GRAPHS = 256  # least recently used graphs beyond this are dropped (each holds its logits buffer)


class _Graph:
    def __init__(self, model, cache, batch: int, num_tokens: int, span: int, pool, capture: bool):
        c = model.config
        device = model.device
        groups = c.num_heads // c.num_kv_heads
        self.model, self.cache, self.span, self.pool, self.capture = model, cache, span, pool, capture
        self.ids = torch.zeros(batch, num_tokens, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, num_tokens, dtype=torch.long, device=device)
        self.mask = torch.zeros(batch, 1, groups * num_tokens, span, dtype=torch.bool, device=device)
        self.slots = torch.zeros(batch, num_tokens, dtype=torch.long, device=device)
        self.row_index = torch.zeros(batch, dtype=torch.long, device=device)
        self.graph = None
        self.out = None

    def _compute(self) -> torch.Tensor:
        h = self.model.hidden_states(
            self.ids, self.positions, self.cache, self.mask, self.slots, self.row_index, self.span
        )
        return self.model.logits(h)

    def run(self, input_ids, positions, mask, slots, row_index) -> torch.Tensor:
        """Logits [B, T, V] (fp32) of the new tokens; the returned tensor is reused by the next replay."""
        for static, value in (
            (self.ids, input_ids),
            (self.positions, positions),
            (self.mask, mask),
            (self.slots, slots),
            (self.row_index, row_index),
        ):
            static.copy_(value, non_blocking=True)
        if not self.capture:
            return self._compute()
        if self.graph is None:
            # Warm up on a side stream (this run's inputs: it writes the same KV the replay writes), then record.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._compute()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=self.pool):
                self.out = self._compute()
        self.graph.replay()
        return self.out


class GraphRunner:
    """The graphs of one model; `lookup` says which one a forward uses (None: run it eagerly)."""

    def __init__(self, model, capture: bool | None = None):
        self.model = model
        self.capture = model.device.type == "cuda" if capture is None else capture
        if self.capture and model.device.type != "cuda":
            raise ValueError("CUDA graphs need a model on a CUDA device")
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.cache_in_use = None  # (cache, its K tensor's address): the graphs below write into it
        self.replays = 0

    def lookup(self, cache, rows: list[int], num_tokens: int, prior: int) -> _Graph | None:
        """The graph for a forward of `num_tokens` new tokens after `prior` uncommitted slots in cache rows
        `rows`, created on first use; None when the forward is too large for one."""
        if num_tokens > GRAPH_MAX_TOKENS:
            return None
        if self.cache_in_use is None or self.cache_in_use[0] is not cache or self.cache_in_use[1] != cache.k.data_ptr():
            self.graphs.clear()
            if self.capture:  # the old pool goes with its graphs; capturing into a freed pool is an error
                self.pool = torch.cuda.graph_pool_handle()
            self.cache_in_use = (cache, cache.k.data_ptr())
        needed = max(cache.lengths[r] for r in rows) + prior + num_tokens
        span = min(-(-needed // SPAN_BUCKET) * SPAN_BUCKET, cache.max_len)
        key = (len(rows), num_tokens, span)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = _Graph(self.model, cache, len(rows), num_tokens, span, self.pool, self.capture)
            while len(self.graphs) > MAX_GRAPHS:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        self.replays += 1
        return graph
