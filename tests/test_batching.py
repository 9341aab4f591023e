"""Continuous batching (specgrove.engine.scheduler) and SmartSpec's goodput policy.

- Greedy identity: requests of different lengths join and leave a running batch; every output equals
  single-request plain greedy decoding (fp32), for every proposer and for fixed / goodput policies.
- Exactness through the batched path: one step of a batch, enumerated, emits the target's distribution
  for the enumerated request (the other row has another prompt length and another tree size).
- The scheduler's bounds and failure isolation; the policy's formulas and choices; the latency fit.
"""

import json

import pytest
import torch
from test_exactness import (
    SETTINGS,
    complete_with_target,
    max_difference,
    report_wrong_q,
    target_sequence_distribution,
)

from specgrove.drafting.draft_model import DraftModelProposer
from specgrove.drafting.prompt_lookup import PromptLookupProposer
from specgrove.engine.engine import SpecEngine
from specgrove.engine.latency import LatencyModel, LinearTime, PiecewiseTime, profile
from specgrove.engine.policy import FixedPolicy, GoodputPolicy, expected_tokens
from specgrove.engine.scheduler import QueueFullError, Scheduler
from specgrove.models.kv_cache import CachePool, NoFreeRowError
from specgrove.sampling import SamplingParams
from specgrove.trees.shape import TreeShape
from specgrove.verify.enumerate import enumerate_outcomes

PROMPTS = [[1, 2, 3, 1, 2], [4, 5], [7, 1, 1, 6, 2, 3, 4, 0, 5], [3], [2, 2, 2, 2, 6, 1]]
MAX_TOKENS = [12, 5, 20, 9, 15]


def plain_greedy(target, prompt, max_tokens):
    engine = SpecEngine(target, None, 0, max_model_len=64)
    seq = engine.generate(
        engine.new_sequence(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    )
    return seq.output_ids


def make_proposer(kind, draft, tree="widths:2,2"):
    if kind == "draft_model":
        return DraftModelProposer(draft, 64)
    if kind == "tree":
        return DraftModelProposer(draft, 64, TreeShape.parse(tree))
    return PromptLookupProposer(1, 2)


def run_scheduler(scheduler, engine, prompts, max_tokens, join_every=2):
    """Add requests one every `join_every` steps (so they join a running batch) and run to the end."""
    seqs = [
        engine.new_sequence(p, SamplingParams(temperature=0, max_tokens=m, ignore_eos=True), request_id=str(i))
        for i, (p, m) in enumerate(zip(prompts, max_tokens))
    ]
    pending = list(seqs)
    sizes = []
    while pending or scheduler.has_unfinished:
        if pending and scheduler.steps % join_every == 0:
            scheduler.add(pending.pop(0))
        scheduler.step()
        sizes.append(len(scheduler.running))
    return seqs, sizes


@pytest.mark.parametrize("kind", ["plain", "draft_model", "tree", "prompt_lookup"])
def test_batched_greedy_equals_single_request_plain(kind, tiny_target, tiny_draft):
    proposer = None if kind == "plain" else make_proposer(kind, tiny_draft)
    engine = SpecEngine(tiny_target, proposer, 0 if proposer is None else 3, max_model_len=64)
    scheduler = Scheduler(engine, FixedPolicy(engine.num_speculative_tokens), max_num_seqs=3)
    seqs, sizes = run_scheduler(scheduler, engine, PROMPTS, MAX_TOKENS)
    assert max(sizes) == 3, "requests must overlap in the batch"
    for seq, prompt, m in zip(seqs, PROMPTS, MAX_TOKENS):
        assert seq.finish_reason == "length"
        assert seq.output_ids == plain_greedy(tiny_target, prompt, m), seq.request_id
    assert engine.pool.in_use == 0, "finished requests give their cache rows back"
    if proposer is not None and kind != "prompt_lookup":
        assert proposer.pool.in_use == 0
        assert sum(sum(s.metrics.accepted_per_step) for s in seqs) > 0, "speculation must really happen"


def test_goodput_policy_batched_greedy_identity(tiny_target, tiny_draft):
    """Whatever k the policy picks per step (it changes between steps here), the output stays plain greedy."""
    engine = SpecEngine(tiny_target, make_proposer("draft_model", tiny_draft), 4, max_model_len=64)
    latency = LatencyModel(LinearTime(0.01, 0.001, 0.0), LinearTime(0.002, 0.0005, 0.0))
    policy = GoodputPolicy(latency, max_k=4)
    scheduler = Scheduler(engine, policy, max_num_seqs=4)
    seqs, _ = run_scheduler(scheduler, engine, PROMPTS, MAX_TOKENS, join_every=1)
    for seq, prompt, m in zip(seqs, PROMPTS, MAX_TOKENS):
        assert seq.output_ids == plain_greedy(tiny_target, prompt, m)
    assert len(set(policy.chosen)) > 1, "the test must see the policy change k"


@pytest.mark.parametrize("setting", SETTINGS[:3])  # at top-p 0.7 draft and target supports do not meet here
@pytest.mark.parametrize("kind", ["draft_model", "tree"])
def test_batched_step_distribution_is_exact(kind, setting, tiny_target, tiny_draft):
    """One batched step of [enumerated request, other request]: the enumerated one's emitted tokens
    (completed by target sampling) follow the target's distribution to 1e-6."""
    params = SamplingParams(max_tokens=4, **setting)
    k = 2
    k = k if kind == "draft_model" else 4  # the whole widths:2,1 tree (two branches of depth 2)
    engine = SpecEngine(tiny_target, make_proposer(kind, tiny_draft, "widths:2,1"), k, max_model_len=64)
    prompt = [1, 2, 3, 1, 2]
    other_params = SamplingParams(temperature=0, max_tokens=8)

    def one_step(sampler):
        other = engine.new_sequence([4, 5, 6, 7, 0, 1, 2, 3], other_params)
        seq = engine.new_sequence(prompt, params, sampler=sampler)
        engine.prefill(other)
        engine.prefill(seq)
        engine.step_batch([other, seq], [1, k])
        engine.finish(other)
        engine.finish(seq)
        return tuple(seq.output_ids)

    emitted = enumerate_outcomes(one_step)
    assert abs(sum(emitted.values()) - 1.0) < 1e-9
    assert any(len(s) > 1 for s in emitted), "the test would be vacuous"
    length = max(len(s) for s in emitted)
    exact = target_sequence_distribution(tiny_target, prompt, length, params, tiny_target.vocab_size)
    spec = complete_with_target(emitted, tiny_target, prompt, params, length, tiny_target.vocab_size)
    assert max_difference(spec, exact) < 1e-6


def test_batched_wrong_q_fails(tiny_target, tiny_draft, monkeypatch):
    """The batched path's enumeration catches a proposer reporting the wrong q (the test can fail)."""
    report_wrong_q(monkeypatch)
    k = 2
    params = SamplingParams(temperature=1.0, max_tokens=1)
    engine = SpecEngine(tiny_target, make_proposer("draft_model", tiny_draft), k, max_model_len=64)
    prompt = [1, 2, 3, 1, 2]

    def first_token(sampler):
        other = engine.new_sequence([4, 5, 6], SamplingParams(temperature=0, max_tokens=8))
        seq = engine.new_sequence(prompt, SamplingParams(temperature=1.0, max_tokens=k + 1), sampler=sampler)
        engine.prefill(other)
        engine.prefill(seq)
        engine.step_batch([other, seq], [k, k])
        engine.finish(other)
        engine.finish(seq)
        return seq.output_ids[0]

    emitted = enumerate_outcomes(first_token)
    exact = target_sequence_distribution(tiny_target, prompt, 1, params, tiny_target.vocab_size)
    assert max(abs(emitted.get(t, 0.0) - exact.get((t,), 0.0)) for t in range(tiny_target.vocab_size)) > 1e-3


# ---- scheduler ---------------------------------------------------------------------------------------
def test_queue_bound_abort_and_rows(tiny_target):
    engine = SpecEngine(tiny_target, None, 0, max_model_len=64)
    scheduler = Scheduler(engine, max_num_seqs=2, max_waiting=2)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    seqs = [engine.new_sequence([1, 2, 3], params, request_id=f"r{i}") for i in range(5)]
    for seq in seqs[:4]:  # two take the free rows at the next step, two wait
        scheduler.add(seq)
    with pytest.raises(QueueFullError, match="max_waiting=2"):
        scheduler.add(seqs[4])
    scheduler.step()
    assert len(scheduler.running) == 2 and len(scheduler.waiting) == 2, "max_num_seqs bounds the batch"
    assert scheduler.abort("r0") and seqs[0].finish_reason == "abort"
    assert engine.pool.in_use == 1, "an aborted request frees its row"
    assert scheduler.abort("r3") and not scheduler.abort("nope")
    scheduler.run_to_completion()
    assert seqs[1].output_ids == plain_greedy(tiny_target, [1, 2, 3], 30)
    assert seqs[2].output_ids == seqs[1].output_ids
    assert seqs[3].output_ids == [] and engine.pool.in_use == 0
    none_wait = Scheduler(engine, max_num_seqs=1, max_waiting=0)
    none_wait.add(seqs[4])  # max_waiting 0: a request a free row takes is still served
    with pytest.raises(QueueFullError):
        none_wait.add(engine.new_sequence([1, 2], params, request_id="r5"))
    none_wait.run_to_completion()
    assert seqs[4].output_ids == seqs[1].output_ids


def test_one_failing_request_does_not_stop_the_others(tiny_target, tiny_draft, monkeypatch):
    proposer = make_proposer("draft_model", tiny_draft)
    engine = SpecEngine(tiny_target, proposer, 3, max_model_len=64)
    original = DraftModelProposer.propose_batch

    def fails_for_bad(self, seqs, ks):
        if any(s.request_id == "bad" for s in seqs):
            raise RuntimeError("boom")
        return original(self, seqs, ks)

    monkeypatch.setattr(DraftModelProposer, "propose_batch", fails_for_bad)
    scheduler = Scheduler(engine, max_num_seqs=3)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    good = [engine.new_sequence(p, params, request_id=f"g{i}") for i, p in enumerate(PROMPTS[:2])]
    bad = engine.new_sequence([1, 2], params, request_id="bad")
    for s in (good[0], bad, good[1]):
        scheduler.add(s)
    finished = []
    while scheduler.has_unfinished:
        finished += [o.seq.request_id for o in scheduler.step() if o.finished]
    assert bad.finish_reason == "error" and "boom" in bad.error
    assert sorted(finished) == ["bad", "g0", "g1"]
    for s, p in zip(good, PROMPTS[:2]):
        assert s.output_ids == plain_greedy(tiny_target, p, 10)
    assert engine.pool.in_use == 0 and proposer.pool.in_use == 0


def test_scheduler_and_policy_forget_requests_that_leave(tiny_target, tiny_draft, monkeypatch):
    """The scheduler's times and the goodput policy's estimates are kept per request only while it waits or
    runs: a finished, failed or aborted (waiting or running) request leaves nothing behind."""
    engine = SpecEngine(tiny_target, make_proposer("draft_model", tiny_draft), 3, max_model_len=64)
    original = DraftModelProposer.propose_batch

    def fails_for_bad(self, seqs, ks):
        if any(s.request_id == "bad" for s in seqs):
            raise RuntimeError("boom")
        return original(self, seqs, ks)

    monkeypatch.setattr(DraftModelProposer, "propose_batch", fails_for_bad)
    policy = GoodputPolicy(LatencyModel(LinearTime(0.01, 0.001, 0.0), LinearTime(0.002, 0.0005, 0.0)), max_k=3)
    scheduler = Scheduler(engine, policy, max_num_seqs=3)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    for request_id, prompt in zip(["a", "bad", "run", "b", "wait"], PROMPTS):
        scheduler.add(engine.new_sequence(prompt, params, request_id=request_id))
    with pytest.raises(ValueError, match="already waiting or running"):
        scheduler.add(engine.new_sequence([1], params, request_id="a"))
    outputs = scheduler.step()
    assert {s.request_id for s in scheduler.running} == {"a", "run"} and "bad" not in scheduler.times
    assert set(policy.request_stats) == {"a", "run"}, "estimates for the running requests, none for the failed one"
    assert set(scheduler.times) == {"a", "run", "b", "wait"}
    assert scheduler.abort("run") and scheduler.abort("wait")
    assert set(policy.request_stats) == {"a"} and set(scheduler.times) == {"a", "b"}
    while scheduler.has_unfinished:
        outputs += scheduler.step()
    assert policy.request_stats == {} and scheduler.times == {}
    for out in outputs:
        times = out.times
        assert times.first_token is None or times.arrival <= times.first_token
        if out.finished and out.seq.finish_reason == "length":
            assert times.arrival <= times.first_token <= times.finish
    assert sorted(o.seq.request_id for o in outputs if o.finished) == ["a", "b", "bad"]


def test_cache_pool_grows_and_bounds(tiny_target):
    pool = CachePool(tiny_target.model, 16, max_rows=3)
    rows = [pool.acquire() for _ in range(3)]
    assert rows == [0, 1, 2] and pool.cache.batch_size == 3
    with pytest.raises(NoFreeRowError, match="finish or abort"):
        pool.acquire()
    pool.cache.lengths[1] = 5
    pool.release(1)
    assert pool.acquire() == 1 and pool.cache.lengths[1] == 0
    with pytest.raises(ValueError, match="not in use"):
        pool.release(7)


def test_grown_cache_keeps_rows(tiny_target):
    model = tiny_target.model
    cache = model.new_cache(1, 16)
    model.forward(torch.tensor([[1, 2, 3]]), torch.arange(3)[None], cache)
    cache.commit(0)
    before = cache.k[:, 0, :, :3].clone()
    cache.grow(4)
    assert cache.batch_size == 4 and cache.lengths == [3, 0, 0, 0]
    assert torch.equal(cache.k[:, 0, :, :3], before)


# ---- goodput policy ----------------------------------------------------------------------------------
def test_expected_tokens():
    for alpha in (0.0, 0.3, 0.9):
        for k in range(5):
            chain = sum(alpha**i for i in range(k + 1))  # (1 - a^(k+1)) / (1 - a)
            assert expected_tokens(TreeShape.chain(k), alpha) == pytest.approx(chain)
    # two siblings at the root: 1 + a + (1 - a) a
    assert expected_tokens(TreeShape.parse("widths:2"), 0.5) == pytest.approx(1.75)
    # binary tree of depth 2 (widths:2,2 branches 2 at each level): 1 + 0.75 (1 + 0.75)
    assert expected_tokens(TreeShape.parse("widths:2,2"), 0.5) == pytest.approx(1 + 0.75 * 1.75)


class _FakeEngine:
    def __init__(self, proposer=None, k=8):
        self.proposer = proposer
        self.num_speculative_tokens = k

    def draft_lengths(self, seqs, ks):
        return [max(0, min(k, self.num_speculative_tokens, s.remaining - 1)) for k, s in zip(ks, seqs)]


def _seqs(tiny_target, n, alpha=None, policy=None):
    """n sequences; with alpha, the policy's estimate for each starts at alpha (as if from 100 positions)."""
    engine = SpecEngine(tiny_target, None, 0, max_model_len=64)
    seqs = [engine.new_sequence([1, 2, 3], SamplingParams(max_tokens=40)) for _ in range(n)]
    if alpha is not None:
        for s in seqs:
            policy.set_estimate(s, alpha, 100.0)
    return seqs


def test_goodput_choice_follows_acceptance_and_cost(tiny_target):
    engine = _FakeEngine()
    # target cost flat in tokens (memory bound), cheap draft: a good draft should speculate far
    cheap = LatencyModel(LinearTime(0.1, 0.0001, 0.0), LinearTime(0.005, 0.0, 0.0))
    policy = GoodputPolicy(cheap, 8)
    assert policy.choose(_seqs(tiny_target, 2, 0.9, policy), engine)[0] >= 5
    # a useless draft never pays
    policy = GoodputPolicy(cheap, 8)
    assert policy.choose(_seqs(tiny_target, 2, 0.0, policy), engine) == [0, 0]
    # compute-bound target (every token costs): large batches stop speculating
    bound = LatencyModel(LinearTime(0.05, 0.01, 0.0), LinearTime(0.005, 0.001, 0.0))
    policy = GoodputPolicy(bound, 8)
    small = policy.choose(_seqs(tiny_target, 1, 0.7, policy), engine)[0]
    policy = GoodputPolicy(bound, 8)
    large = policy.choose(_seqs(tiny_target, 16, 0.7, policy), engine)[0]
    assert small > large
    # the choice is the argmax of the predicted goodput over k
    policy = GoodputPolicy(bound, 8)
    seqs = _seqs(tiny_target, 4, 0.7, policy)
    k = policy.choose(seqs, engine)[0]
    goodputs = [(lambda t, s: t / s)(*policy.step_estimate(seqs, engine, kk)) for kk in range(9)]
    assert goodputs[k] == pytest.approx(max(goodputs))


def test_goodput_acceptance_estimate_moves(tiny_target):
    policy = GoodputPolicy(LatencyModel(LinearTime(0.1, 0.0, 0.0)), 4, prior_alpha=0.5, prior_trials=2, decay=1.0)
    (seq,) = _seqs(tiny_target, 1)
    assert policy.alpha(seq) == 0.5
    seq.metrics.record_step(4, 4, 4)  # all four accepted
    policy.observe([seq])
    assert policy.alpha(seq) == pytest.approx((1 + 4) / (2 + 4))
    seq.metrics.record_step(4, 4, 0)  # first rejected: one trial, no success
    policy.observe([seq])
    assert policy.alpha(seq) == pytest.approx(5 / 7)
    seq.metrics.record_step(0, 0, 0)  # a plain step says nothing about the draft
    policy.observe([seq])
    assert policy.alpha(seq) == pytest.approx(5 / 7)


def test_latency_fit_save_load(tmp_path, tiny_target, tiny_draft):
    truth = LinearTime(0.01, 0.002, 0.00003)
    samples = [{"tokens": n, "context": c, "seconds": truth(n, c)} for n in (1, 4, 16) for c in (64, 512)]
    fitted = LinearTime.fit(samples)
    assert (fitted.a, fitted.b, fitted.c) == pytest.approx((truth.a, truth.b, truth.c), rel=1e-6, abs=1e-9)
    measured = profile(
        tiny_target.model, tiny_draft.model, rows=(1, 2), tokens_per_row=(1, 2), contexts=(8, 16), repeats=1
    )
    assert len(measured.samples["target"]) == 8 and len(measured.samples["draft"]) == 8
    assert isinstance(measured.target, PiecewiseTime) and measured.target.tokens == [1.0, 2.0, 4.0]
    assert measured.target.c >= 0 and all(t > 0 for t in measured.target.seconds)
    assert isinstance(
        profile(
            tiny_target.model, None, rows=(1, 2), tokens_per_row=(1, 2), contexts=(8, 16), repeats=1, fit="linear"
        ).target,
        LinearTime,
    )
    path = tmp_path / "profile.json"
    measured.save(path)
    loaded = LatencyModel.load(path)
    assert loaded.target == measured.target and loaded.draft == measured.draft
    (tmp_path / "bad.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="specgrove profile"):
        LatencyModel.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="specgrove profile --out"):
        LatencyModel.load(tmp_path / "missing.json")


def test_piecewise_latency_keeps_the_measured_shape():
    """This CPU's forward over 4 tokens is faster than over 2: the piecewise fit keeps that, and the
    context coefficient is recovered from the within-token-count variation."""
    f = {1: 0.104, 2: 0.125, 4: 0.088, 8: 0.125, 16: 0.175}
    c = 2e-5
    samples = [{"tokens": n, "context": ctx, "seconds": t + c * ctx} for n, t in f.items() for ctx in (128, 512, 1024)]
    fit = PiecewiseTime.fit(samples)
    assert fit.c == pytest.approx(c)
    for n, t in f.items():
        assert fit(n, 0) == pytest.approx(t)
    assert fit(3, 0) == pytest.approx((0.125 + 0.088) / 2)  # linear between measured counts
    assert fit(32, 100) == pytest.approx(0.175 + 16 * (0.175 - 0.125) / 8 + c * 100)  # last slope beyond
    assert fit(0.5, 0) == pytest.approx(0.104)
    linear = LinearTime.fit(samples)
    assert abs(linear(4, 0) - 0.088) > 0.02, "a line through the grid misses the fast 4-token forward (why piecewise)"


def test_goodput_prior_comes_from_earlier_requests_and_probes(tiny_target):
    # speculation never pays under this latency model: k = 0, with a probe step every probe_every + 1
    never = LatencyModel(LinearTime(0.01, 0.05, 0.0), LinearTime(0.05, 0.0, 0.0))
    policy = GoodputPolicy(never, 4, probe_every=3)
    seqs = _seqs(tiny_target, 2)
    ks = [policy.choose(seqs, _FakeEngine())[0] for _ in range(8)]
    assert ks == [0, 0, 0, 1, 0, 0, 0, 1]
    assert GoodputPolicy(never, 4, probe_every=0).choose(seqs, _FakeEngine()) == [0, 0]
    # a new request starts from what earlier requests showed
    policy = GoodputPolicy(never, 4, prior_alpha=0.7, decay=1.0)
    (old,) = _seqs(tiny_target, 1)
    for _ in range(5):
        old.metrics.record_step(4, 4, 0)  # always rejected at once
        policy.observe([old])
    (new,) = _seqs(tiny_target, 1)
    assert policy.alpha(new) == pytest.approx(0.0)


def test_transformers_fallback_runs_one_sequence_at_a_time(tiny_dirs, tiny_target, tiny_draft):
    """A target (or draft) on the transformers fallback cannot batch: the scheduler runs its requests one
    after the other, with the same output."""
    from specgrove.models.loader import load_model

    slow = load_model(tiny_dirs["target"], dtype="float32", force_fallback=True)
    for target, draft in (
        (slow, tiny_draft),
        (tiny_target, load_model(tiny_dirs["draft"], dtype="float32", force_fallback=True)),
    ):
        engine = SpecEngine(target, DraftModelProposer(draft, 64), 2, max_model_len=64)
        scheduler = Scheduler(engine, max_num_seqs=4)
        assert scheduler.max_num_seqs == 1
        seqs, sizes = run_scheduler(scheduler, engine, PROMPTS[:3], MAX_TOKENS[:3], join_every=1)
        assert max(sizes) == 1
        for seq, prompt, m in zip(seqs, PROMPTS, MAX_TOKENS):
            assert seq.finish_reason == "length" and seq.output_ids == plain_greedy(tiny_target, prompt, m)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_row_that_fails_verification_changes_no_other_row(temperature, tiny_target, tiny_draft, monkeypatch):
    """A fault in row b of a 3-row batch, after the target forward: no row commits twice, none takes a token
    more than it asked for, and each good request ends exactly as it does served alone (same seed)."""
    original = SpecEngine._verify

    def fails_for_bad(self, seq, tree, row_logits):
        if seq.request_id == "bad":
            raise RuntimeError("row b exploded")
        return original(self, seq, tree, row_logits)

    def params(max_tokens, seed):
        return SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True, seed=seed)

    requests = [(PROMPTS[0], 1, 11), ([1, 2], 6, 12), (PROMPTS[2], 9, 13)]  # the middle one is row b

    def alone(prompt, max_tokens, seed):
        engine = SpecEngine(tiny_target, make_proposer("draft_model", tiny_draft), 3, max_model_len=64)
        return engine.generate(engine.new_sequence(prompt, params(max_tokens, seed))).output_ids

    expected = [alone(*r) for r in requests]
    engine = SpecEngine(tiny_target, make_proposer("draft_model", tiny_draft), 3, max_model_len=64)
    monkeypatch.setattr(SpecEngine, "_verify", fails_for_bad)
    scheduler = Scheduler(engine, max_num_seqs=3)
    seqs = [
        engine.new_sequence(p, params(m, s), request_id=name)
        for name, (p, m, s) in zip(["first", "bad", "last"], requests)
    ]
    for s in seqs:
        scheduler.add(s)
    steps = {s.request_id: 0 for s in seqs}
    while scheduler.has_unfinished:
        for out in scheduler.step():
            steps[out.seq.request_id] += 1
    first, bad, last = seqs
    assert bad.finish_reason == "error" and "row b exploded" in bad.error and bad.output_ids == []
    assert len(first.output_ids) == 1 and first.output_ids == expected[0]  # max_tokens 1: one token, not two
    assert last.output_ids == expected[2]
    assert len(first.metrics.accepted_per_step) == 1  # the failed batch step left no trace in the metrics either
    assert engine.pool.in_use == 0


def test_a_failed_step_leaves_every_sequence_as_it_was(tiny_target, tiny_draft, monkeypatch):
    """step_batch is a transaction: after a fault in the last row's verification, every row's tokens, cache
    length, sampler state and metrics are those before the step, and running the step again without the
    fault gives what one clean step gives."""

    def build():
        engine = SpecEngine(tiny_target, make_proposer("tree", tiny_draft), 3, max_model_len=64)
        seqs = [
            engine.new_sequence(p, SamplingParams(temperature=1.0, max_tokens=20, seed=i, ignore_eos=True))
            for i, p in enumerate(PROMPTS[:3])
        ]
        for s in seqs:
            engine.prefill(s)
        return engine, seqs

    clean_engine, clean = build()
    clean_out = clean_engine.step_batch(clean, [3, 3, 3])
    engine, seqs = build()
    before = [
        (
            list(s.token_ids),
            engine.pool.cache.lengths[s.cache_row],
            s.sampler.get_state().clone(),
            len(s.metrics.accepted_per_step),
        )
        for s in seqs
    ]
    original = SpecEngine._verify
    calls = []

    def fails_last(self, seq, tree, row_logits):
        calls.append(seq.request_id)
        if seq is seqs[-1]:
            raise RuntimeError("late fault")
        return original(self, seq, tree, row_logits)

    monkeypatch.setattr(SpecEngine, "_verify", fails_last)
    with pytest.raises(RuntimeError, match="late fault"):
        engine.step_batch(seqs, [3, 3, 3])
    assert len(calls) == 3  # the first two rows were verified before the fault
    for s, (tokens, length, state, steps) in zip(seqs, before):
        assert list(s.token_ids) == tokens and engine.pool.cache.lengths[s.cache_row] == length
        assert torch.equal(s.sampler.get_state(), state) and len(s.metrics.accepted_per_step) == steps
    monkeypatch.setattr(SpecEngine, "_verify", original)
    assert engine.step_batch(seqs, [3, 3, 3]) == clean_out
    assert [s.output_ids for s in seqs] == [s.output_ids for s in clean]


def test_step_batch_refuses_a_finished_sequence(tiny_target):
    engine = SpecEngine(tiny_target, None, 0, max_model_len=64)
    seq = engine.generate(engine.new_sequence([1, 2], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)))
    with pytest.raises(ValueError, match="unfinished"):
        engine.step_batch([seq], [0])
