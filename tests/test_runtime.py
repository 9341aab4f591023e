"""The fast runtime against transformers' own model: plain, token trees, keeping a subset, batches."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from specgrove.errors import UnsupportedError
from specgrove.models.loader import load_model
from specgrove.testing import make_tiny_model
from specgrove.trees.tree import TokenTree

from conftest import DEVICE

TOL = 1e-4


@pytest.fixture(scope="module", params=["qwen2", "llama", "mistral"])
def pair(request, tmp_path_factory):
    d = make_tiny_model(tmp_path_factory.mktemp(request.param), request.param, vocab_size=50, seed=5)
    ours = load_model(d, dtype="float32", device=DEVICE)
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    return ours, ref


def reference_logits(ref, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].float()


def test_full_and_incremental_forward_match_transformers(pair):
    ours, ref = pair
    ids = torch.randint(0, 50, (17,), generator=torch.Generator().manual_seed(0)).tolist()
    expected = reference_logits(ref, ids)
    cache = ours.model.new_cache(1, 64)
    out = ours.model.forward(torch.tensor([ids]), torch.arange(17)[None], cache).cpu()[0]
    assert (out - expected).abs().max() < TOL
    cache = ours.model.new_cache(1, 64)
    ours.model.forward(torch.tensor([ids[:10]]), torch.arange(10)[None], cache, logits_at=None)
    cache.commit(0)
    for i in range(10, 17):  # one token at a time
        step = ours.model.forward(torch.tensor([[ids[i]]]), torch.tensor([[i]]), cache).cpu()[0, 0]
        cache.commit(0)
        assert (step - expected[i]).abs().max() < TOL


def random_tree(num_nodes: int, vocab: int, seed: int) -> TokenTree:
    g = torch.Generator().manual_seed(seed)
    parents = [-1]
    for i in range(1, num_nodes):
        parents.append(int(torch.randint(-1, i, (1,), generator=g)))
    tokens = torch.randint(0, vocab, (num_nodes,), generator=g).tolist()
    return TokenTree(tokens, parents)


def test_tree_mask_logits_equal_each_paths_sequential_logits(pair):
    ours, ref = pair
    prefix = [3, 14, 15, 9, 2, 6]
    tree = random_tree(9, 50, seed=1)
    cache = ours.model.new_cache(1, 64)
    ours.model.forward(torch.tensor([prefix[:-1]]), torch.arange(5)[None], cache, logits_at=None)
    cache.commit(0)
    positions = 5 + torch.tensor(tree.position_offsets())
    out = ours.model.forward(
        torch.tensor([[prefix[-1]] + tree.tokens]), positions[None], cache, tree_mask=tree.attention_mask()[None]
    ).cpu()[0]
    assert (out[0] - reference_logits(ref, prefix)[-1]).abs().max() < TOL
    for node in range(len(tree)):
        path = [tree.tokens[n] for n in tree.path_to(node)]
        expected = reference_logits(ref, prefix + path)[-1]
        assert (out[node + 1] - expected).abs().max() < TOL, f"node {node}"


def test_keeping_a_tree_path_then_continuing(pair):
    ours, ref = pair
    prefix = [7, 1, 8, 2]
    tree = TokenTree([10, 11, 12, 13, 14, 15], [-1, -1, 0, 1, 3, 2])
    cache = ours.model.new_cache(1, 64)
    ours.model.forward(torch.tensor([prefix[:-1]]), torch.arange(3)[None], cache, logits_at=None)
    cache.commit(0)
    ours.model.forward(
        torch.tensor([[prefix[-1]] + tree.tokens]),
        (3 + torch.tensor(tree.position_offsets()))[None],
        cache,
        tree_mask=tree.attention_mask()[None],
    )
    kept = tree.path_to(4)  # nodes 1 -> 3 -> 4: tokens 11, 13, 14 (not a prefix of the node order)
    cache.commit(0, [0] + [n + 1 for n in kept])
    assert cache.lengths[0] == 4 + len(kept)
    sequence = prefix + [tree.tokens[n] for n in kept]
    nxt = 33
    out = ours.model.forward(torch.tensor([[nxt]]), torch.tensor([[len(sequence)]]), cache).cpu()[0, 0]
    assert (out - reference_logits(ref, sequence + [nxt])[-1]).abs().max() < TOL


def test_batch_rows_with_different_lengths_and_padding(pair):
    ours, ref = pair
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7]]
    cache = ours.model.new_cache(2, 64)
    for row, p in enumerate(prompts):  # prefill each row on its own
        ours.model.forward(torch.tensor([p[:-1]]), torch.arange(len(p) - 1)[None], cache, rows=[row], logits_at=None)
        cache.commit(row)
    # one batched step: row 0 gets 3 new tokens (a chain), row 1 gets 1 (+2 padding)
    new = [[p[-1]] for p in prompts]
    new[0] += [20, 21]
    ids = torch.tensor([new[0], new[1] + [0, 0]])
    positions = torch.tensor([[6, 7, 8], [2, 3, 4]])
    out = ours.model.forward(ids, positions, cache, num_new=[3, 1]).cpu()
    cache.commit(0)
    cache.commit(1)
    assert cache.lengths == [9, 3]
    ref0 = reference_logits(ref, prompts[0] + [20, 21])
    ref1 = reference_logits(ref, prompts[1])
    assert (out[0] - ref0[-3:]).abs().max() < TOL
    assert (out[1, 0] - ref1[-1]).abs().max() < TOL
    last = ours.model.forward(ids, positions, ours.model.new_cache(2, 64), logits_at="last", num_new=[3, 1]).cpu()
    assert last.shape == (2, 1, 50)


def test_bf16_is_close_to_fp32(tmp_path):
    d = make_tiny_model(tmp_path, "qwen2", vocab_size=50, seed=5)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    a = load_model(d, dtype="float32", device=DEVICE).model
    b = load_model(d, dtype="bfloat16", device=DEVICE).model
    la = a.forward(ids, torch.arange(5)[None], a.new_cache(1, 8)).cpu()
    lb = b.forward(ids, torch.arange(5)[None], b.new_cache(1, 8)).cpu()
    assert lb.dtype == torch.float32
    assert (la - lb).abs().max() < 0.1 * la.abs().max()


def test_transformers_fallback_runs_chains_and_refuses_trees(tmp_path):
    d = make_tiny_model(tmp_path, "qwen2", vocab_size=50, seed=5)
    fast = load_model(d, dtype="float32")
    slow = load_model(d, dtype="float32", force_fallback=True)
    assert not slow.is_fast
    ids = [5, 6, 7, 8, 9]
    c_fast, c_slow = fast.model.new_cache(1, 16), slow.model.new_cache(1, 16)
    for m, c in ((fast.model, c_fast), (slow.model, c_slow)):
        m.forward(torch.tensor([ids[:3]]), torch.arange(3)[None], c, logits_at=None)
        c.commit(0)
    a = fast.model.forward(torch.tensor([ids[3:]]), torch.tensor([[3, 4]]), c_fast)
    b = slow.model.forward(torch.tensor([ids[3:]]), torch.tensor([[3, 4]]), c_slow)
    assert (a - b).abs().max() < TOL
    c_slow.commit(0, [0])  # keep a prefix: fine
    assert c_slow.lengths == [4]
    tree = TokenTree([1, 2], [-1, -1])
    with pytest.raises(UnsupportedError):
        slow.model.forward(
            torch.tensor([[3, 1, 2]]), torch.tensor([[4, 5, 5]]), c_slow, tree_mask=tree.attention_mask()[None]
        )
    with pytest.raises(UnsupportedError):
        c_slow.commit(0, [1])
