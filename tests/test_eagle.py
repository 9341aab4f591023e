"""The feature-level draft head (EAGLE family): the trained module is the head that runs, every tree it drafts
is exact by enumeration (with deliberately wrong variants that must fail), greedy output is plain greedy output,
and heads that do not fit their target are refused."""

import pytest
import torch
from test_exactness import (
    max_difference,
    speculative_sequence_distribution,
    target_conditionals,
    target_sequence_distribution,
)

from specgrove.config import method_name, parse_method
from specgrove.drafting import draft_model as draft_model_drafting
from specgrove.drafting import eagle as eagle_drafting
from specgrove.drafting.eagle import EagleProposer
from specgrove.drafting.prompt_lookup import PromptLookupProposer
from specgrove.engine.engine import SpecEngine
from specgrove.errors import SpecgroveError
from specgrove.models.eagle import EagleHeadError, load_eagle_head, read_head, save_head
from specgrove.models.loader import load_model
from specgrove.sampling import Sampler, SamplingParams
from specgrove.train.eagle_model import head_config, new_train_head
from specgrove.trees.dynamic import DynamicTree
from specgrove.trees.sequoia import parse_tree

PROMPT = [1, 2, 3, 1, 2]  # prompt lookup finds "1 2" earlier and proposes [3, 1, ...]
SETTINGS = [
    pytest.param(dict(temperature=1.0), id="T1"),
    pytest.param(dict(temperature=0.7), id="T0.7"),
    pytest.param(dict(temperature=0.8, top_p=0.7), id="topp0.7"),
]
# name -> (tree spec, tokens the step may emit at most)
TREES = {
    "chain": (None, 3),
    "static": ("widths:2,1", 3),
    "dynamic": ("dynamic:4,2,2", 3),
    "mixed": ("mixed:4,2,2", 3),
}


@pytest.fixture(scope="session")
def head_dir(tiny_target, tmp_path_factory):
    config = head_config(tiny_target, intermediate_size=48, feature_layers=[0, -1])
    module = new_train_head(tiny_target, config, init_std=0.4, seed=3)
    return save_head(tmp_path_factory.mktemp("eagle") / "head", config, module.export_weights())


@pytest.fixture(scope="session")
def head(head_dir, tiny_target):
    return load_eagle_head(head_dir, tiny_target)


def make_engine(head, tree, k=2, sampling="without_replacement"):
    shape = None if tree is None else DynamicTree.parse(tree) if tree.split(":")[0] in ("dynamic", "mixed") else None
    if tree is not None and shape is None:
        shape = parse_tree(tree)
    size = k if tree is None else shape.nodes if isinstance(shape, DynamicTree) else len(shape)
    proposer = EagleProposer(head, 64, shape, sampling, PromptLookupProposer(1, 2))
    return SpecEngine(head.target, proposer, size, max_model_len=64)


def test_trained_module_is_the_head_that_runs(tiny_target, head_dir, head):
    """Training-time test's steps 1..3 (EagleTrainHead.steps) equal the run-time head drafting three deep after
    each anchor: step 1 over committed pairs with the target's features, then its own outputs fed back."""
    config, weights = read_head(head_dir)
    module = new_train_head(tiny_target, config)
    module.load_weights(weights)
    tokens = torch.tensor([1, 2, 3, 1, 2, 5, 6, 0, 4, 2, 7, 3])
    cache = tiny_target.model.new_cache(1, 32)
    _, feats = tiny_target.model.forward(
        tokens[None], torch.arange(len(tokens))[None], cache, features=config.feature_layers
    )
    with torch.no_grad():
        steps = module.steps(tokens, feats[0], 3)
    assert [s.shape[0] for s in steps] == [11, 10, 9]
    with torch.no_grad():  # later steps from anchor 4 on only: the same rows
        late = module.steps(tokens, feats[0, :-1], 3, first_anchor=4)
    torch.testing.assert_close(late[0], steps[0])
    for j in (1, 2):
        torch.testing.assert_close(late[j], steps[j][4:], atol=1e-5, rtol=1e-5)
    for anchor in (0, 4, 8):
        hc = head.new_cache(1, 32)
        logits, hidden = head.forward(
            tokens[None, 1 : anchor + 2],
            feats[:, : anchor + 1],
            torch.arange(1, anchor + 2)[None],
            hc,
            from_target=True,
        )
        hc.commit(0)
        torch.testing.assert_close(hidden[0], steps[0][: anchor + 1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logits[0], module.logits(steps[0][: anchor + 1]), atol=1e-4, rtol=1e-4)
        h = hidden[:, -1:]
        for depth in (1, 2):
            logits, h = head.forward(
                tokens[None, anchor + depth + 1 : anchor + depth + 2],
                h,
                torch.tensor([[anchor + depth + 1]]),
                hc,
                from_target=False,
                tree_mask=torch.ones(1, 1, depth, dtype=torch.bool),
                extend=True,
            )
            torch.testing.assert_close(h[0, 0], steps[depth][anchor], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(logits[0, 0], module.logits(steps[depth][anchor]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tree", list(TREES))
@pytest.mark.parametrize("setting", SETTINGS)
def test_one_step_distribution_is_exact(tree, setting, tiny_target, head):
    spec, length = TREES[tree]
    params = SamplingParams(max_tokens=length, **setting)
    engine = make_engine(head, spec)
    vocab = tiny_target.vocab_size
    dist, emitted = speculative_sequence_distribution(engine, tiny_target, PROMPT, params, length, vocab)
    exact = target_sequence_distribution(tiny_target, PROMPT, length, params, vocab)
    assert abs(sum(emitted.values()) - 1.0) < 1e-9
    # The step really speculates: some outcome emits more than one token, unless no root child the head can
    # propose lies in the target's support under this top-p.
    assert any(len(s) > 1 for s in emitted) == acceptance_possible(engine, tiny_target, params), "vacuous test"
    assert max_difference(dist, exact) < 1e-6


@pytest.mark.parametrize("setting", SETTINGS[:2])
def test_spechub_pairs_from_the_head_are_exact(setting, tiny_target, head):
    """SpecHub's hub pairs drawn from the head's q (tree_sampling 'hub') and verified by SpecHub's rule."""
    params = SamplingParams(max_tokens=3, **setting)
    engine = make_engine(head, "widths:2,1", sampling="hub")
    vocab = tiny_target.vocab_size
    dist, emitted = speculative_sequence_distribution(engine, tiny_target, PROMPT, params, 3, vocab)
    exact = target_sequence_distribution(tiny_target, PROMPT, 3, params, vocab)
    assert any(len(s) > 1 for s in emitted)
    assert max_difference(dist, exact) < 1e-6


def acceptance_possible(engine, target, params) -> bool:
    p_root = target_conditionals(target, PROMPT, (), params)[0]
    seq = engine.new_sequence(PROMPT, params, sampler=Sampler(0))
    engine.prefill(seq)
    tree = engine.proposer.propose(seq, engine.draft_lengths([seq])[0])
    engine.finish(seq)
    first = tree.children(-1)[0]
    if tree.draft_probs is None:  # deterministic: these root children, whatever the draws
        return any(float(p_root[tree.tokens[c]]) > 0 for c in tree.children(-1))
    return bool(((p_root > 0) & (tree.draft_probs[first] > 0)).any())  # the first child's q: the head's at the root


def test_the_mixed_tree_holds_the_lookup_branch(head):
    engine = make_engine(head, "mixed:4,2,2")
    seq = engine.new_sequence(PROMPT, SamplingParams(temperature=0, max_tokens=3))
    engine.prefill(seq)
    tree = engine.proposer.propose(seq, 4)
    assert len(tree) == 4 and tree.draft_probs is None
    root_children = {tree.tokens[c]: c for c in tree.children(-1)}
    assert 3 in root_children and [tree.tokens[c] for c in tree.children(root_children[3])][:1] == [1]
    engine.finish(seq)


def wrong_q_from_the_root(monkeypatch):
    """A static tree whose nodes all report the q of the first node (the head's q at the root): the wrong node's
    q for the second sibling (drawn without the first) and for every node of depth 2."""
    original = draft_model_drafting._Draft.tree

    def tree(self, greedy):
        t = original(self, greedy)
        if t.draft_probs is not None:
            t.draft_probs = t.draft_probs[:1].expand(len(t), -1).clone()
        return t

    monkeypatch.setattr(draft_model_drafting._Draft, "tree", tree)


def dynamic_tree_verified_as_sampled(monkeypatch):
    """A dynamic tree whose nodes claim to be drawn from the head's q at their parent."""

    def tree(self, greedy):
        ranked = self.chosen()
        index = {c: i for i, c in enumerate(ranked)}
        parents = [-1 if self.candidates[c][1] < 0 else index[self.candidates[c][1]] for c in ranked]
        qs = torch.stack([torch.softmax(self.logits_of[self.written_of[self.candidates[c][1]]], -1) for c in ranked])
        return eagle_drafting.TokenTree([self.candidates[c][0] for c in ranked], parents, None if greedy else qs)

    monkeypatch.setattr(eagle_drafting._DynamicDraft, "tree", tree)


@pytest.mark.parametrize(
    "tree, wrong", [("static", wrong_q_from_the_root), ("dynamic", dynamic_tree_verified_as_sampled)]
)
def test_wrong_variants_fail_the_enumeration(tree, wrong, tiny_target, head, monkeypatch):
    spec, length = TREES[tree]
    params = SamplingParams(max_tokens=length, temperature=1.0)
    wrong(monkeypatch)
    engine = make_engine(head, spec)
    vocab = tiny_target.vocab_size
    dist, _ = speculative_sequence_distribution(engine, tiny_target, PROMPT, params, length, vocab)
    exact = target_sequence_distribution(tiny_target, PROMPT, length, params, vocab)
    assert max_difference(dist, exact) > 1e-3


@pytest.mark.parametrize("tree", [None, "kary:2x2", "dynamic:6,3,2", "mixed:8,4,2"])
def test_greedy_output_is_plain_greedy_output(tree, tiny_target, head):
    params = SamplingParams(temperature=0, max_tokens=30)
    plain = SpecEngine(tiny_target, None, 0, 64)
    expected = plain.generate(plain.new_sequence(PROMPT, params)).output_ids
    engine = make_engine(head, tree, k=3)
    seq = engine.generate(engine.new_sequence(PROMPT, params))
    assert seq.output_ids == expected
    assert seq.metrics.draft_forwards > 0
    # batched: two sequences stepped together draft in one head forward per level and match alone
    other = [4, 5, 6, 4, 5, 7]
    seqs = [engine.new_sequence(PROMPT, params), engine.new_sequence(other, params)]
    for s in seqs:
        engine.prefill(s)
    while not all(s.finished for s in seqs):
        engine.step_batch([s for s in seqs if not s.finished])
    alone = plain.generate(plain.new_sequence(other, params)).output_ids
    assert [s.output_ids for s in seqs] == [expected, alone]
    for s in seqs:
        engine.finish(s)


def test_the_method_language_spells_eagle():
    assert parse_method("eagle").method == "eagle"
    dyn = parse_method("eagle:dynamic:12,5,4")
    assert (dyn.tree, dyn.num_speculative_tokens, method_name(dyn)) == ("dynamic:12,5,4", 12, "eagle:dynamic:12,5,4")
    assert parse_method("eagle:mixed:8").num_speculative_tokens == 8
    assert parse_method("eagle:kary:2x2").num_speculative_tokens == 6
    assert DynamicTree.parse("mixed:8") == DynamicTree(8, 6, 4, 4)
    assert parse_method("eagle:auto").tree == "auto"  # Sequoia's tree for the head (tune)
    for bad in ("eagle:dynamic:", "eagle:dynamic:4,2", "eagle:"):
        with pytest.raises(ValueError):
            parse_method(bad)
    with pytest.raises(ValueError, match="eagle_head"):
        parse_method("draft_model", eagle_head="/x")


def test_a_missing_or_foreign_head_is_refused_clearly(tiny_target, tiny_dirs, head_dir, tmp_path):
    from specgrove.api import LLM

    with pytest.raises(SpecgroveError, match="train-eagle.*minutes"):
        LLM(tiny_dirs["target"], speculative={"method": "eagle", "eagle_head": str(tmp_path / "none")})
    other = load_model(tiny_dirs["draft"], dtype="float32")
    with pytest.raises(EagleHeadError, match="trained for another target"):
        load_eagle_head(head_dir, other)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"format": "something-else"}')
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"")
    with pytest.raises(EagleHeadError, match="not a draft head config"):
        load_eagle_head(tmp_path / "bad", tiny_target)


def test_eagle_auto_tree_is_tuned_for_the_head(tiny_dirs, tiny_target, head_dir, monkeypatch, tmp_path):
    """tune measures the head's own acceptance vector (teacher forced over the target's features) and profiles
    its forward; eagle:auto reads the tree it chose from the cache and decodes as the plain target does."""
    from specgrove.api import LLM
    from specgrove.trees.sequoia import load_tree_file
    from specgrove.tuning import TextSample, auto_tree_path, head_teacher_forced_logits, tune, write_tree_file

    monkeypatch.setenv("SPECGROVE_CACHE", str(tmp_path))
    params = SamplingParams(temperature=0, max_tokens=12)
    head = load_eagle_head(head_dir, tiny_target)
    # the measured q of an output token is the head's root distribution when drafting it
    ids = [1, 2, 3, 1, 2, 6, 0, 4]
    measured = head_teacher_forced_logits(tiny_target, head, TextSample(ids[:5], ids[5:]))
    engine = make_engine(head, None)
    for m in (5, 7):
        seq = engine.new_sequence(ids[:m], params)
        engine.prefill(seq)
        engine.proposer.propose(seq, 1)
        torch.testing.assert_close(seq.proposer_state["eagle"]["root"][0], measured[m - 5], atol=1e-4, rtol=1e-4)
        engine.finish(seq)
    prompts = [[1, 2, 3, 1, 2], [4, 5, 6, 4], [7, 1, 7, 2, 7]]
    result = tune(tiny_target, head, params, prompts=prompts, max_new_tokens=10, budgets=[1, 2, 4], repeats=1)
    assert result["tune"]["draft"] == str(head_dir.resolve()) and sum(result["acceptance"]["values"]) > 0
    path = write_tree_file(result, auto_tree_path(tiny_target, head, params))
    speculative = {"method": "eagle", "tree": "auto", "eagle_head": str(head_dir)}
    llm = LLM(tiny_dirs["target"], dtype="float32", speculative=speculative, max_model_len=96)
    shape, _ = load_tree_file(path)
    assert llm.engine.proposer.shape_for(8, params) == shape  # the tuned tree, read from the cache
    plain = LLM(tiny_dirs["target"], dtype="float32", max_model_len=96)
    got = llm.generate([1, 2, 3, 1, 2], params)[0].outputs[0].token_ids
    assert got == plain.generate([1, 2, 3, 1, 2], params)[0].outputs[0].token_ids


def test_bench_runs_every_eagle_tree(tiny_dirs, head_dir):
    from specgrove.bench.spec_bench import BenchConfig, run_bench

    methods = ["plain", "eagle", "eagle:widths:2,1", "eagle:dynamic:4,2,2", "eagle:mixed:4,2,2"]
    config = BenchConfig(
        tiny_dirs["target"],
        None,
        methods=methods,
        prompts=[[1, 2, 3, 1, 2], [4, 5, 6, 4, 5, 6]],
        max_new_tokens=12,
        dtype="float32",
        measure_bandwidth=False,
        warmup=0,
        eagle_head=head_dir,
    )
    result = run_bench(config)
    for method in methods[1:]:
        run = result["methods"][method]
        assert run["identical_count"] == 2, method  # greedy: the plain target's tokens
        assert run["mean_accept_length"] >= 1.0


@pytest.mark.parametrize("tree", [None, "dynamic:6,3,2"])
def test_greedy_with_penalties_is_plain_greedy_with_penalties(tree, tiny_target, head):
    """The head's nodes (a chain, EAGLE-2's ranking) are penalised for their own path; the output is the
    target's greedy output under the same penalties."""
    params = SamplingParams(temperature=0, max_tokens=30, repetition_penalty=1.3, frequency_penalty=0.4)
    plain = SpecEngine(tiny_target, None, 0, 64)
    for prompt in (PROMPT, [4, 5, 6, 4, 5, 7]):
        expected = plain.generate(plain.new_sequence(prompt, params)).output_ids
        engine = make_engine(head, tree, k=3)
        assert engine.generate(engine.new_sequence(prompt, params)).output_ids == expected


def test_the_target_fingerprint_is_the_same_in_fp32_and_bf16(tiny_target):
    """A head trained with the target in bf16 (dtype auto on an AVX-512 BF16 CPU) serves it in fp32 and back: the
    fingerprint rounds the values it reads to bf16. Heads saved with the unrounded digest are still accepted."""
    from types import SimpleNamespace

    from specgrove.models.eagle import check_binding, target_fingerprint

    model = tiny_target.model
    layers = [
        SimpleNamespace(input_norm=layer.input_norm.bfloat16(), post_norm=layer.post_norm.bfloat16())
        for layer in model.layers
    ]
    in_bf16 = SimpleNamespace(
        model=SimpleNamespace(
            config=model.config, norm=model.norm.bfloat16(), layers=layers, embed=model.embed.bfloat16()
        )
    )
    assert target_fingerprint(in_bf16) == target_fingerprint(tiny_target)
    legacy = target_fingerprint(tiny_target, legacy=True)
    assert legacy != target_fingerprint(tiny_target)  # the tiny target's fp32 values are not bf16 values
    config = head_config(tiny_target, intermediate_size=16, feature_layers=[0, -1])
    config.target["fingerprint"] = legacy
    check_binding(config, tiny_target, "a head saved before the rounding")  # accepted
    config.target["fingerprint"] = "0" * 32
    with pytest.raises(EagleHeadError, match="another target"):
        check_binding(config, tiny_target, "another target's head")
