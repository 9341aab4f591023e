"""The speculative decoding loop, one path for every method:

    proposer -> TokenTree -> one target forward over root + tree -> verifier -> KV commit -> metrics

A plain decoding step is the same step with an empty tree (k = 0).
"""

from __future__ import annotations

import copy
import time
import uuid

import torch

from specgrove.drafting.base import Proposer
from specgrove.engine.sequence import Sequence, TokenLogprob
from specgrove.errors import UnsupportedError
from specgrove.models.kv_cache import CachePool, forward_chunked
from specgrove.models.loader import LoadedModel
from specgrove.sampling import ProcessedRows, Sampler, SamplingParams
from specgrove.trees.tree import TokenTree
from specgrove.verify.speculative import rejection_select, verify_tree, verify_tree_greedy


def eos_token_ids(loaded: LoadedModel) -> set[int]:
    ids: set[int] = set()
    for source in (loaded.hf_config, getattr(loaded.model, "generation_config", None), loaded.tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


class SpecEngine:
    """Runs sequences through the one speculative step. Running sequences share the target's KV cache
    (one row each, `CachePool`), so `step_batch` verifies all of them in one batched target forward;
    `step` is a batch of one. `max_num_seqs` bounds the rows (None: grow as needed)."""

    def __init__(
        self,
        target: LoadedModel,
        proposer: Proposer | None = None,
        num_speculative_tokens: int = 0,
        max_model_len: int = 4096,
        max_num_seqs: int | None = None,
    ):
        if num_speculative_tokens < 0:
            raise ValueError(f"num_speculative_tokens must be >= 0, got {num_speculative_tokens}")
        self.target = target
        self.model = target.model
        self.tokenizer = target.tokenizer
        self.proposer = proposer
        self.num_speculative_tokens = num_speculative_tokens if proposer is not None else 0
        self.max_model_len = max_model_len
        self.eos_ids = eos_token_ids(target)
        draft_model = proposer.model if proposer is not None else None
        if not all(getattr(m, "supports_batching", True) for m in (self.model, draft_model) if m is not None):
            max_num_seqs = 1  # the transformers fallback runs one sequence at a time
        self.pool = CachePool(self.model, max_model_len, max_num_seqs)
        # The target features the proposer reads (a feature-level draft head), from the same forwards.
        self.feature_layers = proposer.feature_layers if proposer is not None else None
        if self.feature_layers is not None and not getattr(self.model, "supports_features", True):
            raise UnsupportedError(
                f"the {proposer.name} proposer reads the target's hidden states, which the transformers fallback "
                "does not return; load the target in the runtime's own formats"
            )
        self._sync = torch.cuda.synchronize if target.device.type == "cuda" else (lambda: None)

    # ---- request lifecycle -------------------------------------------------------------------
    def new_sequence(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None, sampler=None
    ) -> Sequence:
        if not prompt_ids:
            raise ValueError("the prompt is empty; give at least one token")
        if any((not isinstance(t, int)) or t < 0 or t >= self.model.vocab_size for t in prompt_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {self.model.vocab_size})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this target model has none; use stop_token_ids")
        needed = len(prompt_ids) + params.max_tokens + self.num_speculative_tokens + 1
        if needed > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) + speculation "
                f"({self.num_speculative_tokens + 1}) exceeds max_model_len={self.max_model_len}; shorten the "
                f"prompt, lower max_tokens, or raise max_model_len"
            )
        return Sequence(
            request_id=request_id or uuid.uuid4().hex,
            prompt_ids=list(prompt_ids),
            params=params,
            sampler=sampler if sampler is not None else Sampler(params.seed, self.target.device),
        )

    def prefill(self, seq: Sequence, max_tokens: int | None = None) -> int:
        """Put the next prompt tokens (at most `max_tokens`; None: all that are left) into the sequence's
        cache row, taking a row at the first call; returns how many. The prefill is done when every prompt
        token but the last is in (`seq.prefill_left == 0`): the last is the first step's root. The proposer
        fills its own cache with the same tokens (`Proposer.prefill`), so that no step runs a prompt.
        Raises NoFreeRowError when max_num_seqs sequences hold rows."""
        start = time.perf_counter()
        if seq.target_cache is None:
            seq.cache_row = self.pool.acquire()
            seq.target_cache = self.pool.cache
        count = seq.prefill_left if max_tokens is None else max(0, min(max_tokens, seq.prefill_left))
        if count == 0:
            return 0
        begin = seq.prefilled
        _, forwards = forward_chunked(
            self.model,
            seq.target_cache,
            seq.cache_row,
            seq.prompt_ids[begin : begin + count],
            begin,
            features=self.feature_layers,
            feature_chunks=seq.target_features,
        )
        seq.prefilled += count
        seq.metrics.prefill_forwards += forwards
        if self.proposer is not None:
            seq.metrics.prefill_forwards += self.proposer.prefill(seq, seq.prefilled)
        self._sync()
        seq.metrics.prefill_time_s += time.perf_counter() - start
        return count

    def step(self, seq: Sequence, num_draft: int | None = None) -> list[int]:
        """One speculative step of one sequence; returns the tokens it appended to the output."""
        return self.step_batch([seq], None if num_draft is None else [num_draft])[0]

    def draft_lengths(self, seqs: list[Sequence], num_draft: list[int] | None = None) -> list[int]:
        """How many draft tokens each sequence may get: the asked number (default the engine's
        num_speculative_tokens), never past max_tokens, 0 without a proposer."""
        if self.proposer is None:
            return [0] * len(seqs)
        asked = num_draft if num_draft is not None else [self.num_speculative_tokens] * len(seqs)
        return [max(0, min(k, self.num_speculative_tokens, s.remaining - 1)) for k, s in zip(asked, seqs)]

    def propose(self, seqs: list[Sequence], num_draft: list[int]) -> list[TokenTree]:
        """The draft phase: one `propose_batch` call (a draft model batches the sequences; other proposers
        propose for each in turn)."""
        wanted = [i for i, k in enumerate(num_draft) if k > 0]
        trees = [TokenTree() for _ in seqs]
        if not wanted:
            return trees
        for i, tree in zip(
            wanted, self.proposer.propose_batch([seqs[i] for i in wanted], [num_draft[i] for i in wanted])
        ):
            trees[i] = tree
        return trees

    def step_batch(self, seqs: list[Sequence], num_draft: list[int] | None = None) -> list[list[int]]:
        """One speculative step of every sequence in `seqs` (prefilled, unfinished): the draft phase,
        one target forward over every row's root + tree (padded to the longest), per-row verification
        and KV commit. `num_draft`: draft tokens per sequence (0 = a plain step for that one). Returns
        the tokens appended to each sequence.

        The step is a transaction: every row is verified before any row commits, and if anything raises
        before the commit (a proposer, the forward, one row's verification), no sequence has changed. Its
        cache keeps only its committed slots and its sampler is back where it was, so the step can be run
        again (the scheduler then steps each sequence alone) and gives what it would have given."""
        if not seqs:
            return []
        if any(s.finished for s in seqs):
            raise ValueError(
                "step_batch takes unfinished sequences: " + ", ".join(s.request_id for s in seqs if s.finished)
            )
        ks = self.draft_lengths(seqs, num_draft)
        saved = [(_sampler_state(s.sampler), copy.copy(s.metrics)) for s in seqs]
        try:
            t0 = time.perf_counter()
            trees = self.propose(seqs, ks)
            self._sync()
            t1 = time.perf_counter()
            logits, features, sizes = self._target_forward(seqs, trees)
            self._sync()
            t2 = time.perf_counter()
            results = [
                self._verify(seq, tree, logits[b, :size]) for b, (seq, tree, size) in enumerate(zip(seqs, trees, sizes))
            ]
        except BaseException:
            for seq, (sampler_state, metrics) in zip(seqs, saved):
                _restore_sampler(seq.sampler, sampler_state)
                vars(seq.metrics).update(vars(metrics))  # in place: others may hold the object
            raise
        cache = self.pool.cache
        appended = []
        for b, (seq, tree, result) in enumerate(zip(seqs, trees, results)):
            committed = [0] + [node + 1 for node in result.accepted_nodes]
            cache.commit(seq.cache_row, committed)
            if features is not None:
                seq.target_features.append(features[b, committed])
            metrics = seq.metrics
            # Every sequence of the batch waited for the whole draft phase and target forward.
            metrics.draft_time_s += t1 - t0
            metrics.target_time_s += t2 - t1
            metrics.record_step(max(tree.depths(), default=0), len(tree), result.num_accepted, result.decisions)
            new_tokens = [tree.tokens[node] for node in result.accepted_nodes] + [result.next_token]
            appended.append(self._append(seq, new_tokens))
            if seq.logprobs is not None:
                # row committed[i] is the distribution new_tokens[i] was drawn from (root, then the accepted path)
                seq.logprobs.extend(token_logprobs(logits[b, committed], appended[-1], seq.params.logprobs))
        t3 = time.perf_counter()
        for seq in seqs:
            seq.metrics.verify_time_s += t3 - t2
        return appended

    def _target_forward(self, seqs: list[Sequence], trees: list[TokenTree]):
        """The one target forward of a step over every row's root + tree: (logits [B, W, V], the features
        asked for or None, each row's size). Its slots stay uncommitted until `cache.commit`."""
        cache = self.pool.cache
        rows = [s.cache_row for s in seqs]
        if any(s.target_cache is not cache or s.prefill_left > 0 for s in seqs) or len(set(rows)) != len(rows):
            raise ValueError("step_batch takes distinct sequences prefilled (whole prompts) by this engine")
        sizes = [len(t) + 1 for t in trees]
        width = max(sizes)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        positions = torch.zeros(len(seqs), width, dtype=torch.long)
        chains = all(t.is_chain() for t in trees) and len(set(sizes)) == 1
        mask = None if chains else torch.zeros(len(seqs), width, width, dtype=torch.bool)
        for b, (seq, tree, size) in enumerate(zip(seqs, trees, sizes)):
            ids[b, :size] = torch.tensor([seq.token_ids[-1]] + tree.tokens)
            offsets = torch.tensor(tree.position_offsets()) + cache.lengths[rows[b]]
            positions[b, :size] = offsets
            positions[b, size:] = offsets[-1]
            if mask is not None:
                mask[b, :size, :size] = tree.attention_mask()
        out = self.model.forward(
            ids,
            positions,
            cache,
            tree_mask=mask,
            rows=rows,
            num_new=None if chains else sizes,
            features=self.feature_layers,
        )
        logits, features = (out, None) if self.feature_layers is None else out
        return logits, features, sizes

    def _verify(self, seq: Sequence, tree: TokenTree, row_logits: torch.Tensor):
        """The verifier's walk over one row's tree (the target's logits at its root and nodes). With penalties,
        row r is penalised for its own context: the committed tokens + the tokens of the path to node r - 1."""
        penalise = None
        if seq.token_counts is not None:

            def penalise(row: int, logits: torch.Tensor) -> torch.Tensor:
                return seq.penalised(logits, [tree.tokens[n] for n in tree.path_to(row - 1)])

        # Rows are processed as the walk reaches them (the root and the accepted path), not all of them.
        rows = ProcessedRows(row_logits, seq.params, penalise)
        if seq.params.greedy:
            if penalise is None:
                return verify_tree_greedy(tree, row_logits.argmax(-1).tolist())
            return verify_tree_greedy(tree, _Argmax(rows))
        # a plain engine (no proposer) verifies empty trees: the standard rule, never consulted
        node_rule = self.proposer.node_rule if self.proposer is not None else rejection_select
        return verify_tree(tree, rows, seq.sampler, node_rule)

    def _append(self, seq: Sequence, new_tokens: list[int]) -> list[int]:
        """Append tokens one by one, stopping at the first EOS / stop token / stop string / length limit."""
        params = seq.params
        appended = []
        for token in new_tokens:
            seq.output_ids.append(token)
            appended.append(token)
            if not params.ignore_eos and token in self.eos_ids:
                seq.finish_reason, seq.stop_reason = "stop", token
            elif token in params.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", token
            elif params.stop and self._hit_stop_string(seq):
                pass  # finish fields set by _hit_stop_string
            elif len(seq.output_ids) >= params.max_tokens:
                seq.finish_reason = "length"
            if seq.finished:
                break
        return appended

    def _hit_stop_string(self, seq: Sequence) -> bool:
        text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=seq.params.skip_special_tokens)
        longest = max(len(s) for s in seq.params.stop)
        window_start = max(0, len(seq.text) - longest + 1)  # seq.text holds the text checked so far
        best = first_stop(text, seq.params.stop, window_start)
        seq.text = text
        if best is None:
            return False
        index, stop = best
        seq.text = text[: index + (len(stop) if seq.params.include_stop_str_in_output else 0)]
        seq.finish_reason, seq.stop_reason = "stop", stop
        return True

    def finish(self, seq: Sequence) -> None:
        """Free the sequence's cache row and proposer state, decode its text (idempotent)."""
        if self.proposer is not None:
            self.proposer.release(seq)
        if seq.target_cache is not None:
            self.pool.release(seq.cache_row)
        seq.target_cache = None
        if not (seq.params.stop and seq.stop_reason in seq.params.stop) and self.tokenizer is not None:
            seq.text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=seq.params.skip_special_tokens)
        seq.metrics.generated_tokens = len(seq.output_ids)

    def generate(self, seq: Sequence) -> Sequence:
        start = time.perf_counter()
        try:
            self.prefill(seq)
            while not seq.finished:
                self.step(seq)
        finally:
            self.finish(seq)
        seq.metrics.total_time_s = time.perf_counter() - start
        return seq


def first_stop(text: str, stops, start: int = 0) -> tuple[int, str] | None:
    """(index, stop string) of the stop string that occurs first in `text` from `start` on; None if none does."""
    best = None
    for stop in stops:
        index = text.find(stop, start)
        if index >= 0 and (best is None or index < best[0]):
            best = (index, stop)
    return best


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """The raw log-softmax of `logits` [>= len(tokens), V] at each emitted token (row i emitted tokens[i]),
    with the `top` most likely tokens of each row."""
    logprobs = torch.log_softmax(logits[: len(tokens)].float(), -1)
    chosen = logprobs.gather(-1, torch.tensor(tokens, device=logprobs.device)[:, None])[:, 0].tolist()
    values, ids = logprobs.topk(min(top, logprobs.shape[-1]), -1) if top else (None, None)
    return [
        TokenLogprob(token, chosen[i], [] if not top else list(zip(ids[i].tolist(), values[i].tolist())))
        for i, token in enumerate(tokens)
    ]


class _Argmax:
    """The argmax of each processed row (greedy: one-hot), computed as the walk reaches it."""

    def __init__(self, rows: ProcessedRows):
        self.rows = rows

    def __getitem__(self, row: int) -> int:
        return int(self.rows[row].argmax())


def _sampler_state(sampler):
    """A sampler's state, or None for one that keeps none it can give back (a test's enumerating sampler)."""
    get = getattr(sampler, "get_state", None)
    return get() if get is not None else None


def _restore_sampler(sampler, state) -> None:
    if state is not None:
        sampler.set_state(state)
