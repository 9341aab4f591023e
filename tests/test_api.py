"""The Python API (`LLM`) on tiny fp32 models: n choices per prompt (vLLM's shape, seeded as the server seeds
them), and chunked prefill (`max_num_batched_tokens`) giving the same outputs as whole prompts."""

import pytest

from specgrove import SamplingParams
from specgrove.sampling import choice_seed

from conftest import tiny_llm

# Lengths 23, 2, 1, 9: longer than the budgets below, and one-token prompts.
PROMPTS = [
    [1, 2, 3, 1, 2, 4, 5, 6, 1, 2, 3, 7, 0, 1, 2, 3, 1, 2, 4, 5, 6, 7, 1],
    [4, 5],
    [3],
    [2, 2, 2, 2, 6, 1, 2, 2, 2],
]


def make_llm(tiny_dirs, **kwargs):
    return tiny_llm(tiny_dirs, max_model_len=64, **kwargs)


@pytest.fixture(scope="module")
def llm(tiny_dirs):
    return make_llm(tiny_dirs, max_num_seqs=2)


# ---- n choices -----------------------------------------------------------------------------------
def test_n_greedy_choices_are_the_single_answer(llm):
    one = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=10))[0]
    [out] = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=10, n=3))
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert [c.token_ids for c in out.outputs] == [one.token_ids] * 3
    assert [c.text for c in out.outputs] == [one.text] * 3 and out.token_ids == one.token_ids
    assert out.prompt_token_ids == PROMPTS[0] and len(one.outputs) == 1
    # the request's metrics count every choice's tokens
    assert out.metrics.generated_tokens == 30 and one.metrics.generated_tokens == 10


def test_n_seeded_choice_i_is_a_lone_request_seeded_with_choice_seed(llm):
    params = SamplingParams(temperature=1.0, top_k=6, seed=5, max_tokens=12, ignore_eos=True, n=3)
    [out] = llm.generate(PROMPTS[3], params)
    lone = [
        llm.generate(PROMPTS[3], SamplingParams(temperature=1.0, top_k=6, seed=choice_seed(5, i), max_tokens=12))[0]
        for i in range(3)
    ]
    assert [c.token_ids for c in out.outputs] == [one.token_ids for one in lone]
    assert choice_seed(5, 0) == 5  # choice 0 is the n = 1 request
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1, "the choices must be independent samples"
    assert all(len(c.token_ids) == 12 for c in out.outputs)
    # reproducible, and independent of what else is in the batch
    again = llm.generate([PROMPTS[1], PROMPTS[3]], [SamplingParams(temperature=0, max_tokens=4), params])[1]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]


def test_n_per_prompt_and_chat(llm):
    outs = llm.generate(
        PROMPTS[:3],
        [
            SamplingParams(temperature=0, max_tokens=5, n=2),
            SamplingParams(temperature=0, max_tokens=5),
            SamplingParams(temperature=0.8, seed=1, max_tokens=5, n=4),
        ],
    )
    assert [len(o.outputs) for o in outs] == [2, 1, 4]
    assert [o.prompt_token_ids for o in outs] == PROMPTS[:3]
    assert len({o.request_id for o in outs}) == 3
    assert llm.engine.pool.in_use == 0


# ---- chunked prefill -------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [1, 7])
def test_max_num_batched_tokens_keeps_greedy_outputs(tiny_dirs, llm, budget):
    params = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
    whole = llm.generate(PROMPTS, params)
    chunked = make_llm(tiny_dirs, max_num_seqs=2, max_num_batched_tokens=budget)
    prefilled = []  # tokens each engine.prefill call put in the cache
    original = chunked.engine.prefill

    def recording_prefill(seq, max_tokens=None):
        count = original(seq, max_tokens)
        prefilled.append(count)
        return count

    chunked.engine.prefill = recording_prefill
    outs = chunked.generate(PROMPTS, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in whole]
    # the budget reached the scheduler: no call prefilled more, and the 23-token prompt took several
    assert max(prefilled) <= budget and sum(prefilled) == sum(len(p) - 1 for p in PROMPTS)
    assert sum(1 for c in prefilled if c > 0) >= 22 // budget


@pytest.mark.parametrize("budget", [0, -3, 2.5, True, "8"])
def test_a_bad_max_num_batched_tokens_is_refused(tiny_dirs, budget):
    with pytest.raises(ValueError, match="max_num_batched_tokens must be an integer >= 1"):
        make_llm(tiny_dirs, max_num_batched_tokens=budget)
