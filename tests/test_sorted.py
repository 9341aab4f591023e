"""Sorted drafts (S2D): the format, the layered draft cache (lazily filled KV of early-exited tokens),
and exactness of adaptive drafting: by enumeration of one engine step (a drafter that reports another
exit's q than the one it sampled from must fail), greedy identity with plain decoding, and the sampled
distribution at temperature > 0."""

import collections
import json

import pytest
import torch
from scipy.stats import chisquare
from test_engine import run, target_joint
from test_exactness import max_difference, speculative_sequence_distribution, target_sequence_distribution

from specgrove import LLM, SamplingParams
from specgrove.drafting.sorted import LayeredCache, SortedDraftProposer, confidence, sorted_proposer, sorted_spec
from specgrove.engine.engine import SpecEngine
from specgrove.models.loader import load_model
from specgrove.models.sorted import SORTED_FILE, SortedSpec, build_sorted
from specgrove.testing import make_tiny_model

from conftest import DEVICE

EXITS = [1, 2, 4]
# Confidences of this tiny draft's exits lie around 0.3-0.9: these thresholds make the exit vary with the
# context (the tests check that several exits are really used).
THRESHOLDS = [0.55, 0.45, 0.0]
PROMPT = [1, 2, 3, 1, 2]


@pytest.fixture(scope="module")
def sorted_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sorted")
    base = make_tiny_model(root / "base", "qwen2", 8, seed=1, init_scale=2.0, with_tokenizer=True, num_hidden_layers=5)
    return build_sorted(base, EXITS, root / "draft", thresholds=THRESHOLDS)


@pytest.fixture(scope="module")
def sorted_draft(sorted_dir):
    return load_model(sorted_dir, dtype="float32", device=DEVICE)


@pytest.fixture(scope="module")
def shrunk_draft(sorted_dir, tmp_path_factory):
    """The same draft with its output layer cut to 5 of the 8 tokens (q = 0 on the others)."""
    out = build_sorted(
        sorted_dir,
        EXITS,
        tmp_path_factory.mktemp("shrunk") / "draft",
        thresholds=[0.85, 0.75, 0.0],
        head_token_ids=[0, 2, 3, 5, 7],
    )  # its exits are more confident: higher thresholds
    return load_model(out, dtype="float32", device=DEVICE)


def full_logits(model, ids, depth):
    """Reference: a plain forward of the first `depth` layers over the whole sequence, last position."""
    sub = model.truncated(depth)
    return sub.forward(torch.tensor([ids]), torch.arange(len(ids))[None], sub.new_cache(1, len(ids)))[0, -1]


# ---- format --------------------------------------------------------------------------------------------
def test_build_sorted_writes_a_loadable_truncated_model(sorted_dir, sorted_draft):
    spec = SortedSpec.load(sorted_dir)
    assert spec.exits == EXITS and spec.thresholds == THRESHOLDS and spec.head_tokens is None
    assert json.loads((sorted_dir / "config.json").read_text())["num_hidden_layers"] == 4
    assert sorted_draft.model.config.num_layers == 4 and sorted_spec(sorted_draft).exits == EXITS
    assert sorted_draft.tokenizer is not None
    base = load_model(sorted_dir.parent / "base", dtype="float32", device=DEVICE)
    ids = [1, 2, 3, 4, 5]
    for depth in EXITS:  # the sub-models are the base model's first layers with its norm and head
        assert torch.allclose(
            full_logits(sorted_draft.model, ids, depth), full_logits(base.model, ids, depth), atol=1e-5
        )


def test_sorted_format_errors(sorted_dir, tmp_path):
    with pytest.raises(ValueError, match="deeper"):
        build_sorted(sorted_dir, [2, 9], tmp_path / "x")
    with pytest.raises(ValueError, match="increasing"):
        SortedSpec([4, 2], [0.5, 0.0])
    with pytest.raises(ValueError, match="one threshold per exit"):
        SortedSpec([2, 4], [0.5])
    with pytest.raises(ValueError, match="distinct"):
        build_sorted(sorted_dir, EXITS, tmp_path / "y", head_token_ids=[1, 1])
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / SORTED_FILE).write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a specgrove-sorted"):
        SortedSpec.load(tmp_path / "z")


def test_shrunk_head_gives_zero_probability_elsewhere(shrunk_draft, sorted_draft):
    ids = [1, 2, 3]
    logits = full_logits(shrunk_draft.model, ids, 4)
    kept = [0, 2, 3, 5, 7]
    assert torch.isinf(logits[[1, 4, 6]]).all() and torch.isfinite(logits[kept]).all()
    assert torch.allclose(logits[kept], full_logits(sorted_draft.model, ids, 4)[kept], atol=1e-5)
    q = torch.softmax(logits, -1)
    assert float(q[[1, 4, 6]].sum()) == 0.0


# ---- the layered cache ---------------------------------------------------------------------------------
def test_layered_cache_matches_full_forwards(sorted_draft):
    """Random exits per token, rollbacks and re-extensions: every exit's logits equal a plain forward of
    that sub-model over the whole sequence, although earlier tokens stopped at shallower layers."""
    model = sorted_draft.model
    g = torch.Generator().manual_seed(0)
    cache = LayeredCache(model, 64)
    cache.append([1, 2, 3])
    ids = [1, 2, 3]
    checked = 0
    for step in range(30):
        depth = EXITS[int(torch.randint(0, len(EXITS), (1,), generator=g))]
        h = cache.run_to(depth)
        assert torch.allclose(model.logits(h[None])[0], full_logits(model, ids, depth), atol=1e-5)
        checked += 1
        if step % 7 == 6:  # roll back some tokens, as after a rejection
            keep = max(1, len(ids) - int(torch.randint(1, 4, (1,), generator=g)))
            ids = ids[:keep]
            cache.truncate(keep - 1)
            cache.append(ids[-1:])
        else:
            token = int(torch.randint(0, 8, (1,), generator=g))
            ids.append(token)
            cache.append([token])
        assert cache.filled == sorted(cache.filled, reverse=True) and cache.depth_of(len(ids) - 1) == 0
    assert checked == 30


# ---- exactness -----------------------------------------------------------------------------------------
SETTINGS = [
    pytest.param(dict(temperature=1.0), id="T1"),
    pytest.param(dict(temperature=0.7), id="T0.7"),
    pytest.param(dict(temperature=0.9, top_p=0.8), id="T0.9-topp0.8"),
]


def step_distribution(target, proposer, params, k=2):
    engine = SpecEngine(target, proposer, k, max_model_len=64)
    spec, emitted = speculative_sequence_distribution(engine, target, PROMPT, params, k + 1, target.vocab_size)
    exact = target_sequence_distribution(target, PROMPT, k + 1, params, target.vocab_size)
    return max_difference(spec, exact), emitted


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("draft_kind", ["full_head", "shrunk_head"])
def test_adaptive_drafting_is_exact(tiny_target, sorted_draft, shrunk_draft, draft_kind, setting):
    draft = sorted_draft if draft_kind == "full_head" else shrunk_draft
    proposer = SortedDraftProposer(draft, 64)
    error, emitted = step_distribution(tiny_target, proposer, SamplingParams(max_tokens=3, **setting))
    assert len(proposer.exit_counts) >= 2, "the exit must vary for this test to mean anything"
    assert any(len(s) > 1 for s in emitted)
    assert error < 1e-6


@pytest.mark.parametrize("exit_layer", [1, 2, [1, 2]])
def test_fixed_exit_and_exit_subset_drafting_are_exact(tiny_target, sorted_draft, exit_layer):
    proposer = sorted_proposer(sorted_draft, 64, exit_layer)
    error, _ = step_distribution(tiny_target, proposer, SamplingParams(max_tokens=3, temperature=1.0))
    assert error < 1e-6


@pytest.mark.parametrize("sampling", ["without_replacement", "iid"])
def test_fixed_exit_tree_drafting_is_exact(tiny_target, sorted_draft, sampling):
    """A fixed exit drafts token trees as any draft model (Sequoia's children without replacement, or
    SpecInfer's i.i.d. children): one engine step of a 4-node tree (2 children, one child each), enumerated."""
    from specgrove.trees.shape import TreeShape

    shape = TreeShape.parse("widths:2,1")
    proposer = sorted_proposer(sorted_draft, 64, 2, shape=shape, sampling=sampling)
    engine = SpecEngine(tiny_target, proposer, len(shape), max_model_len=64)
    params = SamplingParams(max_tokens=3, temperature=0.9)
    spec, emitted = speculative_sequence_distribution(engine, tiny_target, PROMPT, params, 3, tiny_target.vocab_size)
    exact = target_sequence_distribution(tiny_target, PROMPT, 3, params, tiny_target.vocab_size)
    assert any(len(s) > 1 for s in emitted)
    assert max_difference(spec, exact) < 1e-6
    with pytest.raises(ValueError, match="adaptive sorted drafting makes chains"):
        sorted_proposer(sorted_draft, 64, None, shape=shape)


class ReportsTheLastExit(SortedDraftProposer):
    """The known trap: sample each token from the exit that was confident enough, but report the
    distribution of the deepest exit (as if the draft had run in full)."""

    def next_logits(self, cache):
        logits, used = super().next_logits(cache)
        self.reported.append(self.model.logits(cache.run_to(self.exits[-1])[None])[0])
        return logits, used

    def propose(self, seq, num_tokens):
        from specgrove.sampling import process_logits

        self.reported = []
        tree = super().propose(seq, num_tokens)
        if tree.draft_probs is not None:
            tree.draft_probs = torch.stack([process_logits(r, seq.params) for r in self.reported])
        return tree


def test_reporting_another_exits_q_fails(tiny_target, sorted_draft):
    proposer = ReportsTheLastExit(sorted_draft, 64)
    error, _ = step_distribution(tiny_target, proposer, SamplingParams(max_tokens=3, temperature=1.0))
    assert error > 1e-3


def test_greedy_identical_to_plain(tiny_target, sorted_draft):
    from specgrove.trees.shape import TreeShape

    plain = SpecEngine(tiny_target, None, 0, 256)
    tree = TreeShape.parse("widths:3,2,1")
    for exit_layer, shape in ((None, None), (1, None), (4, None), (1, tree), (4, tree)):
        engine = SpecEngine(
            tiny_target,
            sorted_proposer(sorted_draft, 256, exit_layer, shape=shape),
            4 if shape is None else len(shape),
            256,
        )
        for prompt in ([1, 2, 3, 4, 1, 2, 3], [5], [7, 7, 0, 1]):
            params = SamplingParams(temperature=0, max_tokens=40)
            assert run(engine, prompt, params).output_ids == run(plain, prompt, params).output_ids


def test_sampled_distribution_matches_target(tiny_target, sorted_draft):
    """Chi-square over 2000 seeded samples of the first two tokens (as tests/test_engine.py)."""
    samples = 2000
    prompt = [1, 2, 3, 4, 1, 2, 3]
    proposer = SortedDraftProposer(sorted_draft, 64)
    engine = SpecEngine(tiny_target, proposer, 3, 64)
    counts = collections.Counter()
    accepted = 0
    for seed in range(samples):
        seq = run(engine, prompt, SamplingParams(max_tokens=3, seed=seed, temperature=0.8))
        counts[tuple(seq.output_ids[:2])] += 1
        accepted += sum(seq.metrics.accepted_per_step)
    # this random tiny draft agrees little with the target; a few hundred accepted drafts still test the verifier
    assert accepted > samples * 0.05 and len(proposer.exit_counts) >= 2
    exact = target_joint(tiny_target, prompt, 2, SamplingParams(temperature=0.8))
    keys = sorted(k for k, p in exact.items() if p * samples >= 5)
    observed = [counts[k] for k in keys] + [samples - sum(counts[k] for k in keys)]
    expected = [exact[k] * samples for k in keys] + [samples * (1 - sum(exact[k] for k in keys))]
    expected = [e * samples / sum(expected) for e in expected]
    assert chisquare(observed, expected).pvalue > 1e-3


def test_adaptive_exit_follows_the_thresholds(tiny_target, sorted_draft):
    """Threshold 0 everywhere: every token exits first; 1 everywhere: every token runs the whole draft."""
    for thresholds, expected in (([0.0, 0.0, 0.0], 1), ([1.0, 1.0, 0.0], 4)):
        proposer = SortedDraftProposer(sorted_draft, 256, thresholds)
        run(SpecEngine(tiny_target, proposer, 3, 256), [1, 2, 3], SamplingParams(temperature=0, max_tokens=20))
        assert set(proposer.exit_counts) == {expected}
    proposer = SortedDraftProposer(sorted_draft, 256)
    cache = LayeredCache(sorted_draft.model, 16)
    cache.append(PROMPT)
    logits, used = proposer.next_logits(cache)
    first = full_logits(sorted_draft.model, PROMPT, 1)
    assert torch.allclose(logits, full_logits(sorted_draft.model, PROMPT, used), atol=1e-5)
    assert (used == 1) == (confidence(first) >= THRESHOLDS[0])
    with pytest.raises(ValueError, match="one threshold"):
        SortedDraftProposer(sorted_draft, 64, [0.5])
    with pytest.raises(ValueError, match="not one of the draft's exits"):
        sorted_proposer(sorted_draft, 64, 3)
    # Adaptive over some exits: the last of them always emits.
    proposer = sorted_proposer(sorted_draft, 256, [1, 2], thresholds=[1.0, 0.0])
    run(SpecEngine(tiny_target, proposer, 3, 256), [1, 2, 3], SamplingParams(temperature=0, max_tokens=20))
    assert set(proposer.exit_counts) == {2}
    with pytest.raises(ValueError, match="among the draft's exits"):
        sorted_proposer(sorted_draft, 64, [1, 3])


def test_thresholds_measured_for_a_target_serve_that_target(sorted_dir, tmp_path):
    """sorted.json's target_thresholds: the target named there drafts with its own, any other with the
    draft's; the factory passes the target's name."""
    import shutil

    from specgrove.api import LLM

    own = tmp_path / "draft"
    shutil.copytree(sorted_dir, own)
    spec = SortedSpec.load(own)
    spec.target_thresholds = {"tiny-target": [1.0, 1.0, 0.0]}
    spec.save(own)
    assert SortedSpec.load(own).thresholds_for("tiny-target") == [1.0, 1.0, 0.0]
    assert SortedSpec.load(own).thresholds_for("another") == THRESHOLDS == SortedSpec.load(own).thresholds_for(None)
    draft = load_model(own, dtype="float32", device=DEVICE)
    assert SortedDraftProposer(draft, 64, target="tiny-target").thresholds == [1.0, 1.0, 0.0]
    assert SortedDraftProposer(draft, 64, target="another").thresholds == THRESHOLDS
    assert SortedDraftProposer(draft, 64, [0.5, 0.5, 0.0], target="tiny-target").thresholds == [0.5, 0.5, 0.0]
    llm = LLM(target=own, draft=draft, speculative={"method": "sorted"}, dtype="float32", max_num_seqs=1)
    assert llm.engine.proposer.thresholds == THRESHOLDS  # this target's name is not listed
    spec.target_thresholds = {llm.target.name: [1.0, 1.0, 0.0]}  # now it is
    spec.save(own)
    llm = LLM(target=own, draft=load_model(own, dtype="float32"), speculative={"method": "sorted"}, max_num_seqs=1)
    assert llm.engine.proposer.thresholds == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="one threshold in"):
        SortedSpec([1, 2], [0.5, 0.0], target_thresholds={"t": [0.5]})


def test_llm_api_method_sorted(tiny_dirs, sorted_dir, sorted_draft):
    target = tiny_dirs["target"]
    reference = LLM(target=target, dtype="float32", device=DEVICE).generate(
        [[1, 2, 3]], SamplingParams(temperature=0, max_tokens=12)
    )
    adaptive = LLM(
        target=target,
        draft=sorted_dir,
        dtype="float32",
        device=DEVICE,
        speculative={"method": "sorted", "num_speculative_tokens": 3},
    )
    fixed = LLM(
        target=target,
        draft=sorted_draft,
        dtype="float32",
        device=DEVICE,  # an already loaded draft, shared
        speculative={"method": "sorted", "num_speculative_tokens": 3, "sorted_exit": 2},
    )
    tree = LLM(
        target=target,
        draft=sorted_draft,
        dtype="float32",
        device=DEVICE,
        speculative={"method": "sorted", "sorted_exit": 1, "tree": "widths:3,1"},
    )
    assert tree.speculative.num_speculative_tokens == 6  # 3 children of the root, one child each
    for llm in (adaptive, fixed, tree):
        out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=12))[0]
        assert out.token_ids == reference[0].token_ids and sum(out.metrics.proposed_per_step) > 0
    assert (
        max(tree.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=12))[0].metrics.proposed_per_step) == 6
    )
    assert fixed.draft is sorted_draft
    with pytest.raises(ValueError, match="options of method 'sorted'"):
        LLM(target=target, speculative={"method": "draft_model", "sorted_exit": 2})
    with pytest.raises(ValueError, match="one fixed exit"):
        LLM(target=target, speculative={"method": "sorted", "tree": "widths:2"})
    with pytest.raises(ValueError, match="'auto' is tuned for a draft model"):
        LLM(target=target, speculative={"method": "sorted", "sorted_exit": 1, "tree": "auto"})


# ---- the benchmark: sorted methods, several targets sharing one draft -----------------------------------
def test_bench_sorted_methods(tiny_dirs, sorted_draft):
    from specgrove.bench.spec_bench import BenchConfig, print_report, run_bench

    config = BenchConfig(
        tiny_dirs["target"],
        prompts=[[1, 2, 3, 4, 1, 2, 3], [5, 6, 7]],
        methods=["plain", "sorted", "sorted@1", "sorted@4", "sorted@1+2", "sorted@2:widths:3,1"],
        max_new_tokens=16,
        dtype="float32",
        device=DEVICE,
        measure_bandwidth=False,
        sorted_draft=sorted_draft,
    )
    result = run_bench(config, progress=False, log=lambda m: None)
    figures = result["methods"]
    for method in ("sorted", "sorted@1", "sorted@4", "sorted@1+2", "sorted@2:widths:3,1"):
        assert figures[method]["identical_to_baseline"] is True and figures[method]["mean_accept_length"] >= 1.0
    assert figures["sorted@2:widths:3,1"]["tree"]["num_nodes"] == 6
    assert figures["sorted@2:widths:3,1"]["predicted_accept_length"] is None
    counts = figures["sorted"]["exit_counts"]
    assert set(counts) <= {"1", "2", "4"} and sum(counts.values()) > 0 and "exit_counts" not in figures["sorted@1"]
    assert set(figures["sorted@1+2"]["exit_counts"]) <= {"1", "2"}
    assert result["config"]["sorted_draft"] == str(sorted_draft.path)
    print_report(result)
    with pytest.raises(ValueError, match="sorted draft"):
        run_bench(BenchConfig(tiny_dirs["target"], prompts=[[1, 2]], methods=["sorted"], measure_bandwidth=False))
    with pytest.raises(ValueError, match="unknown method"):
        run_bench(BenchConfig(tiny_dirs["target"], prompts=[[1, 2]], methods=["sorted@x"], measure_bandwidth=False))
    with pytest.raises(ValueError, match="unknown method"):  # a tree is drafted by one fixed exit
        run_bench(
            BenchConfig(tiny_dirs["target"], prompts=[[1, 2]], methods=["sorted@1+2:widths:2"], measure_bandwidth=False)
        )
    with pytest.raises(ValueError, match="bad tree spec"):
        run_bench(
            BenchConfig(tiny_dirs["target"], prompts=[[1, 2]], methods=["sorted@1:widths:x"], measure_bandwidth=False)
        )


def test_bench_cli_several_targets_share_one_sorted_draft(tiny_dirs, sorted_dir, monkeypatch, capsys, tmp_path):
    import specgrove.bench.spec_bench as spec_bench
    from specgrove.cli import main
    from specgrove.models import defaults

    calls = []

    def fake_run_bench(config, **kwargs):
        target = config.target
        calls.append((target, config.methods, config.sorted_draft))
        return {
            "config": {
                "num_prompts": 0,
                "target": target,
                "dtype": "float32",
                "device": "cpu",
                "num_speculative_tokens": 4,
                "max_new_tokens": 1,
                "temperature": 0,
                "warmup": 0,
                "categories": [],
                "wall_time_s": 0.0,
            },
            "machine": {},
            "methods": {},
        }

    monkeypatch.setattr(spec_bench, "run_bench", fake_run_bench)
    out = tmp_path / "r.json"
    code = main(
        [
            "bench",
            "--targets",
            f"{tiny_dirs['target']},{defaults.DEFAULT_DRAFT}",
            "--sorted-draft",
            str(sorted_dir),
            "--methods",
            "plain,sorted,draft_model",
            "--dtype",
            "float32",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    assert [c[0] for c in calls] == [str(tiny_dirs["target"]), defaults.DEFAULT_DRAFT]
    assert calls[0][1] == ["plain", "sorted", "draft_model"]
    assert calls[1][1] == ["plain", "sorted"]  # the default draft as target: no draft_model against itself
    assert calls[0][2] is calls[1][2] and calls[0][2].path == sorted_dir  # loaded once
    assert set(json.loads(out.read_text())["targets"]) == {str(tiny_dirs["target"]), defaults.DEFAULT_DRAFT}


def test_greedy_with_penalties_identical_to_plain(tiny_target, sorted_draft):
    """Adaptive (chain) and fixed-exit drafts penalise each node for its path: plain greedy output under the
    same penalties."""
    from specgrove.trees.shape import TreeShape

    plain = SpecEngine(tiny_target, None, 0, 256)
    params = SamplingParams(temperature=0, max_tokens=30, repetition_penalty=1.3, presence_penalty=0.5)
    for exit_layer, shape in ((None, None), (1, TreeShape.parse("widths:3,2,1"))):
        engine = SpecEngine(
            tiny_target,
            sorted_proposer(sorted_draft, 256, exit_layer, shape=shape),
            4 if shape is None else len(shape),
            256,
        )
        for prompt in ([1, 2, 3, 4, 1, 2, 3], [7, 7, 0, 1]):
            assert run(engine, prompt, params).output_ids == run(plain, prompt, params).output_ids
