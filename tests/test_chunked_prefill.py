"""Chunked prefill (`Scheduler(max_num_batched_tokens=N)`): a long prompt is prefilled over several steps while
the running batch goes on decoding.

- Exactness: at any budget (1, sizes that do not divide the prompts, larger than every prompt) the outputs are
  the unchunked scheduler's, greedy and seeded sampling, with a draft model (chain and tree), prompt lookup and
  an EAGLE head; the draft model's own cache is filled chunk by chunk with the target's.
- The budget: each step prefills at most N prompt tokens, in arrival order, and a partly prefilled request keeps
  its row without decoding.
- Abort mid-prefill frees the row (target and draft); a failing chunk fails its request alone; the waiting
  bound counts prefilling requests as holding rows.
"""

import pytest
from test_batching import make_proposer, plain_greedy

from specgrove.drafting.draft_model import DraftModelProposer
from specgrove.drafting.eagle import EagleProposer
from specgrove.drafting.prompt_lookup import PromptLookupProposer
from specgrove.engine.engine import SpecEngine
from specgrove.engine.scheduler import QueueFullError, Scheduler
from specgrove.models.eagle import load_eagle_head, save_head
from specgrove.sampling import SamplingParams
from specgrove.train.eagle_model import head_config, new_train_head

# Lengths 23, 2, 1, 17, 9: longer than the budgets below, one-token prompts, repeats for prompt lookup.
PROMPTS = [
    [1, 2, 3, 1, 2, 4, 5, 6, 1, 2, 3, 7, 0, 1, 2, 3, 1, 2, 4, 5, 6, 7, 1],
    [4, 5],
    [3],
    [7, 1, 1, 6, 2, 3, 4, 0, 5, 7, 1, 1, 6, 2, 3, 4, 0],
    [2, 2, 2, 2, 6, 1, 2, 2, 2],
]
MAX_TOKENS = [10, 14, 9, 12, 11]
BUDGETS = [None, 1, 3, 7, 64]


@pytest.fixture(scope="module")
def head(tiny_target, tmp_path_factory):
    config = head_config(tiny_target, intermediate_size=48, feature_layers=[0, -1])
    module = new_train_head(tiny_target, config, init_std=0.4, seed=3)
    directory = save_head(tmp_path_factory.mktemp("eagle") / "head", config, module.export_weights())
    return load_eagle_head(directory, tiny_target)


def make_engine(kind, tiny_target, tiny_draft, head=None):
    if kind == "plain":
        return SpecEngine(tiny_target, None, 0, max_model_len=64)
    if kind == "eagle":
        return SpecEngine(tiny_target, EagleProposer(head, 64, None, "without_replacement", None), 3, max_model_len=64)
    return SpecEngine(tiny_target, make_proposer(kind, tiny_draft), 3, max_model_len=64)


def serve(engine, budget, params_of, max_num_seqs=3):
    """Requests join a running batch one per step; returns the sequences and, per step, (prefilling, running)."""
    scheduler = Scheduler(engine, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)
    seqs = [
        engine.new_sequence(p, params_of(i, m), request_id=str(i)) for i, (p, m) in enumerate(zip(PROMPTS, MAX_TOKENS))
    ]
    pending, shapes = list(seqs), []
    while pending or scheduler.has_unfinished:
        if pending:
            scheduler.add(pending.pop(0))
        scheduler.step()
        shapes.append((len(scheduler.prefilling), len(scheduler.running)))
    assert engine.pool.in_use == 0
    if getattr(engine.proposer, "pool", None) is not None:
        assert engine.proposer.pool.in_use == 0
    return seqs, shapes


def greedy(i, m):
    return SamplingParams(temperature=0, max_tokens=m, ignore_eos=True)


def seeded(i, m):
    return SamplingParams(temperature=1.0, top_k=6, seed=100 + i, max_tokens=m, ignore_eos=True)


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("kind", ["plain", "draft_model", "tree", "prompt_lookup", "eagle"])
def test_chunked_greedy_equals_single_request_plain(kind, budget, tiny_target, tiny_draft, head):
    engine = make_engine(kind, tiny_target, tiny_draft, head)
    seqs, shapes = serve(engine, budget, greedy)
    for seq, prompt, m in zip(seqs, PROMPTS, MAX_TOKENS):
        assert seq.finish_reason == "length"
        assert seq.output_ids == plain_greedy(tiny_target, prompt, m), (seq.request_id, budget)
    if budget is not None and budget < 7:
        assert any(p and r for p, r in shapes), "a request must prefill while others decode"
    if kind != "plain":
        assert sum(sum(s.metrics.accepted_per_step) for s in seqs) > 0, "speculation must really happen"


@pytest.mark.parametrize("kind", ["draft_model", "tree", "prompt_lookup", "eagle"])
def test_chunked_seeded_sampling_equals_unchunked(kind, tiny_target, tiny_draft, head):
    reference, _ = serve(make_engine(kind, tiny_target, tiny_draft, head), None, seeded)
    assert len({tuple(s.output_ids) for s in reference}) > 1
    for budget in (1, 5):
        seqs, _ = serve(make_engine(kind, tiny_target, tiny_draft, head), budget, seeded)
        for seq, ref in zip(seqs, reference):
            assert seq.output_ids == ref.output_ids, (kind, budget, seq.request_id)
            assert seq.metrics.accepted_per_step == ref.metrics.accepted_per_step


def test_the_budget_bounds_each_step_in_arrival_order(tiny_target, tiny_draft, monkeypatch):
    engine = make_engine("draft_model", tiny_target, tiny_draft)
    chunks, calls = [], [0]  # (scheduler.step call, request id, tokens prefilled)
    original = SpecEngine.prefill

    def recording(self, seq, max_tokens=None):
        count = original(self, seq, max_tokens)
        chunks.append((calls[0], seq.request_id, count))
        return count

    monkeypatch.setattr(SpecEngine, "prefill", recording)
    scheduler = Scheduler(engine, max_num_seqs=4, max_num_batched_tokens=5)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    for i in (0, 3, 4):
        scheduler.add(engine.new_sequence(PROMPTS[i], params, request_id=str(i)))
    scheduler.step()
    assert [seq.request_id for seq in scheduler.prefilling] == ["0", "3", "4"] and not scheduler.running
    assert scheduler.free_rows == 1, "prefilling requests hold their rows"
    assert engine.proposer.pool.cache.lengths[engine.proposer._state(scheduler.prefilling[0])["row"]] == 5
    while scheduler.has_unfinished:
        calls[0] += 1
        scheduler.step()
    per_step: dict[int, int] = {}
    for step, _, count in chunks:
        per_step[step] = per_step.get(step, 0) + count
    assert max(per_step.values()) == 5
    order = [request_id for _, request_id, count in chunks if count]
    assert order == sorted(order, key=int), "prompts are prefilled in arrival order"
    assert sum(count for _, _, count in chunks) == sum(len(PROMPTS[i]) - 1 for i in (0, 3, 4))


def test_step_batch_refuses_a_partly_prefilled_sequence(tiny_target):
    engine = make_engine("plain", tiny_target, None)
    seq = engine.new_sequence(PROMPTS[0], SamplingParams(temperature=0, max_tokens=3))
    assert engine.prefill(seq, 4) == 4 and seq.prefill_left == len(PROMPTS[0]) - 5
    with pytest.raises(ValueError, match="prefilled"):
        engine.step_batch([seq])
    assert engine.prefill(seq) == len(PROMPTS[0]) - 5 and engine.prefill(seq) == 0
    engine.step_batch([seq])
    engine.finish(seq)


def test_abort_mid_prefill_frees_the_row(tiny_target, tiny_draft):
    engine = make_engine("draft_model", tiny_target, tiny_draft)
    scheduler = Scheduler(engine, max_num_seqs=2, max_num_batched_tokens=4)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    short = engine.new_sequence(PROMPTS[1], params, request_id="short")
    long = engine.new_sequence(PROMPTS[0], params, request_id="long")
    scheduler.add(short)
    scheduler.step()
    scheduler.add(long)
    scheduler.step()
    scheduler.step()
    assert scheduler.prefilling == [long] and 0 < long.prefilled < len(PROMPTS[0]) - 1
    assert engine.pool.in_use == 2 and engine.proposer.pool.in_use == 2
    assert scheduler.abort("long") and long.finish_reason == "abort"
    assert engine.pool.in_use == 1 and engine.proposer.pool.in_use == 1, "target and draft rows are freed"
    assert scheduler.free_rows == 1 and "long" not in scheduler.times
    scheduler.run_to_completion()
    assert short.output_ids == plain_greedy(tiny_target, PROMPTS[1], 10)
    assert engine.pool.in_use == 0 and engine.proposer.pool.in_use == 0


def test_a_failing_chunk_fails_its_request_alone(tiny_target, tiny_draft, monkeypatch):
    engine = make_engine("draft_model", tiny_target, tiny_draft)
    original = DraftModelProposer.prefill

    def fails_on_the_second_chunk(self, seq, num_tokens):
        if seq.request_id == "bad" and num_tokens > 3:
            raise RuntimeError("boom")
        return original(self, seq, num_tokens)

    monkeypatch.setattr(DraftModelProposer, "prefill", fails_on_the_second_chunk)
    scheduler = Scheduler(engine, max_num_seqs=3, max_num_batched_tokens=3)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    good = [engine.new_sequence(PROMPTS[i], params, request_id=f"g{i}") for i in (3, 4)]
    bad = engine.new_sequence(PROMPTS[0], params, request_id="bad")
    for seq in (good[0], bad, good[1]):
        scheduler.add(seq)
    finished = []
    while scheduler.has_unfinished:
        finished += [out.seq.request_id for out in scheduler.step() if out.finished]
    assert bad.finish_reason == "error" and "boom" in bad.error and bad.output_ids == []
    assert sorted(finished) == ["bad", "g3", "g4"]
    for seq, i in zip(good, (3, 4)):
        assert seq.output_ids == plain_greedy(tiny_target, PROMPTS[i], 8)
    assert engine.pool.in_use == 0 and engine.proposer.pool.in_use == 0


def test_the_waiting_bound_counts_prefilling_requests_as_admitted(tiny_target):
    engine = make_engine("plain", tiny_target, None)
    scheduler = Scheduler(engine, max_num_seqs=2, max_waiting=1, max_num_batched_tokens=1)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    seqs = [engine.new_sequence(PROMPTS[0], params, request_id=f"r{i}") for i in range(4)]
    for seq in seqs[:3]:  # two take the free rows, one waits
        scheduler.add(seq)
    with pytest.raises(QueueFullError):
        scheduler.add(seqs[3])
    scheduler.step()
    assert len(scheduler.prefilling) == 2 and len(scheduler.waiting) == 1 and scheduler.free_rows == 0
    with pytest.raises(QueueFullError):
        scheduler.add(seqs[3])
    scheduler.run_to_completion()
    assert all(s.output_ids == seqs[0].output_ids for s in seqs[:3])


def test_a_budget_below_one_is_refused(tiny_target):
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Scheduler(make_engine("plain", tiny_target, None), max_num_batched_tokens=0)


def test_prompt_lookup_needs_no_prefill_of_its_own(tiny_target):
    engine = SpecEngine(tiny_target, PromptLookupProposer(1, 2), 2, max_model_len=64)
    seq = engine.new_sequence(PROMPTS[0], SamplingParams(temperature=0, max_tokens=2))
    engine.prefill(seq, 3)
    assert seq.proposer_state == {} and seq.metrics.prefill_forwards == 1
    engine.finish(seq)


def penalised(i, m):
    """Penalties (which count the prompt) and logprobs (recorded from the forward that verified each token)."""
    return SamplingParams(
        temperature=1.0,
        top_k=6,
        seed=200 + i,
        max_tokens=m,
        ignore_eos=True,
        repetition_penalty=1.4,
        presence_penalty=0.5,
        frequency_penalty=0.3,
        logprobs=2,
    )


@pytest.mark.parametrize("budget", [1, 7])
@pytest.mark.parametrize("kind", ["draft_model", "prompt_lookup"])
def test_penalties_and_logprobs_do_not_depend_on_the_budget(kind, budget, tiny_target, tiny_draft):
    whole, _ = serve(make_engine(kind, tiny_target, tiny_draft), None, penalised)
    chunked, _ = serve(make_engine(kind, tiny_target, tiny_draft), budget, penalised)
    for a, b in zip(whole, chunked):
        assert a.output_ids == b.output_ids
        assert len(a.logprobs) == len(b.logprobs) == len(a.output_ids)
        for x, y in zip(a.logprobs, b.logprobs):
            assert x.token_id == y.token_id and abs(x.logprob - y.logprob) < 1e-5
            assert [t for t, _ in x.top] == [t for t, _ in y.top]
