"""Multi-draft verification (SpecHub): exactness of SpecHub's verifier by exact enumeration (a wrong
variant must fail), the exact one-step acceptance helpers against enumeration of the real rules, and
the optimal-transport (OTM) bound: the compact LP against the full one, and every method below its
bound. Ordering between methods is a property only where it is provable (see the tests' comments)."""

import itertools

import pytest
import torch
from test_trees import PathDistributions, emitted_vs_target

from specgrove.drafting.draft_model import draw_children
from specgrove.sampling import SamplingParams
from specgrove.trees.shape import TreeShape
from specgrove.verify import multidraft, speculative
from specgrove.verify.enumerate import enumerate_outcomes

SETTINGS = [
    pytest.param(dict(temperature=1.0), id="T1"),
    pytest.param(dict(temperature=0.7), id="T0.7"),
    pytest.param(dict(temperature=0.9, top_p=0.9), id="T0.9-topp0.9"),
]
RULES = {
    "rrs": speculative.rejection_select,
    "rrs_wo": speculative.rejection_select,
    "spechub": multidraft.spechub_select,
}
SAMPLING = {"rrs": "iid", "rrs_wo": "without_replacement", "spechub": "hub"}


def random_pair(vocab: int, seed: int, sharp: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(vocab, generator=g, dtype=torch.float64) * sharp, -1)
    q = torch.softmax(torch.randn(vocab, generator=g, dtype=torch.float64) * sharp, -1)
    return p, q


# ---- SpecHub's draft and verifier are exact ------------------------------------------------------------
@pytest.mark.parametrize("spec, vocab", [("kary:2x2", 4), ("kary:2x2", 5), ("widths:2,1", 6)])
@pytest.mark.parametrize("setting", SETTINGS)
def test_spechub_verification_is_exact(spec, vocab, setting):
    models = PathDistributions(vocab, seed=5)
    error = emitted_vs_target(
        models, TreeShape.parse(spec), SamplingParams(**setting), "hub", multidraft.spechub_select
    )
    assert error < 1e-6


def test_hub_sampling_falls_back_at_nodes_without_two_children():
    """Three children: drawn without replacement and verified by RRS w/o; one child: standard."""
    models = PathDistributions(4, seed=7)
    assert (
        emitted_vs_target(
            models, TreeShape.parse("widths:3,1"), SamplingParams(temperature=1.0), "hub", multidraft.spechub_select
        )
        < 1e-6
    )


def spechub_with_conditional_q(p, child_tokens, child_draft_probs, sampler):
    """A plausible mistake: for the pair (hub, i), weigh i by the conditional q(i | != hub) it was
    drawn from instead of its joint probability Q(hub, i) (and leave the rest of the rule as is)."""
    q = child_draft_probs[0]
    plan = multidraft.hub_plan(p, q)
    if child_tokens[0] == plan.hub:
        other = child_tokens[1]
        if sampler.bernoulli(min(1.0, float(plan.second[other]) / float(child_draft_probs[1][other]))):
            return 1, p
        if sampler.bernoulli(plan.hub_accept):
            return 0, p
        return None, plan.residual / plan.residual.sum()
    return multidraft.spechub_select(p, child_tokens, child_draft_probs, sampler)


def test_wrong_spechub_verifier_fails():
    models = PathDistributions(4, seed=5)
    error = emitted_vs_target(
        models, TreeShape.parse("kary:2x2"), SamplingParams(temperature=1.0), "hub", spechub_with_conditional_q
    )
    assert error > 1e-3


def test_spechub_rule_refuses_pairs_it_did_not_draw():
    p, q = random_pair(6, 0)
    hub = multidraft.hub_of(q)
    others = [t for t in range(6) if t != hub]
    rest = multidraft._without(q, others[0])  # a without-replacement pair (x1, x2), neither the hub
    with pytest.raises(ValueError, match="SpecHub pair"):
        multidraft.spechub_select(p.float(), [others[0], others[1]], [q.float(), rest.float()], None)


def test_hub_pair_draw_law():
    """The pairs come with SpecHub's joint probabilities; a point-mass q gives a single child."""
    _, q = random_pair(5, 3)
    joint = multidraft.hub_joint(q)
    drawn = enumerate_outcomes(lambda s: tuple(t for t, _ in multidraft.draw_hub_pair(q, s)))
    assert sum(drawn.values()) == pytest.approx(1.0)
    for (a, b), prob in drawn.items():
        assert prob == pytest.approx(float(joint[a, b]), abs=1e-12)
    assert float(joint.sum()) == pytest.approx(1.0) and float(joint.sum(1).sub(q).abs().max()) < 1e-12  # x1 ~ q
    point = torch.zeros(5, dtype=torch.float64)
    point[2] = 1.0
    assert enumerate_outcomes(lambda s: tuple(t for t, _ in multidraft.draw_hub_pair(point, s))) == {(2,): 1.0}


# ---- exact acceptance helpers = the real draw + rule, enumerated -----------------------------------------
def enumerated_acceptance(p, q, method, k=2):
    params = SamplingParams(temperature=1.0)
    logits = q.log()

    def step(sampler):
        drawn = draw_children(logits, k, params, sampler, SAMPLING[method])
        chosen, _ = RULES[method](p, [t for t, _ in drawn], [d for _, d in drawn], sampler)
        return chosen is not None

    return enumerate_outcomes(step).get(True, 0.0)


@pytest.mark.parametrize("method", multidraft.METHODS)
@pytest.mark.parametrize("seed", range(4))
def test_acceptance_probability_matches_enumeration(method, seed):
    p, q = random_pair(5, seed)
    exact = multidraft.acceptance_probability(p, q, method)
    assert exact == pytest.approx(enumerated_acceptance(p, q, method), abs=1e-6)  # the draw runs in float32
    assert multidraft.acceptance_probability(p, q, method, k=1) == pytest.approx(float(torch.minimum(p, q).sum()))


def test_rrs_acceptance_with_three_drafts_matches_enumeration():
    p, q = random_pair(4, 11)
    assert multidraft.acceptance_probability(p, q, "rrs", k=3) == pytest.approx(
        enumerated_acceptance(p, q, "rrs", k=3), abs=1e-6
    )
    with pytest.raises(ValueError, match="k <= 2"):
        multidraft.acceptance_probability(p, q, "spechub", k=3)
    with pytest.raises(ValueError, match="unknown"):
        multidraft.acceptance_probability(p, q, "best")


# ---- the OTM bound -------------------------------------------------------------------------------------
def full_otm(p: torch.Tensor, joint: torch.Tensor) -> float:
    """The textbook LP: a coupling pi(x1, x2, y) with both marginals, |V|^3 variables."""
    import numpy as np
    from scipy.optimize import linprog

    vocab = len(p)
    cells = list(itertools.product(range(vocab), repeat=3))
    gain = np.array([-1.0 if y in (a, b) else 0.0 for a, b, y in cells])
    a_eq, b_eq = [], []
    for a, b in itertools.product(range(vocab), repeat=2):
        a_eq.append([1.0 if (c[0], c[1]) == (a, b) else 0.0 for c in cells])
        b_eq.append(float(joint[a, b]))
    for y in range(vocab):
        a_eq.append([1.0 if c[2] == y else 0.0 for c in cells])
        b_eq.append(float(p[y]))
    result = linprog(gain, A_eq=np.array(a_eq), b_eq=np.array(b_eq), bounds=(0, None), method="highs")
    assert result.status == 0
    return float(-result.fun)


@pytest.mark.parametrize("method", multidraft.METHODS)
@pytest.mark.parametrize("seed", range(3))
def test_compact_otm_equals_full_lp(method, seed):
    p, q = random_pair(4, 20 + seed)
    joint = multidraft.joint_draft_distribution(q, method)
    assert multidraft.otm_bound(p, joint) == pytest.approx(full_otm(p, joint), abs=1e-7)


@pytest.mark.parametrize("vocab, sharp", [(5, 1.0), (12, 2.0), (30, 3.0)])
def test_every_method_is_below_its_otm_bound(vocab, sharp):
    for seed in range(15):
        p, q = random_pair(vocab, 100 * vocab + seed, sharp)
        single = float(torch.minimum(p, q).sum())
        for method in multidraft.METHODS:
            accept = multidraft.acceptance_probability(p, q, method)
            bound = multidraft.otm_bound(p, multidraft.joint_draft_distribution(q, method))
            assert accept <= bound + 1e-7
            # provable: every method's first draft is distributed as q and verified as in standard
            # speculative sampling, so a second draft can only add acceptance
            assert accept >= single - 1e-9
            if method == "spechub":  # the closed-form coupling is optimal for the hub distribution
                assert accept == pytest.approx(bound, abs=1e-7)


def test_spechub_dominates_both_rrs_where_tv_is_at_most_the_hub_probability():
    """A provable ordering (derived in multidraft.spechub_dominates): when TV(p, q) <= q(hub), SpecHub's
    one-step acceptance is at least that of RRS and of RRS without replacement; for RRS alone
    TV <= q(hub) / (1 - q(hub)) suffices. Outside the condition the ordering really can fail (RRS w/o
    wins on some pairs), so the condition is not vacuous."""
    held = rrs_only = outside_losses = 0
    g = torch.Generator().manual_seed(11)
    for _ in range(400):
        vocab = int(torch.randint(3, 20, (1,), generator=g))
        sharp = 4.0 * float(torch.rand(1, generator=g))
        p = torch.softmax(torch.randn(vocab, generator=g, dtype=torch.float64) * sharp, -1)
        q = torch.softmax(torch.randn(vocab, generator=g, dtype=torch.float64) * sharp, -1)
        hub, tv = float(q.max()), 0.5 * float((p - q).abs().sum())
        accept = {m: multidraft.acceptance_probability(p, q, m) for m in multidraft.METHODS}
        if multidraft.spechub_dominates(p, q):
            held += 1
            assert tv <= hub + 1e-12
            assert accept["spechub"] >= max(accept["rrs"], accept["rrs_wo"]) - 1e-12
        elif accept["spechub"] < accept["rrs_wo"] - 1e-9:
            outside_losses += 1
        if tv <= hub / (1.0 - hub):
            rrs_only += 1
            assert accept["spechub"] >= accept["rrs"] - 1e-12
    assert held >= 50 and rrs_only > held and outside_losses >= 10


def test_otm_bound_rejects_an_unsolvable_input():
    p = torch.tensor([0.5, 0.5], dtype=torch.float64)
    assert multidraft.otm_bound(p, torch.zeros(2, 2, dtype=torch.float64)) == 0.0
    with pytest.raises(ValueError, match="unknown"):
        multidraft.joint_draft_distribution(p, "psychic")


def test_verifiers_on_degenerate_distributions():
    """p = q: everything is accepted; disjoint supports: nothing, and no NaN in the residual."""
    p, _ = random_pair(6, 1)
    for method in multidraft.METHODS:
        assert multidraft.acceptance_probability(p, p, method) == pytest.approx(1.0)
    q = torch.tensor([0.0, 0.0, 0.0, 0.5, 0.3, 0.2], dtype=torch.float64)
    p = torch.tensor([0.6, 0.4, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    for method in multidraft.METHODS:
        assert multidraft.acceptance_probability(p, q, method) == pytest.approx(0.0, abs=1e-12)
    _, residual = multidraft.spechub_select(
        p, [4, 3], [q, torch.nn.functional.one_hot(torch.tensor(3), 6).double()], _AlwaysNo()
    )
    assert (
        torch.isfinite(residual).all()
        and residual.sum() == pytest.approx(1.0)
        and residual[:2].sum() == pytest.approx(1.0)
    )


class _AlwaysNo:
    def bernoulli(self, p):
        return p >= 1.0

    def categorical(self, probs):
        return int(torch.argmax(probs))


# ---- the report on (tiny) models and the bench methods ------------------------------------------------
PROMPTS = [[1, 2, 3, 4, 1, 2, 3], [5, 6, 7, 5, 6]]


def test_one_step_figures_on_model_pairs(tiny_target, tiny_draft):
    from specgrove.bench import multidraft as report

    pairs, dropped = report.real_pairs(
        tiny_target, tiny_draft, SamplingParams(temperature=1.0, seed=0), max_new_tokens=12, top=5, prompts=PROMPTS
    )
    assert len(pairs) == 24 and all(p.shape == (5,) for p, _ in pairs) and all(0 <= d < 1 for d in dropped)
    figures = report.one_step_figures(pairs)
    assert figures["num_pairs"] == 24
    for f in figures["methods"].values():
        assert f["above_bound"] == 0 and f["mean_gap_to_bound"] >= -1e-9
        assert f["acceptance"] >= figures["single_draft_acceptance"] - 1e-9
    assert figures["methods"]["spechub"]["max_gap_to_bound"] < 1e-6
    dominance = figures["dominance_condition"]
    assert dominance["pairs"] == sum(multidraft.spechub_dominates(p, q) for p, q in pairs)
    assert dominance["spechub_at_least_both_rrs"] == dominance["pairs"]
    wins = figures["wins"]
    for a, b in (("spechub", "rrs"), ("rrs", "rrs_wo")):
        assert wins[f"{a}>{b}"]["mean_difference"] == pytest.approx(-wins[f"{b}>{a}"]["mean_difference"])
    with pytest.raises(ValueError, match="no mass"):
        report.restrict(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0]), 1)


def test_bench_multidraft_methods_and_plot(tiny_dirs, tmp_path):
    from specgrove.bench import multidraft as report
    from specgrove.bench.spec_bench import BenchConfig, BenchPrompt, run_bench

    methods = report.depth_methods([1, 2])
    assert methods == [
        "rrs:kary:2x1",
        "rrs_wo:kary:2x1",
        "spechub:kary:2x1",
        "rrs:kary:2x2",
        "rrs_wo:kary:2x2",
        "spechub:kary:2x2",
    ]
    config = BenchConfig(
        tiny_dirs["target"],
        tiny_dirs["draft"],
        prompts=[BenchPrompt(i, "c", p) for i, p in enumerate(PROMPTS)],
        methods=methods,
        max_new_tokens=10,
        temperature=1.0,
        seed=0,
        dtype="float32",
        device="cpu",
        measure_bandwidth=False,
    )
    result = run_bench(config, progress=False, log=lambda m: None)
    table = report.depth_table(result, [1, 2])
    for method in ("rrs", "rrs_wo", "spechub"):
        for depth in (1, 2):
            assert 1.0 <= table[method][depth] <= depth + 1
    assert result["methods"]["spechub:kary:2x2"]["tree"]["parents"] == list(TreeShape.parse("kary:2x2").parents)
    spread = report.depth_spread(result, [1, 2])
    per_prompt = {
        m: [p["mean_accept_length"] for p in result["methods"][f"{m}:kary:2x2"]["per_prompt"]]
        for m in ("rrs", "spechub")
    }
    assert all(1.0 <= t <= 3 for t in per_prompt["rrs"] + per_prompt["spechub"])
    difference = spread["paired_difference"]["spechub-rrs"]["2"]
    assert difference["mean"] == pytest.approx(sum(per_prompt["spechub"]) / 2 - sum(per_prompt["rrs"]) / 2)
    assert difference["stderr"] >= 0 and all(v >= 0 for v in spread["stderr"]["rrs_wo"].values())
    fake = {
        "one_step": {"0.6": report.one_step_figures([random_pair(6, 0), random_pair(6, 1)])},
        "depth_table": {"0.6": {m: {"1": row[1], "2": row[2]} for m, row in table.items()}},
    }
    path = report.plot_report(fake, tmp_path / "multidraft.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_multidraft_cli(tiny_dirs, tmp_path, monkeypatch, capsys):
    import json

    from specgrove import tuning
    from specgrove.cli import main

    monkeypatch.setattr(
        tuning, "tune_prompts", lambda target, n, data=None: PROMPTS[:n]
    )  # tiny models: no chat template
    out = tmp_path / "r.json"
    code = main(
        [
            "multidraft",
            "--target",
            str(tiny_dirs["target"]),
            "--draft",
            str(tiny_dirs["draft"]),
            "--dtype",
            "float32",
            "--temperatures",
            "0.7",
            "--prompts",
            "2",
            "--max-new-tokens",
            "8",
            "--top",
            "6",
            "--json",
            str(out),
            "--plot",
            str(tmp_path / "r.png"),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0 and "OTM bound" in printed and (tmp_path / "r.png").is_file()
    report = json.loads(out.read_text())
    assert report["one_step"]["0.7"]["num_pairs"] == 16
    assert main(["multidraft", "--target", str(tiny_dirs["target"]), "--temperatures", "0.7", "--top", "1"]) == 2
    assert "--top" in capsys.readouterr().err


def test_spechub_when_the_hub_rounds_to_probability_one():
    """float32 q can hold q(hub) == 1.0 next to tiny mass elsewhere; the second draft is then drawn from
    that tiny mass and the verifier must weigh it by the same normalisation (no division by zero)."""
    q = torch.tensor([1.0, 1e-9, 2e-9, 0.0], dtype=torch.float32)
    assert float(q[0]) == 1.0 and float(1.0 - q[0]) == 0.0 and float(q.double().sum() - 1.0) > 0
    p = torch.tensor([0.2, 0.5, 0.3, 0.0], dtype=torch.float32)
    drawn = multidraft.draw_hub_pair(q, _AlwaysNo())  # the first draft is the hub; a second comes from the rest
    assert [t for t, _ in drawn][0] == 0 and len(drawn) == 2
    emitted = enumerate_outcomes(lambda s: _emit_one_step(p, q, s))
    for token in range(4):
        assert emitted.get(token, 0.0) == pytest.approx(float(p[token]), abs=1e-6)


def _emit_one_step(p, q, sampler):
    drawn = multidraft.draw_hub_pair(q, sampler)
    tokens = [t for t, _ in drawn]
    chosen, residual = multidraft.spechub_select(p, tokens, [d for _, d in drawn], sampler)
    return tokens[chosen] if chosen is not None else sampler.categorical(residual)
