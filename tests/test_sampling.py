import pytest
import torch

from specgrove.sampling import SamplingParams, choice_params, choice_seed, process_logits

LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0]])


def test_greedy_is_one_hot_argmax():
    p = process_logits(LOGITS, SamplingParams(temperature=0))
    assert p.tolist() == [[0, 0, 0, 0, 0, 1.0]]


def test_temperature_softmax():
    p = process_logits(LOGITS, SamplingParams(temperature=0.5))
    assert torch.allclose(p, torch.softmax(LOGITS / 0.5, -1))


def test_top_k_top_p_min_p():
    p = process_logits(LOGITS, SamplingParams(top_k=2))
    assert (p > 0).sum() == 2 and p[0, 5] > p[0, 0] > 0
    full = torch.softmax(LOGITS, -1)[0]  # sorted: 5 (.6), 0 (.22), 1 (.08), ...
    p = process_logits(LOGITS, SamplingParams(top_p=0.7))
    assert (p > 0).nonzero()[:, 1].tolist() == [0, 5]  # .6 < .7, so the next token is needed
    assert torch.allclose(p[0, [0, 5]], full[[0, 5]] / full[[0, 5]].sum())
    p = process_logits(LOGITS, SamplingParams(min_p=0.3))
    assert (p > 0).nonzero()[:, 1].tolist() == [0, 5]
    assert torch.allclose(p.sum(-1), torch.ones(1))


@pytest.mark.parametrize("top_p", [5e-324, 1e-300, 1e-46, 1e-30])
def test_a_tiny_top_p_keeps_the_most_likely_token(top_p):
    """A top_p that rounds to 0 in float32 still keeps the argmax (the server's schema fuzzing found top_p=5e-324:
    every token was dropped and the sampler read NaN)."""
    p = process_logits(LOGITS, SamplingParams(top_p=top_p))
    assert p.tolist() == [[0, 0, 0, 0, 0, 1.0]]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-3), "top_k"),
        (dict(min_p=2.0), "min_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(stop=[""]), "stop"),
        (dict(temperature=1e-300), "too small"),
        (dict(temperature=float("inf")), "finite"),
        (dict(temperature=float("nan")), "finite"),
        (dict(seed=2**64), "seed"),
        (dict(seed=-(2**63) - 1), "seed"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=-1.2), "repetition_penalty"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty"),
        (dict(repetition_penalty=float("nan")), "repetition_penalty"),
        (dict(repetition_penalty=6.6e264), "repetition_penalty"),  # schema fuzzing's: NaN with a huge temperature
        (dict(repetition_penalty=1e-300), "repetition_penalty"),
        (dict(temperature=1.28e308), "above"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=-2.01), "frequency_penalty"),
        (dict(frequency_penalty=float("nan")), "frequency_penalty"),
        (dict(presence_penalty=True), "presence_penalty"),
        (dict(n=0), r"n \(independent choices per prompt\) must be an integer in \[1, 16\]"),
        (dict(n=17), "n .* in \\[1, 16\\]"),
        (dict(n=2.0), "n .* integer"),
        (dict(n=True), "n .* integer"),
    ],
)
def test_bad_values_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_choices_are_seeded_from_the_request_seed():
    """Choice 0 keeps the request's seed (n = 1 answers as before), the others derive theirs from it,
    deterministically and distinct; every choice is one sequence (n = 1) with the rest of the settings."""
    params = SamplingParams(temperature=0.7, top_k=3, seed=42, max_tokens=9, stop="x", n=4)
    choices = choice_params(params)
    assert [c.seed for c in choices] == [choice_seed(42, i) for i in range(4)]
    assert choices[0].seed == 42 and len({c.seed for c in choices}) == 4
    assert all(-(2**63) <= c.seed < 2**63 for c in choices)
    assert choice_seed(42, 1) == choice_seed(42, 1) != choice_seed(43, 1)
    assert all(c.n == 1 and c.max_tokens == 9 and c.top_k == 3 and c.stop == ["x"] for c in choices)
    assert [c.seed for c in choice_params(SamplingParams(n=3))] == [None, None, None]
    assert params.n == 4  # the request's own params are left as they were


def test_penalties_follow_vllm():
    """Repetition divides positive / multiplies negative logits of prompt and output tokens; presence and
    frequency subtract per output token only; the drafted path counts as output."""
    from specgrove.sampling import TokenCounts

    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, 1.0])
    counts = TokenCounts([0, 1])  # the prompt holds tokens 0 and 1
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    out = counts.penalise(logits, params, output_ids=[3, 3], path=[2])
    # 0, 1: prompt only (repetition); 3: twice in the output; 2: once, on the path
    assert torch.allclose(out, torch.tensor([1.0, -2.0, 0.25 - 0.5 - 0.25, 1.5 - 0.5 - 0.5, 1.0]))
    assert torch.equal(counts.penalise(logits, SamplingParams(), [3], [2]), logits)  # neutral values: unchanged
    # the output grows: only the new tokens are counted, and a path never sticks
    again = counts.penalise(logits, params, output_ids=[3, 3, 4])
    assert torch.allclose(again, torch.tensor([1.0, -2.0, 0.5, 1.5 - 0.5 - 0.5, 0.5 - 0.5 - 0.25]))
    assert not SamplingParams().has_penalties and SamplingParams(frequency_penalty=-1.0).has_penalties


def test_max_new_tokens_alias():
    assert SamplingParams(max_new_tokens=9).max_tokens == 9
    assert SamplingParams(stop="x").stop == ["x"]


def test_processed_rows_are_computed_only_where_the_walk_goes():
    from specgrove.sampling import ProcessedRows, Sampler
    from specgrove.trees.tree import TokenTree
    from specgrove.verify.speculative import verify_tree

    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=6)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 50, generator=g) * 3
    full = process_logits(logits, params)
    tree = TokenTree([1, 2, 3, 4, 5], [-1, 0, 1, 2, 3], draft_probs=torch.softmax(torch.randn(5, 50, generator=g), -1))
    for seed in range(20):
        lazy = ProcessedRows(logits, params)
        expected = verify_tree(tree, full, Sampler(seed))
        got = verify_tree(tree, lazy, Sampler(seed))
        assert (got.accepted_nodes, got.next_token) == (expected.accepted_nodes, expected.next_token)
        assert lazy.rows_processed == got.num_accepted + 1  # the root and the accepted path, nothing else
        for row in lazy._rows:
            assert torch.allclose(lazy[row], full[row], atol=1e-7)


def test_the_smallest_temperature_accepted_still_gives_a_distribution():
    """MIN_TEMPERATURE keeps logits / temperature inside float32 for any logits a model gives (|x| <= 1e4)."""
    from specgrove.sampling import MIN_TEMPERATURE

    logits = torch.tensor([[1e4, -1e4, 3.0, 3.0 + 1e-3, 0.0]])
    p = process_logits(logits, SamplingParams(temperature=MIN_TEMPERATURE))
    assert torch.isfinite(p).all() and torch.allclose(p.sum(-1), torch.ones(1))
    SamplingParams(seed=2**63 - 1)  # the bounds themselves are fine
    SamplingParams(seed=-(2**63))


def test_the_extreme_penalty_and_temperature_accepted_still_give_a_distribution():
    """At MAX_TEMPERATURE and either repetition-penalty bound, every token seen, logits as large as a model gives
    and -inf among them (a filter's): still a distribution, never NaN."""
    from specgrove.sampling import MAX_REPETITION_PENALTY, MAX_TEMPERATURE, MIN_REPETITION_PENALTY, apply_penalties

    logits = torch.tensor([1e4, -1e4, 3.0, -3.0, 0.0])
    seen, counts = torch.ones(5, dtype=torch.bool), torch.full((5,), 3.0)
    for penalty in (MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY):
        for temperature in (MAX_TEMPERATURE, 1.0):
            params = SamplingParams(
                temperature=temperature, repetition_penalty=penalty, presence_penalty=2.0, frequency_penalty=2.0
            )
            penalised = apply_penalties(logits, params, seen, counts)
            assert torch.isfinite(penalised).all()
            p = process_logits(penalised[None], params)
            assert torch.isfinite(p).all() and torch.allclose(p.sum(-1), torch.ones(1))
