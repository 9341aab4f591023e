"""Exactness by enumeration: the distribution of what one speculative step emits, computed exactly by
enumerating every random choice of the real engine step (draft sampling, acceptance coins, residual
sampling), completed with the target's own sampling, must equal the target's distribution to 1e-6.

A deliberately wrong verifier (correction sampled from p instead of the residual) must fail the same test.
"""

import itertools

import pytest
import torch

from specgrove.drafting.draft_model import DraftModelProposer
from specgrove.drafting.prompt_lookup import PromptLookupProposer
from specgrove.engine.engine import SpecEngine
from specgrove.sampling import SamplingParams, process_logits
from specgrove.verify import speculative
from specgrove.verify.enumerate import enumerate_outcomes

PROMPT = [1, 2, 3, 1, 2]  # prompt lookup finds "1 2" earlier and proposes [3, 1, 2, ...]
SETTINGS = [
    pytest.param(dict(temperature=1.0), id="T1"),
    pytest.param(dict(temperature=0.7), id="T0.7"),
    pytest.param(dict(temperature=1.0, top_k=3), id="topk3"),
    pytest.param(dict(temperature=0.8, top_p=0.7), id="topp0.7"),
    pytest.param(dict(temperature=1.0, top_p=0.9, top_k=5), id="topp0.9-topk5"),
    pytest.param(dict(temperature=1.0, min_p=0.1), id="minp0.1"),
]


def target_conditionals(
    target, prefix: list[int], continuation: tuple[int, ...], params: SamplingParams
) -> torch.Tensor:
    """Processed target distributions after prefix + continuation[:i] for i = 0..len(continuation)."""
    ids = prefix + list(continuation)
    cache = target.model.new_cache(1, len(ids) + 1)
    logits = target.model.forward(torch.tensor([ids]), torch.arange(len(ids))[None], cache)[0]
    return process_logits(logits[len(prefix) - 1 :], params).double()


def target_sequence_distribution(target, prompt, length, params, vocab):
    dist = {}
    for seq in itertools.product(range(vocab), repeat=length):
        probs = target_conditionals(target, prompt, seq, params)
        p = 1.0
        for i, token in enumerate(seq):
            p *= float(probs[i, token])
        if p > 0:
            dist[seq] = p
    return dist


def speculative_sequence_distribution(engine, target, prompt, params, length, vocab):
    """Exact distribution of the first `length` tokens: one speculative step, then plain target sampling."""

    def one_step(sampler):
        seq = engine.new_sequence(prompt, params, sampler=sampler)
        engine.prefill(seq)
        engine.step(seq)
        engine.finish(seq)  # frees the cache row for the next enumerated path
        return tuple(seq.output_ids)

    emitted = enumerate_outcomes(one_step)
    return complete_with_target(emitted, target, prompt, params, length, vocab), emitted


def complete_with_target(emitted: dict, target, prompt, params, length, vocab) -> dict:
    """The distribution of the first `length` tokens when each emitted prefix (with its probability) is
    continued by plain target sampling."""
    dist: dict[tuple, float] = {}
    for prefix, prob in emitted.items():
        assert len(prefix) <= length
        missing = length - len(prefix)
        for rest in itertools.product(range(vocab), repeat=missing):
            p = prob
            if missing:
                probs = target_conditionals(target, prompt + list(prefix), rest, params)
                for i, token in enumerate(rest):
                    p *= float(probs[i, token])
            if p > 0:
                key = prefix + rest
                dist[key] = dist.get(key, 0.0) + p
    return dist


def max_difference(a: dict, b: dict) -> float:
    return max(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


def make_engine(kind, target, draft, k):
    proposer = DraftModelProposer(draft, 64) if kind == "draft_model" else PromptLookupProposer(1, 2)
    return SpecEngine(target, proposer, k, max_model_len=64)


@pytest.mark.parametrize("kind", ["draft_model", "prompt_lookup"])
@pytest.mark.parametrize("setting", SETTINGS)
def test_one_step_distribution_is_exact(kind, setting, tiny_target, tiny_draft):
    k = 2
    params = SamplingParams(max_tokens=k + 1, **setting)
    engine = make_engine(kind, tiny_target, tiny_draft, k)
    vocab = tiny_target.vocab_size
    spec, emitted = speculative_sequence_distribution(engine, tiny_target, PROMPT, params, k + 1, vocab)
    exact = target_sequence_distribution(tiny_target, PROMPT, k + 1, params, vocab)
    assert abs(sum(emitted.values()) - 1.0) < 1e-9
    # The step really speculates: some outcomes emit more than one token (unless the only proposal, prompt
    # lookup's deterministic one, lies outside the target's support under this top-k / top-p).
    p_root = target_conditionals(tiny_target, PROMPT, (), params)[0]
    if kind == "draft_model":
        q_root = target_conditionals(tiny_draft, PROMPT, (), params)[0]
        possible = bool(((p_root > 0) & (q_root > 0)).any())
    else:
        possible = float(p_root[PromptLookupProposer(1, 2).lookup(PROMPT, k)[0]]) > 0
    assert any(len(s) > 1 for s in emitted) == possible, "the test would be vacuous"
    assert max_difference(spec, exact) < 1e-6


@pytest.mark.parametrize("kind", ["draft_model", "prompt_lookup"])
def test_greedy_step_matches_target_argmax(kind, tiny_target, tiny_draft):
    k = 3
    params = SamplingParams(temperature=0, max_tokens=k + 1)
    engine = make_engine(kind, tiny_target, tiny_draft, k)
    emitted = enumerate_outcomes(
        lambda s: (lambda q: (engine.prefill(q), engine.step(q), engine.finish(q), tuple(q.output_ids))[-1])(
            engine.new_sequence(PROMPT, params, sampler=s)
        )
    )
    assert len(emitted) == 1, "greedy speculation must be deterministic"
    ((out,),) = [tuple(emitted)]
    ids = list(PROMPT)
    for token in out:  # each emitted token is the target's argmax after the tokens before it
        cache = tiny_target.model.new_cache(1, len(ids) + 1)
        logits = tiny_target.model.forward(torch.tensor([ids]), torch.arange(len(ids))[None], cache)[0, -1]
        assert token == int(logits.argmax())
        ids.append(token)


def wrong_residual(p, q):
    """The classic bug: after a rejection, sample the correction from p instead of normalize(max(0, p - q))."""
    return p


@pytest.mark.parametrize("kind", ["draft_model", "prompt_lookup", "cut_head_draft"])
def test_wrong_verifier_fails_the_enumeration(kind, tiny_target, tiny_draft, monkeypatch, request):
    monkeypatch.setattr(speculative, "residual_distribution", wrong_residual)
    k = 2
    params = SamplingParams(temperature=1.0, max_tokens=k + 1)
    if kind == "cut_head_draft":  # a draft whose output layer is cut to some tokens (head_vocab)
        engine = make_engine("draft_model", tiny_target, request.getfixturevalue("cut_head_draft"), k)
    else:
        engine = make_engine(kind, tiny_target, tiny_draft, k)
    vocab = tiny_target.vocab_size
    spec, _ = speculative_sequence_distribution(engine, tiny_target, PROMPT, params, k + 1, vocab)
    exact = target_sequence_distribution(tiny_target, PROMPT, k + 1, params, vocab)
    assert max_difference(spec, exact) > 1e-3


def report_wrong_q(monkeypatch) -> None:
    """Make DraftModelProposer report, for every drafted token, the draft's q at another temperature
    instead of the q it sampled from (the trap the exactness tests must catch)."""
    original = DraftModelProposer.propose_batch

    def propose_with_wrong_q(self, seqs, num_tokens):
        trees = original(self, seqs, num_tokens)
        for tree in trees:
            if tree.draft_probs is not None:
                tree.draft_probs = torch.softmax(torch.log(tree.draft_probs.clamp_min(1e-30)) * 0.5, dim=-1)
        return trees

    monkeypatch.setattr(DraftModelProposer, "propose_batch", propose_with_wrong_q)


def test_wrong_draft_distribution_fails(tiny_target, tiny_draft, monkeypatch):
    """Reporting a q other than the one sampled from (here: the draft at a different temperature) breaks
    exactness and the enumeration catches it."""
    report_wrong_q(monkeypatch)
    k = 2
    params = SamplingParams(temperature=1.0, max_tokens=k + 1)
    engine = make_engine("draft_model", tiny_target, tiny_draft, k)
    vocab = tiny_target.vocab_size
    spec, _ = speculative_sequence_distribution(engine, tiny_target, PROMPT, params, k + 1, vocab)
    exact = target_sequence_distribution(tiny_target, PROMPT, k + 1, params, vocab)
    assert max_difference(spec, exact) > 1e-3


def tiny_draft_device() -> str:
    import os

    return os.environ.get("SPECGROVE_TEST_DEVICE", "cpu")  # as conftest's tiny models


@pytest.fixture(scope="module")
def cut_head_draft(tiny_dirs):
    """The tiny draft with its output layer cut to token ids 0..3 (and the special tokens): `head_vocab`."""
    from specgrove.models.loader import load_model

    draft = load_model(tiny_dirs["draft"], dtype="float32", device=tiny_draft_device(), head_vocab=4)
    assert draft.model.head_token_ids is not None and len(draft.model.head_token_ids) < draft.vocab_size
    return draft


@pytest.mark.parametrize("setting", SETTINGS[:3])
def test_cut_head_draft_step_is_exact(setting, tiny_target, cut_head_draft):
    """A draft that can propose only some tokens (q = 0 elsewhere) still gives the target's distribution."""
    k = 2
    params = SamplingParams(max_tokens=k + 1, **setting)
    engine = make_engine("draft_model", tiny_target, cut_head_draft, k)
    vocab = tiny_target.vocab_size
    spec, emitted = speculative_sequence_distribution(engine, tiny_target, PROMPT, params, k + 1, vocab)
    exact = target_sequence_distribution(tiny_target, PROMPT, k + 1, params, vocab)
    assert any(len(s) > 1 for s in emitted), "the test would be vacuous"
    kept = set(cut_head_draft.model.head_token_ids.tolist())
    assert all(t in kept for s in emitted if len(s) > 1 for t in s[:-1]), "accepted drafts come from the cut head"
    assert max_difference(spec, exact) < 1e-6


def test_cut_head_draft_greedy_is_plain_greedy(tiny_target, cut_head_draft):
    params = SamplingParams(temperature=0, max_tokens=24)
    plain = SpecEngine(tiny_target, None, 0, max_model_len=64)
    spec = make_engine("draft_model", tiny_target, cut_head_draft, 3)
    a = plain.generate(plain.new_sequence(PROMPT, params))
    b = spec.generate(spec.new_sequence(PROMPT, params))
    assert b.output_ids == a.output_ids and sum(b.metrics.accepted_per_step) > 0


# ---- penalties: each tree node penalised for its own path ---------------------------------------------
PENALTY_SETTINGS = [
    dict(temperature=0.8, presence_penalty=1.5, frequency_penalty=1.0),
    dict(temperature=1.0, top_k=5, repetition_penalty=0.6, frequency_penalty=-1.0),
    dict(temperature=1.0, top_p=0.9, repetition_penalty=1.5, presence_penalty=1.0, frequency_penalty=0.7),
]
# Prompt lookup proposes one chain; under the top-k above the target never accepts its first token.
LOOKUP_PENALTY_SETTINGS = [PENALTY_SETTINGS[0], dict(temperature=1.0, repetition_penalty=0.6, frequency_penalty=-1.0)]
# A tree's every outcome is many more engine steps to enumerate: its cases keep 4 tokens (top-k).
TREE_PENALTY_SETTINGS = [
    dict(temperature=1.0, top_k=4, repetition_penalty=1.8),
    dict(temperature=0.8, top_k=4, presence_penalty=1.5, frequency_penalty=1.0),
    dict(temperature=1.0, top_k=4, repetition_penalty=0.6, presence_penalty=-1.0, frequency_penalty=0.5),
]
PENALTY_CASES = [
    pytest.param(kind, setting, id=f"{kind}-" + "-".join(f"{k}{v}" for k, v in setting.items()))
    for kind, settings in (
        ("draft_model", PENALTY_SETTINGS),
        ("prompt_lookup", LOOKUP_PENALTY_SETTINGS),
        ("tree:widths:2,1", TREE_PENALTY_SETTINGS),
    )
    for setting in settings
]
PENALISED = dict(temperature=1.0, repetition_penalty=1.5, presence_penalty=1.0, frequency_penalty=1.0)


def reference_penalties(logits: torch.Tensor, params: SamplingParams, prompt: list[int], output) -> torch.Tensor:
    """The penalties written out token by token (float64): repetition over prompt + output, presence and
    frequency over the output only."""
    logits = logits.double().clone()
    for token in set(prompt) | set(output):
        x = float(logits[token])
        logits[token] = x / params.repetition_penalty if x > 0 else x * params.repetition_penalty
    for token in set(output):
        logits[token] -= params.presence_penalty + params.frequency_penalty * list(output).count(token)
    return logits


def penalised_target_distribution(target, prompt, length, params, vocab, emitted=None) -> dict:
    """The distribution of the first `length` tokens sampled by the target alone, token after token, each
    penalised for everything before it; with `emitted` ({prefix: probability}), each prefix continued so."""
    conditionals: dict[tuple, torch.Tensor] = {}  # output so far -> the target's next-token distribution

    def conditional(output: tuple) -> torch.Tensor:
        if output not in conditionals:
            ids = prompt + list(output)
            cache = target.model.new_cache(1, len(ids) + 1)
            logits = target.model.forward(torch.tensor([ids]), torch.arange(len(ids))[None], cache)[0, -1]
            row = reference_penalties(logits, params, prompt, output)
            conditionals[output] = process_logits(row.float(), params).double()
        return conditionals[output]

    dist: dict[tuple, float] = {}
    for prefix, prob in (emitted or {(): 1.0}).items():
        for rest in itertools.product(range(vocab), repeat=length - len(prefix)):
            output = tuple(prefix) + rest
            p = prob
            for i in range(len(prefix), length):
                p *= float(conditional(output[:i])[output[i]])
                if p == 0:
                    break
            if p > 0:
                dist[output] = dist.get(output, 0.0) + p
    return dist


def make_penalty_engine(kind, target, draft, k):
    if kind.startswith("tree:"):
        from specgrove.trees.shape import TreeShape

        shape = TreeShape.parse(kind[len("tree:") :])
        engine = SpecEngine(target, DraftModelProposer(draft, 64, shape), len(shape), max_model_len=64)
        return engine, len(shape), shape.depth
    return make_engine(kind, target, draft, k), k, k


def penalised_step_vs_target(kind, params_kwargs, target, draft):
    """(the speculative step's distribution of the first depth + 1 tokens, the target's, what the step emitted)"""
    engine, k, depth = make_penalty_engine(kind, target, draft, 2)
    params = SamplingParams(max_tokens=k + 1, **params_kwargs)
    vocab = target.vocab_size

    def one_step(sampler):
        seq = engine.new_sequence(PROMPT, params, sampler=sampler)
        engine.prefill(seq)
        engine.step(seq)
        engine.finish(seq)
        return tuple(seq.output_ids)

    emitted = enumerate_outcomes(one_step)
    spec = penalised_target_distribution(target, PROMPT, depth + 1, params, vocab, emitted)
    exact = penalised_target_distribution(target, PROMPT, depth + 1, params, vocab)
    return spec, exact, emitted


@pytest.mark.parametrize("kind, setting", PENALTY_CASES)
def test_one_step_with_penalties_is_exact(kind, setting, tiny_target, tiny_draft):
    spec, exact, emitted = penalised_step_vs_target(kind, setting, tiny_target, tiny_draft)
    assert abs(sum(emitted.values()) - 1.0) < 1e-9
    # some outcome accepts a drafted token, so a token comes from a node's p penalised for its own path
    assert any(len(s) > 1 for s in emitted), "the test would be vacuous: no outcome accepts a drafted token"
    assert max_difference(spec, exact) < 1e-6


@pytest.mark.parametrize("kind", ["draft_model", "tree:widths:2,1"])
def test_penalties_that_ignore_the_nodes_path_fail_the_enumeration(kind, tiny_target, tiny_draft, monkeypatch):
    """Penalising every node of the tree for the committed tokens alone (not its own drafted ancestors) is the
    bug this catches. (Not with prompt lookup: on PROMPT the target accepts its proposal with probability ~1e-5,
    too rarely for the wrong penalties to show; the target's side is the same code for every proposer.)"""
    from specgrove.engine.sequence import Sequence

    original = Sequence.penalised
    monkeypatch.setattr(Sequence, "penalised", lambda self, logits, path=(): original(self, logits, ()))
    setting = {**PENALISED, "top_k": 4} if kind.startswith("tree:") else PENALISED
    spec, exact, emitted = penalised_step_vs_target(kind, setting, tiny_target, tiny_draft)
    assert any(len(s) > 1 for s in emitted)
    assert max_difference(spec, exact) > 1e-3


GREEDY_PENALTIES = [
    dict(repetition_penalty=1.3),
    dict(presence_penalty=0.8, frequency_penalty=0.6),
    dict(repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.3),
    dict(repetition_penalty=0.8, frequency_penalty=-0.5),
]


@pytest.mark.parametrize("penalties", GREEDY_PENALTIES, ids=lambda p: "-".join(f"{k}{v}" for k, v in p.items()))
def test_greedy_with_penalties_is_plain_greedy_with_penalties(penalties, tiny_target, tiny_draft):
    from specgrove.trees.shape import TreeShape

    params = SamplingParams(temperature=0, max_tokens=20, **penalties)
    plain = SpecEngine(tiny_target, None, 0, max_model_len=64)
    proposers = {
        "draft_model": (DraftModelProposer(tiny_draft, 64), 3),
        "prompt_lookup": (PromptLookupProposer(1, 2), 3),
        "tree": (DraftModelProposer(tiny_draft, 64, TreeShape.parse("widths:2,2")), 4),
        "self_draft_chain": (DraftModelProposer(tiny_target, 64), 3),
        "self_draft_tree": (DraftModelProposer(tiny_target, 64, TreeShape.parse("kary:2x2")), 6),
    }
    for prompt in (PROMPT, [4, 5, 6, 7], [0, 0, 1, 1, 2, 2], [7]):
        reference = plain.generate(plain.new_sequence(prompt, params)).output_ids
        unpenalised = plain.generate(plain.new_sequence(prompt, SamplingParams(temperature=0, max_tokens=20)))
        assert reference != unpenalised.output_ids or len(set(reference)) > 1
        for name, (proposer, k) in proposers.items():
            engine = SpecEngine(tiny_target, proposer, k, max_model_len=64)
            seq = engine.generate(engine.new_sequence(prompt, params))
            assert seq.output_ids == reference, (name, prompt)
            # the draft penalises each node for its path as the target does: a self-draft's first choice always agrees
            if name == "self_draft_chain":
                assert seq.metrics.acceptance_rate == 1.0, (name, prompt)
            if name == "self_draft_tree":
                assert seq.metrics.rank_acceptance[0] == 1.0, (name, prompt)
