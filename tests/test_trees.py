"""Token trees: shapes, the runtime growing a tree level by level, the tree-drafting proposer, and the
exactness of tree verification (i.i.d. children: SpecInfer's RRS; children drawn without replacement:
Sequoia's rule) by exact enumeration; a Sequoia verifier that forgets to remove rejected siblings
from q must fail it. Greedy tree decoding must equal plain greedy decoding."""

import itertools
import zlib

import pytest
import torch
from test_exactness import max_difference, speculative_sequence_distribution, target_sequence_distribution

from specgrove import LLM, SamplingParams
from specgrove.drafting.draft_model import DraftModelProposer, draw_children
from specgrove.engine.engine import SpecEngine
from specgrove.sampling import process_logits
from specgrove.trees.sequoia import parse_tree
from specgrove.trees.shape import TreeShape
from specgrove.trees.tree import TokenTree
from specgrove.verify import speculative
from specgrove.verify.enumerate import enumerate_outcomes

PROMPT = [1, 2, 3, 1, 2]


# ---- shapes ----------------------------------------------------------------------------------------
def test_shape_specs():
    assert TreeShape.parse("chain:3").parents == (-1, 0, 1)
    kary = TreeShape.parse("kary:2x2")
    assert kary.parents == (-1, -1, 0, 0, 1, 1) and kary.depth == 2 and kary.level_sizes() == [2, 4]
    assert kary.ranks() == [0, 1, 0, 1, 0, 1]
    widths = TreeShape.parse("widths:3,1")
    assert widths.parents == (-1, -1, -1, 0, 1, 2) and widths.levels() == [[0, 1, 2], [3, 4, 5]]
    assert TreeShape.from_nested([[[]], []]).parents == (-1, -1, 0)
    assert TreeShape.parse("chain:0").parents == () and TreeShape.chain(4).is_chain()
    assert kary.truncated(3).parents == (-1, -1, 0) == TreeShape.parse("kary:2x2@3").parents
    # Sequoia's score: 1 + sum over nodes of the product of P[rank] along the path
    assert kary.expected_accept_length([0.5, 0.25]) == pytest.approx(1 + 0.75 + 0.75 * 0.75)
    for bad in ("kary:2", "chain:x", "star:3", "widths:0", "kary:2x2@x"):
        with pytest.raises(ValueError, match="tree"):
            TreeShape.parse(bad)
    with pytest.raises(ValueError, match="does not exist"):
        parse_tree("/nonexistent/tree.json")
    with pytest.raises(ValueError, match="breadth-first"):
        TreeShape((-1, 0, -1))


# ---- runtime: a tree grown level by level equals the tree in one forward ---------------------------
def test_extend_forward_equals_one_tree_forward(tiny_target):
    model = tiny_target.model
    tree = TokenTree([3, 5, 1, 2, 7, 0], [-1, -1, 0, 0, 1, 2])  # depths 1, 1, 2, 2, 2, 3
    prefix = [1, 2, 3, 4]
    cache = model.new_cache(1, 32)
    model.forward(torch.tensor([prefix]), torch.arange(4)[None], cache, logits_at=None)
    cache.commit(0)
    # one forward over all nodes (the root is committed here, so the nodes are the new tokens)
    mask = tree.attention_mask()[1:, 1:]
    positions = 3 + torch.tensor(tree.depths())
    whole = model.forward(torch.tensor([tree.tokens]), positions[None], cache, tree_mask=mask[None])[0]
    # the same nodes in three forwards, one per depth
    cache.truncate(0, 4)
    pieces = []
    for level in ([0, 1], [2, 3, 4], [5]):
        rows = mask[level[0] : level[-1] + 1, : level[-1] + 1]
        pieces.append(
            model.forward(
                torch.tensor([[tree.tokens[n] for n in level]]),
                positions[level][None],
                cache,
                tree_mask=rows[None],
                extend=True,
            )[0]
        )
    assert cache.pending[0] == 6
    assert (torch.cat(pieces) - whole).abs().max() < 1e-5
    # keep the path 0 -> 2 -> 5 and continue: the same as decoding that path from scratch
    cache.commit(0, [0, 2, 5])
    after = model.forward(torch.tensor([[4]]), torch.tensor([[7]]), cache)[0, 0]
    ids = prefix + [3, 1, 0, 4]
    fresh = model.new_cache(1, 32)
    expected = model.forward(torch.tensor([ids]), torch.arange(len(ids))[None], fresh)[0, -1]
    assert (after - expected).abs().max() < 1e-5
    with pytest.raises(ValueError, match="tree_mask"):
        model.forward(
            torch.tensor([[1]]),
            torch.tensor([[8]]),
            cache,
            extend=True,
            tree_mask=torch.ones(1, 1, 3, dtype=torch.bool),
        )


# ---- pure verification, exact: a depth-2 tree over path-dependent p and q --------------------------
class PathDistributions:
    """Target and draft logits that depend on the whole path (a stand-in for two language models)."""

    def __init__(self, vocab: int, seed: int):
        self.vocab, self.seed, self.memo = vocab, seed, {}

    def logits(self, role: str, path: tuple) -> torch.Tensor:
        key = (role, path)
        if key not in self.memo:
            g = torch.Generator().manual_seed(zlib.crc32(repr((self.seed, role, path)).encode()))  # not hash(): salted
            self.memo[key] = torch.randn(self.vocab, generator=g) * 1.5
        return self.memo[key]


def one_tree_step(models, shape, params, sampling, sampler, node_rule=speculative.rejection_select, draw=draw_children):
    """Draft `shape` with the proposer's own child drawing, verify with the target: the emitted tokens."""
    tokens, parents, probs = [], [], []
    node_of, path_of = {-1: -1}, {-1: ()}  # shape node -> tree node; tree node -> its token path
    for level in shape.levels():
        by_parent = {}
        for node in level:
            by_parent.setdefault(shape.parents[node], []).append(node)
        for shape_parent, children in by_parent.items():
            if shape_parent not in node_of:
                continue
            parent = node_of[shape_parent]
            drawn = draw(models.logits("draft", path_of[parent]), len(children), params, sampler, sampling)
            for child, (token, q) in zip(children, drawn):
                node_of[child] = len(tokens)
                path_of[len(tokens)] = path_of[parent] + (token,)
                tokens.append(token)
                parents.append(parent)
                probs.append(q)
    tree = TokenTree(tokens, parents, None if params.greedy else torch.stack(probs))
    target = process_logits(torch.stack([models.logits("target", path_of[n]) for n in range(-1, len(tree))]), params)
    result = speculative.verify_tree(tree, target, sampler, node_rule)
    return tuple(tokens[n] for n in result.accepted_nodes) + (result.next_token,)


def emitted_vs_target(models, shape, params, sampling, node_rule=speculative.rejection_select, draw=draw_children):
    length = shape.depth + 1
    emitted = enumerate_outcomes(lambda s: one_tree_step(models, shape, params, sampling, s, node_rule, draw))
    assert abs(sum(emitted.values()) - 1.0) < 1e-9
    assert any(len(e) > 1 for e in emitted), "the step must accept draft tokens sometimes"

    def p(path):
        return process_logits(models.logits("target", path), params).double()

    spec = {}
    for prefix, prob in emitted.items():
        for rest in itertools.product(range(models.vocab), repeat=length - len(prefix)):
            full, total = prefix, prob
            for token in rest:
                total *= float(p(full)[token])
                full = full + (token,)
            spec[full] = spec.get(full, 0.0) + total
    exact = {}
    for seq in itertools.product(range(models.vocab), repeat=length):
        total = 1.0
        for i, token in enumerate(seq):
            total *= float(p(seq[:i])[token])
        exact[seq] = total
    return max_difference(spec, exact)


TREE_SETTINGS = [
    pytest.param(dict(temperature=1.0), id="T1"),
    pytest.param(dict(temperature=0.7), id="T0.7"),
    pytest.param(dict(temperature=0.9, top_p=0.9), id="T0.9-topp0.9"),
]
TREE_CASES = [
    pytest.param("kary:2x2", 4, id="binary-depth2-V4"),
    pytest.param("widths:3,1", 4, id="3-children-depth2-V4"),
]


@pytest.mark.parametrize("sampling", ["without_replacement", "iid"])
@pytest.mark.parametrize("spec, vocab", TREE_CASES)
@pytest.mark.parametrize("setting", TREE_SETTINGS)
def test_tree_verification_is_exact(spec, vocab, setting, sampling):
    models = PathDistributions(vocab, seed=3)
    assert emitted_vs_target(models, TreeShape.parse(spec), SamplingParams(**setting), sampling) < 1e-6


def sequoia_without_removing_rejected(p, child_tokens, child_draft_probs, sampler):
    """The known mistake: children drawn without replacement, but every sibling verified against the
    original q (the rejected siblings never removed from q)."""
    original = child_draft_probs[0]
    return speculative.rejection_select(p, child_tokens, [original] * len(child_tokens), sampler)


@pytest.mark.parametrize("spec, vocab", TREE_CASES)
def test_sequoia_verifier_that_keeps_rejected_children_in_q_fails(spec, vocab):
    models = PathDistributions(vocab, seed=3)
    error = emitted_vs_target(
        models,
        TreeShape.parse(spec),
        SamplingParams(temperature=1.0),
        "without_replacement",
        node_rule=sequoia_without_removing_rejected,
    )
    assert error > 1e-3


def test_iid_rule_applied_to_children_drawn_without_replacement_fails():
    """Drawing without replacement but recording the unmodified q for every child is also caught."""
    models = PathDistributions(4, seed=3)

    def draw_wrong(logits, count, params, sampler, sampling="without_replacement"):
        drawn = draw_children(logits, count, params, sampler, "without_replacement")
        q = process_logits(logits, params)
        return [(token, q) for token, _ in drawn]

    error = emitted_vs_target(
        models, TreeShape.parse("widths:3"), SamplingParams(temperature=1.0), "without_replacement", draw=draw_wrong
    )
    assert error > 1e-3


# ---- the real proposer through the engine ----------------------------------------------------------
ENGINE_CASES = [
    pytest.param("widths:3", dict(temperature=1.0), "without_replacement", id="3-children-T1"),
    pytest.param("widths:2,1", dict(temperature=1.0, top_k=4), "without_replacement", id="2x1-topk4"),
    pytest.param("widths:2,1", dict(temperature=0.7, top_k=4), "iid", id="2x1-T0.7-topk4-iid"),
    pytest.param("kary:2x1", dict(temperature=0.8, top_p=0.9), "without_replacement", id="2-children-topp0.9"),
    pytest.param("kary:2x1", dict(temperature=0.8, top_p=0.9), "hub", id="spechub-pairs-topp0.9"),
    pytest.param("widths:2,2", dict(temperature=1.0, top_k=4), "hub", id="spechub-binary-depth2-topk4"),
    pytest.param("widths:3,1", dict(temperature=0.7, top_k=4), "hub", id="spechub-3-children-fall-back-topk4"),
]


@pytest.mark.parametrize("spec, setting, sampling", ENGINE_CASES)
def test_engine_tree_step_is_exact(tiny_target, tiny_draft, spec, setting, sampling):
    shape = TreeShape.parse(spec)
    params = SamplingParams(max_tokens=shape.depth + 1, **setting)
    engine = SpecEngine(tiny_target, DraftModelProposer(tiny_draft, 64, shape, sampling), len(shape), 64)
    vocab = tiny_target.vocab_size
    spec_dist, emitted = speculative_sequence_distribution(engine, tiny_target, PROMPT, params, shape.depth + 1, vocab)
    exact = target_sequence_distribution(tiny_target, PROMPT, shape.depth + 1, params, vocab)
    assert any(len(s) > 1 for s in emitted)
    assert max_difference(spec_dist, exact) < 1e-6


@pytest.mark.parametrize("spec", ["chain:4", "kary:2x3", "widths:4,2,1", "widths:1,3,1"])
@pytest.mark.parametrize("max_tokens", [1, 9, 40])
def test_greedy_tree_decoding_identical_to_plain(tiny_target, tiny_draft, spec, max_tokens):
    shape = TreeShape.parse(spec)
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    plain = SpecEngine(tiny_target, None, 0, 256)
    reference = plain.generate(plain.new_sequence(PROMPT, params))
    for draft in (tiny_draft, tiny_target):
        engine = SpecEngine(tiny_target, DraftModelProposer(draft, 256, shape), len(shape), 256)
        seq = engine.generate(engine.new_sequence(PROMPT, params))
        assert seq.output_ids == reference.output_ids
        if draft is tiny_target and max_tokens > 1:  # a self-draft always agrees
            assert seq.metrics.acceptance_rate > 0 and seq.metrics.rank_acceptance[0] == 1.0


def test_tree_metrics_count_ranks(tiny_target, tiny_draft):
    engine = SpecEngine(tiny_target, DraftModelProposer(tiny_draft, 256, TreeShape.parse("widths:3,1")), 6, 256)
    seq = engine.generate(engine.new_sequence(PROMPT, SamplingParams(temperature=1.0, seed=0, max_tokens=30)))
    m = seq.metrics
    assert len(m.rank_trials) == 3 and m.rank_trials[0] >= m.target_forwards
    assert sum(m.rank_accepted) == sum(m.accepted_per_step)
    assert all(0.0 <= a <= 1.0 for a in m.rank_acceptance)
    assert max(m.proposed_per_step) == 6


def test_llm_tree_method(tiny_dirs):
    llm = LLM(
        target=tiny_dirs["target"],
        draft=tiny_dirs["draft"],
        dtype="float32",
        max_model_len=128,
        speculative={"method": "tree", "tree": "kary:2x2"},
    )
    assert llm.engine.num_speculative_tokens == 6
    plain = LLM(target=tiny_dirs["target"], dtype="float32", max_model_len=128)
    params = SamplingParams(temperature=0, max_tokens=16)
    assert llm.generate(PROMPT, params)[0].token_ids == plain.generate(PROMPT, params)[0].token_ids
    with pytest.raises(ValueError, match="needs a tree"):
        LLM(target=tiny_dirs["target"], draft=tiny_dirs["draft"], speculative={"method": "tree"})
    with pytest.raises(ValueError, match="use method 'tree'"):
        LLM(
            target=tiny_dirs["target"],
            draft=tiny_dirs["draft"],
            speculative={"method": "draft_model", "tree": "chain:2"},
        )
    with pytest.raises(ValueError, match="tree_sampling"):
        LLM(
            target=tiny_dirs["target"],
            draft=tiny_dirs["draft"],
            speculative={"method": "tree", "tree": "chain:2", "tree_sampling": "sometimes"},
        )
