"""Integration tests on the real default models (fetched and converted on first use; about 10 GB of
memory in fp32, so never run these in parallel workers). Deselect with `-m "not integration"`."""

import gc

import pytest
import torch

from specgrove import LLM, SamplingParams
from specgrove.models import defaults
from specgrove.models.loader import load_model
from specgrove.trees.tree import TokenTree

pytestmark = pytest.mark.integration


def test_default_models_are_pinned_and_verified():
    for name in (defaults.DEFAULT_TARGET, defaults.DEFAULT_DRAFT):
        defaults.ensure_builtin(name)
        assert defaults.verify_builtin(name) == defaults.BUILTIN_MODELS[name].gguf_sha256


def test_real_draft_runtime_matches_transformers_with_a_tree():
    from transformers import AutoModelForCausalLM

    ours = load_model(defaults.DEFAULT_DRAFT, dtype="float32")
    ref = AutoModelForCausalLM.from_pretrained(str(ours.path), dtype=torch.float32).eval()
    prefix = ours.tokenizer.encode("def fibonacci(n):\n    ")
    tree = TokenTree([422, 470, 421, 11, 470], [-1, -1, 0, 0, 1])
    cache = ours.model.new_cache(1, 64)
    ours.model.forward(torch.tensor([prefix[:-1]]), torch.arange(len(prefix) - 1)[None], cache, logits_at=None)
    cache.commit(0)
    positions = len(prefix) - 1 + torch.tensor(tree.position_offsets())
    out = ours.model.forward(torch.tensor([[prefix[-1]] + tree.tokens]), positions[None], cache,
                             tree_mask=tree.attention_mask()[None])[0]
    for node in [-1] + list(range(len(tree))):
        path = [tree.tokens[n] for n in tree.path_to(node)] if node >= 0 else []
        with torch.no_grad():
            expected = ref(torch.tensor([prefix + path])).logits[0, -1].float()
        assert (out[node + 1] - expected).abs().max() < 2e-3 * expected.abs().max(), node
    del ours, ref
    gc.collect()


@pytest.fixture(scope="module")
def fp32_llm():
    llm = LLM(speculative={"method": "draft_model", "num_speculative_tokens": 4}, dtype="float32", max_model_len=1024)
    yield llm
    del llm
    gc.collect()


def test_greedy_speculation_is_identical_to_plain_greedy_fp32(fp32_llm):
    from specgrove.drafting.prompt_lookup import PromptLookupProposer
    from specgrove.engine.engine import SpecEngine

    llm = fp32_llm
    prompt = llm.apply_chat_template([{"role": "user", "content": "Write a Python function that reverses a string."}])
    params = SamplingParams(temperature=0, max_tokens=40)
    plain = SpecEngine(llm.target, None, 0, 1024)
    lookup = SpecEngine(llm.target, PromptLookupProposer(1, 3), 4, 1024)
    reference = plain.generate(plain.new_sequence(prompt, params))
    spec = llm.generate(prompt, params)[0]
    pld = lookup.generate(lookup.new_sequence(prompt, params))
    assert spec.token_ids == reference.output_ids
    assert pld.output_ids == reference.output_ids
    assert spec.metrics.mean_accept_length > 1.5  # the real draft agrees with the target often
    assert spec.metrics.target_forwards < reference.metrics.target_forwards
    assert "def" in spec.text


def test_greedy_tree_decoding_is_identical_to_plain_greedy_fp32(fp32_llm):
    from specgrove.drafting.draft_model import DraftModelProposer
    from specgrove.engine.engine import SpecEngine
    from specgrove.trees.shape import TreeShape

    llm = fp32_llm
    prompt = llm.apply_chat_template([{"role": "user", "content": "Write a bash command that counts lines in a file."}])
    params = SamplingParams(temperature=0, max_tokens=32)
    plain = SpecEngine(llm.target, None, 0, 1024)
    reference = plain.generate(plain.new_sequence(prompt, params))
    tree = SpecEngine(llm.target, DraftModelProposer(llm.draft, 1024, TreeShape.parse("widths:3,2,1")), 12, 1024)
    seq = tree.generate(tree.new_sequence(prompt, params))
    assert seq.output_ids == reference.output_ids
    assert seq.metrics.mean_accept_length > 1.5 and seq.metrics.rank_trials[0] >= seq.metrics.target_forwards


def test_sampling_on_real_models_runs_and_reports(fp32_llm):
    out = fp32_llm.chat([{"role": "user", "content": "Say hello."}], SamplingParams(temperature=0.7, top_p=0.9, seed=1, max_tokens=16))
    assert out.outputs[0].finish_reason in ("stop", "length") and out.text
    assert out.metrics.target_forwards >= 1 and 0 <= out.metrics.acceptance_rate <= 1
