"""End-to-end behaviour of the engine and the LLM API on tiny fp32 models: greedy identity with plain
decoding (also when EOS or a stop string falls inside an accepted block), the sampled distribution at
temperature > 0, metrics."""

import collections
import itertools

import pytest
import torch
from scipy.stats import chisquare

from specgrove import LLM, SamplingParams
from specgrove.drafting.draft_model import DraftModelProposer
from specgrove.drafting.prompt_lookup import PromptLookupProposer
from specgrove.engine.engine import SpecEngine
from specgrove.sampling import process_logits

PROMPT = [1, 2, 3, 4, 1, 2, 3]


def run(engine, prompt, params, sampler=None):
    return engine.generate(engine.new_sequence(prompt, params, sampler=sampler))


def engines(target, draft, k):
    yield "plain", SpecEngine(target, None, 0, 256)
    yield "draft_model", SpecEngine(target, DraftModelProposer(draft, 256), k, 256)
    yield "self_draft", SpecEngine(target, DraftModelProposer(target, 256), k, 256)  # accepts everything
    yield "prompt_lookup", SpecEngine(target, PromptLookupProposer(1, 3), k, 256)


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("max_tokens", [1, 7, 40])
def test_greedy_identical_to_plain(tiny_target, tiny_draft, k, max_tokens):
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    outputs = {name: run(e, PROMPT, params) for name, e in engines(tiny_target, tiny_draft, k)}
    baseline = outputs.pop("plain")
    assert len(baseline.output_ids) == max_tokens and baseline.finish_reason == "length"
    for name, seq in outputs.items():
        assert seq.output_ids == baseline.output_ids, name
        assert seq.finish_reason == "length"
    if max_tokens > 1:
        assert outputs["self_draft"].metrics.acceptance_rate == 1.0
        assert outputs["self_draft"].metrics.target_forwards < max_tokens
    for name in ("draft_model", "self_draft"):  # a chain of k: the catch-up forward + one per level but the last
        m = outputs[name].metrics
        assert m.draft_forwards == sum(m.proposed_per_step), name


def test_greedy_eos_and_stop_token_inside_an_accepted_block(tiny_target, tiny_draft):
    params = SamplingParams(temperature=0, max_tokens=30)
    plain = SpecEngine(tiny_target, None, 0, 256)
    reference = run(plain, PROMPT, params).output_ids
    # the first token whose first occurrence is at index >= 3: it ends plain decoding there
    index = next(i for i, t in enumerate(reference) if i >= 3 and t not in reference[:i])
    stop_token = reference[index]
    expected = reference[: index + 1]
    for name, engine in engines(tiny_target, tiny_draft, 5):
        for mode in ("eos", "stop_token_ids"):
            if mode == "eos":
                engine.eos_ids = {stop_token}
                p = params
            else:
                engine.eos_ids = set()
                p = SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_token])
            seq = run(engine, PROMPT, p)
            assert seq.output_ids == expected, (name, mode)
            assert seq.finish_reason == "stop" and seq.stop_reason == stop_token
    self_draft = dict(engines(tiny_target, tiny_draft, 5))["self_draft"]
    self_draft.eos_ids = {stop_token}
    seq = run(self_draft, PROMPT, params)
    # with a draft that always agrees, the stop token arrived inside a block of k + 1 tokens
    assert seq.metrics.target_forwards < len(expected)
    ignoring = run(self_draft, PROMPT, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    assert ignoring.output_ids == reference


def test_greedy_stop_string_inside_an_accepted_block(tiny_target, tiny_draft):
    tok = tiny_target.tokenizer
    base = SamplingParams(temperature=0, max_tokens=30)
    plain = SpecEngine(tiny_target, None, 0, 256)
    reference = run(plain, PROMPT, base)
    text = tok.decode(reference.output_ids)
    assert len(text) == 30  # the tiny tokenizer maps one token to one letter
    stop = text[4:6]
    first = text.find(stop)
    params = SamplingParams(temperature=0, max_tokens=30, stop=[stop, "zzz"])
    for name, engine in engines(tiny_target, tiny_draft, 5):
        seq = run(engine, PROMPT, params)
        assert seq.text == text[:first], name
        assert seq.output_ids == reference.output_ids[: first + len(stop)], name
        assert seq.finish_reason == "stop" and seq.stop_reason == stop
    with_stop = run(
        plain, PROMPT, SamplingParams(temperature=0, max_tokens=30, stop=[stop], include_stop_str_in_output=True)
    )
    assert with_stop.text == text[: first + len(stop)]


def target_joint(target, prompt, length, params):
    dist = {}
    for seq in itertools.product(range(target.vocab_size), repeat=length):
        ids = prompt + list(seq)
        logits = target.model.forward(
            torch.tensor([ids]), torch.arange(len(ids))[None], target.model.new_cache(1, len(ids))
        )[0]
        probs = process_logits(logits[len(prompt) - 1 :], params).double()
        dist[seq] = float(torch.prod(probs[torch.arange(length), torch.tensor(seq)]))
    return dist


@pytest.mark.parametrize("kind", ["draft_model", "prompt_lookup"])
@pytest.mark.parametrize(
    "setting", [dict(temperature=1.0), dict(temperature=0.7, top_p=0.95, top_k=6)], ids=["T1", "T0.7-top"]
)
def test_sampled_distribution_matches_target(tiny_target, tiny_draft, kind, setting):
    """Empirical distribution of the first two tokens under speculation vs the exact target distribution.
    Chi-square goodness of fit over 3000 seeded samples; we require p > 1e-3 (a correct engine fails this
    with probability 1e-3 for a random seed set; the seeds are fixed so the test is deterministic)."""
    samples = 3000
    params = lambda seed: SamplingParams(max_tokens=3, seed=seed, **setting)  # noqa: E731
    proposer = DraftModelProposer(tiny_draft, 64) if kind == "draft_model" else PromptLookupProposer(1, 3)
    engine = SpecEngine(tiny_target, proposer, 2, 64)
    counts = collections.Counter()
    accepted = 0
    for seed in range(samples):
        seq = run(engine, PROMPT, params(seed))
        counts[tuple(seq.output_ids[:2])] += 1
        accepted += sum(seq.metrics.accepted_per_step)
    assert accepted > samples * 0.1, "speculation must actually accept tokens for this test to mean anything"
    exact = target_joint(tiny_target, PROMPT, 2, params(0))
    keys = sorted(k for k, p in exact.items() if p * samples >= 5)
    observed = [counts[k] for k in keys] + [samples - sum(counts[k] for k in keys)]
    expected = [exact[k] * samples for k in keys] + [samples * (1 - sum(exact[k] for k in keys))]
    if expected[-1] < 1e-9:
        observed, expected = observed[:-1], expected[:-1]
    expected = [e * samples / sum(expected) for e in expected]  # rounding only
    assert chisquare(observed, expected).pvalue > 1e-3


def test_llm_api_with_token_ids_and_strings(tiny_dirs):
    llm = LLM(
        target=tiny_dirs["target"],
        draft=tiny_dirs["draft"],
        dtype="float32",
        speculative={"method": "draft_model", "num_speculative_tokens": 3},
        max_model_len=128,
    )
    plain = LLM(target=tiny_dirs["target"], dtype="float32", max_model_len=128)
    params = SamplingParams(temperature=0, max_tokens=12)
    [a, b] = llm.generate([PROMPT, "abcdab"], params)
    [c, d] = plain.generate([PROMPT, "abcdab"], params)
    assert a.token_ids == c.token_ids and b.token_ids == d.token_ids
    assert b.text == d.text and len(b.text) == 12
    m = a.metrics
    assert m.generated_tokens == 12 and m.target_forwards == len(m.accepted_per_step)
    assert m.mean_accept_length == pytest.approx((sum(m.accepted_per_step) + m.target_forwards) / m.target_forwards)
    assert 0.0 <= m.acceptance_rate <= 1.0 and len(m.per_position_acceptance) == 3
    assert m.draft_time_s > 0 and m.target_time_s > 0
    assert c.metrics.acceptance_rate == 0.0 and c.metrics.mean_accept_length == 1.0
    single = llm.generate(PROMPT, params)
    assert single[0].token_ids == a.token_ids
    seeded = [
        llm.generate(PROMPT, SamplingParams(temperature=1.0, seed=7, max_tokens=8))[0].token_ids for _ in range(2)
    ]
    assert seeded[0] == seeded[1]


def test_prompt_lookup_proposes_the_continuation_of_the_latest_match():
    p = PromptLookupProposer(1, 3)
    assert p.lookup([5, 6, 7, 8, 5, 6, 9, 5, 6], 2) == [9, 5]
    assert p.lookup([5, 6, 7, 8, 5, 6], 3) == [7, 8, 5]
    assert p.lookup([1, 2, 3], 3) == []
    assert PromptLookupProposer(2, 2).lookup([4, 1, 2, 9, 3, 2], 2) == []


def test_statistical_test_catches_a_wrong_verifier(tiny_target, tiny_draft, monkeypatch):
    from specgrove.verify import speculative

    monkeypatch.setattr(speculative, "residual_distribution", lambda p, q: p)  # correction from p: biased
    with pytest.raises(AssertionError, match="pvalue"):
        test_sampled_distribution_matches_target(tiny_target, tiny_draft, "draft_model", dict(temperature=1.0))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_engine_hands_a_proposer_the_target_features_of_every_committed_token(tiny_target, tiny_draft, temperature):
    """A proposer that declares `feature_layers` finds in `seq.target_features` the target's hidden states of
    every token in the target's cache, prompt and accepted draft tokens alike (rejected ones never), taken from
    the prefill and verification forwards themselves: the same values a fresh forward over the text gives."""

    class FeatureReader(DraftModelProposer):
        feature_layers = (-1, 0)

    engine = SpecEngine(tiny_target, FeatureReader(tiny_draft, 256), 3, 256)
    seq = run(engine, PROMPT, SamplingParams(temperature=temperature, max_tokens=30, ignore_eos=True, seed=3))
    assert seq.metrics.acceptance_rate < 1.0  # some draft tokens were rejected (their features must not appear)
    got = torch.cat(seq.target_features)
    n = len(seq.token_ids) - 1  # the last token is the next root: not in the cache yet
    assert got.shape[0] >= n and got.shape[1] == 2 * tiny_target.model.config.hidden_size
    model = tiny_target.model
    _, fresh = model.forward(
        torch.tensor([seq.token_ids[:n]]),
        torch.arange(n)[None],
        model.new_cache(1, n),
        logits_at=None,
        features=[-1, 0],
    )
    # (float rounding only: this tiny fp32 path is not batch-invariant, and its features reach ~20 in size)
    assert torch.allclose(got[:n], fresh[0], atol=1e-4, rtol=1e-5)
    # and without a proposer that asks, nothing is kept
    plain = run(
        SpecEngine(tiny_target, DraftModelProposer(tiny_draft, 256), 3, 256), PROMPT, SamplingParams(max_tokens=5)
    )
    assert plain.target_features == []


def forward_logprobs(target, prompt, output) -> torch.Tensor:
    """The target's raw log-softmax before each output token, from one plain forward over prompt + output."""
    ids = prompt + output
    cache = target.model.new_cache(1, len(ids) + 1)
    logits = target.model.forward(torch.tensor([ids]), torch.arange(len(ids))[None], cache)[0]
    return torch.log_softmax(logits[len(prompt) - 1 : -1].float(), -1)


def check_logprobs(target, prompt, seq, top: int) -> None:
    expected = forward_logprobs(target, prompt, seq.output_ids)
    assert len(seq.logprobs) == len(seq.output_ids)
    for i, (token, entry) in enumerate(zip(seq.output_ids, seq.logprobs)):
        assert entry.token_id == token
        assert abs(entry.logprob - float(expected[i, token])) < 1e-5
        assert len(entry.top) == top
        values = [lp for _, lp in entry.top]
        assert values == sorted(values, reverse=True)
        if top:
            best = expected[i].topk(top)
            assert torch.allclose(torch.tensor(values), best.values, atol=1e-5)
            assert {t for t, _ in entry.top} == set(best.indices.tolist()) or len(set(values)) < top


@pytest.mark.parametrize("top", [0, 3])
@pytest.mark.parametrize("setting", [dict(temperature=0), dict(temperature=0.8, seed=3, repetition_penalty=1.3)])
def test_logprobs_are_the_targets_raw_log_softmax(tiny_target, tiny_draft, top, setting):
    """Recorded as tokens are committed, from the forward that verified them (accepted, correction and bonus
    tokens alike): they equal a plain forward's log-softmax over the whole output, before any processing."""
    from specgrove.trees.shape import TreeShape

    params = SamplingParams(max_tokens=20, logprobs=top, **setting)
    for name, engine in [
        *engines(tiny_target, tiny_draft, 3),
        ("tree", SpecEngine(tiny_target, DraftModelProposer(tiny_draft, 256, TreeShape.parse("widths:2,2")), 4, 256)),
    ]:
        seq = run(engine, PROMPT, params)
        check_logprobs(tiny_target, PROMPT, seq, top)
        if name == "self_draft":
            assert sum(seq.metrics.accepted_per_step) > 0
    assert run(SpecEngine(tiny_target, None, 0, 256), PROMPT, SamplingParams(max_tokens=3)).logprobs is None
