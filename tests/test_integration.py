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

    ours = load_model(defaults.DEFAULT_DRAFT, dtype="float32", quantization="none")  # dequantized, as transformers
    ref = AutoModelForCausalLM.from_pretrained(str(ours.path), dtype=torch.float32).eval()
    prefix = ours.tokenizer.encode("def fibonacci(n):\n    ")
    tree = TokenTree([422, 470, 421, 11, 470], [-1, -1, 0, 0, 1])
    cache = ours.model.new_cache(1, 64)
    ours.model.forward(torch.tensor([prefix[:-1]]), torch.arange(len(prefix) - 1)[None], cache, logits_at=None)
    cache.commit(0)
    positions = len(prefix) - 1 + torch.tensor(tree.position_offsets())
    out = ours.model.forward(
        torch.tensor([[prefix[-1]] + tree.tokens]), positions[None], cache, tree_mask=tree.attention_mask()[None]
    )[0]
    for node in [-1] + list(range(len(tree))):
        path = [tree.tokens[n] for n in tree.path_to(node)] if node >= 0 else []
        with torch.no_grad():
            expected = ref(torch.tensor([prefix + path])).logits[0, -1].float()
        assert (out[node + 1] - expected).abs().max() < 2e-3 * expected.abs().max(), node
    del ours, ref
    gc.collect()


@pytest.fixture(scope="module")
def fp32_llm():
    llm = LLM(
        speculative={"method": "draft_model", "num_speculative_tokens": 4},
        dtype="float32",
        max_model_len=1024,
        quantization="none",
        draft_quantization="none",
    )
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
    out = fp32_llm.chat(
        [{"role": "user", "content": "Say hello."}], SamplingParams(temperature=0.7, top_p=0.9, seed=1, max_tokens=16)
    )
    assert out.outputs[0].finish_reason in ("stop", "length") and out.text
    assert out.metrics.target_forwards >= 1 and 0 <= out.metrics.acceptance_rate <= 1


# ---- the default format: the GGUF files' own blocks (specgrove.models.gguf_weights, specgrove.kernels) ----


@pytest.fixture(scope="module")
def default_llm():
    llm = LLM(speculative={"method": "draft_model", "num_speculative_tokens": 4}, max_model_len=1024)
    yield llm
    del llm
    gc.collect()


def test_builtin_models_run_on_their_gguf_blocks_by_default(default_llm):
    from specgrove.kernels.ggml import ggml_dequantize
    from specgrove.models.gguf_weights import GGUFWeights
    from specgrove.models.loader import gguf_source, read_safetensors

    for loaded in (default_llm.target, default_llm.draft):
        model = loaded.model
        assert model.quantization == "gguf" and model.batch_invariant and loaded.dtype == torch.float32
        source = gguf_source(loaded.name)
        assert model.weight_bytes() < 1.05 * source.stat().st_size  # the file's bytes, no dequantized copy
        # The blocks are the weights the converted directory holds (transformers dequantized the same file).
        dense = read_safetensors(loaded.path)
        gguf = GGUFWeights(source)
        for name in (
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.1.self_attn.v_proj.weight",
            "model.layers.2.mlp.down_proj.weight",
            "lm_head.weight",
        ):
            m = gguf.matrix(name)
            assert torch.equal(ggml_dequantize(m.data, m.type, m.n, m.k), dense[name]), (loaded.name, name)


def test_forward_is_batch_invariant_on_the_real_target(default_llm):
    """A token's logits are bit-identical whether it is decoded alone, verified in a chain or a tree, or shares
    the forward with another sequence's tokens."""
    model = default_llm.target.model
    prompt = default_llm.target.tokenizer.encode("def fibonacci(n):\n    ")
    chain = [422, 470, 421, 11, 470]
    cache = model.new_cache(2, 128)

    def prefill(row, tokens):
        cache.truncate(row, 0)
        model.forward(torch.tensor([tokens]), torch.arange(len(tokens))[None], cache, rows=[row], logits_at=None)
        cache.commit(row)

    prefill(0, prompt[:-1])
    one_by_one = []
    for i, token in enumerate([prompt[-1]] + chain):
        one_by_one.append(
            model.forward(torch.tensor([[token]]), torch.tensor([[len(prompt) - 1 + i]]), cache, rows=[0])[0, 0]
        )
        cache.commit(row=0)
    one_by_one = torch.stack(one_by_one)

    prefill(0, prompt[:-1])
    together = model.forward(
        torch.tensor([[prompt[-1]] + chain]), (len(prompt) - 1 + torch.arange(len(chain) + 1))[None], cache, rows=[0]
    )[0]
    assert torch.equal(together, one_by_one)

    # The chain as a path of a tree with other branches, and beside another sequence in the batch.
    tree = TokenTree([422, 9, 470, 421, 13, 11, 470], [-1, -1, 0, 2, 2, 3, 5])
    path = [0, 2, 3, 5, 6]
    assert [tree.tokens[n] for n in path] == chain
    prefill(0, prompt[:-1])
    prefill(1, prompt[3:20])
    mask = torch.zeros(2, len(tree) + 1, len(tree) + 1, dtype=torch.bool)
    mask[0] = tree.attention_mask()
    mask[1, :3, :3] = torch.ones(3, 3, dtype=torch.bool).tril()
    ids = torch.zeros(2, len(tree) + 1, dtype=torch.long)
    ids[0] = torch.tensor([prompt[-1]] + tree.tokens)
    ids[1, :3] = torch.tensor([5, 6, 7])
    positions = torch.zeros_like(ids)
    positions[0] = len(prompt) - 1 + torch.tensor(tree.position_offsets())
    positions[1] = 17 + torch.arange(len(tree) + 1).clamp(max=2)
    batched, features = model.forward(
        ids, positions, cache, tree_mask=mask, rows=[0, 1], num_new=[len(tree) + 1, 3], features=[-1]
    )
    assert torch.equal(batched[0, [0] + [n + 1 for n in path]], one_by_one)
    # The features a draft head reads are batch-invariant too: the output layer over them gives the same bits.
    assert torch.equal(model.logits(features[0, [0] + [n + 1 for n in path]]), one_by_one)


@pytest.mark.parametrize("method", ["draft_model", "prompt_lookup", "tree"])
def test_greedy_speculation_is_identical_to_plain_greedy_in_the_default_format(default_llm, method):
    from specgrove.drafting.draft_model import DraftModelProposer
    from specgrove.drafting.prompt_lookup import PromptLookupProposer
    from specgrove.engine.engine import SpecEngine
    from specgrove.trees.shape import TreeShape

    llm = default_llm
    proposer = {
        "draft_model": lambda: DraftModelProposer(llm.draft, 1024),
        "prompt_lookup": lambda: PromptLookupProposer(1, 3),
        "tree": lambda: DraftModelProposer(llm.draft, 1024, TreeShape.parse("widths:3,2,1")),
    }[method]()
    engine = SpecEngine(llm.target, proposer, 12 if method == "tree" else 4, 1024)
    plain = SpecEngine(llm.target, None, 0, 1024)
    params = SamplingParams(temperature=0, max_tokens=48)
    for question in ("Write a Python function that reverses a string.", "Explain what a hash map is in two sentences."):
        prompt = llm.apply_chat_template([{"role": "user", "content": question}])
        reference = plain.generate(plain.new_sequence(prompt, params))
        spec = engine.generate(engine.new_sequence(prompt, params))
        assert spec.output_ids == reference.output_ids, (method, question)
        assert spec.metrics.target_forwards < reference.metrics.target_forwards
