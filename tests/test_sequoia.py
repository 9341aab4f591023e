"""Sequoia: the optimal-tree DP against brute force over every tree, the exact sibling acceptance
against enumeration of the real verifier's coin flips (and Monte Carlo), the hardware-aware choice,
and the file formats. Pure math: no models."""

import json
import math
import random

import pytest
import torch

from specgrove.sampling import Sampler, SamplingParams
from specgrove.trees.sequoia import (
    AcceptanceVector,
    HardwareProfile,
    TreeChoice,
    acceptance_from_counts,
    best_choice,
    choice_for_budget,
    choose_tree,
    draw_without_replacement,
    load_tree_file,
    measure_acceptance_offline,
    optimal_scores,
    optimal_tree,
    parse_tree,
    sibling_acceptance,
    sibling_acceptance_greedy,
    tree_file_dict,
)
from specgrove.trees.shape import TreeShape
from specgrove.verify.enumerate import enumerate_outcomes
from specgrove.verify.speculative import rejection_select, residual_distribution

# ---------------------------------------------------------------------------------------------------
# Brute force over trees, written without the DP
# ---------------------------------------------------------------------------------------------------


def forests(size, depth):
    """Every ordered forest with exactly `size` nodes and depth <= depth. A forest is a list of trees
    in rank order; a tree is the forest of its children."""
    if size == 0:
        yield []
        return
    if depth == 0:
        return
    for first in range(1, size + 1):  # nodes in the first (rank 0) tree
        for its_children in forests(first - 1, depth - 1):
            for others in forests(size - first, depth):
                yield [its_children, *others]


def forest_value(forest, P):
    """Expected accepted nodes below a node whose children are `forest`."""
    return sum((P[r] if r < len(P) else 0.0) * (1.0 + forest_value(kids, P)) for r, kids in enumerate(forest))


def brute_force_best(P, max_nodes, max_depth):
    """(the best F, the fewest nodes that reach it)."""
    scored = [(1.0 + forest_value(f, P), size) for size in range(max_nodes + 1) for f in forests(size, max_depth)]
    best = max(score for score, _ in scored)
    return best, min(size for score, size in scored if score >= best - 1e-12)


def score_from_parents(parents, P):
    """F from a parents list, computed here from scratch (not with TreeShape's method)."""
    prob, seen = [], {}
    for p in parents:
        rank = seen.get(p, 0)
        seen[p] = rank + 1
        prob.append((P[rank] if rank < len(P) else 0.0) * (1.0 if p < 0 else prob[p]))
    return 1.0 + sum(prob)


def random_vector(rng, width, ordered):
    raw = [rng.random() ** 2 for _ in range(width)]
    if rng.random() < 0.3:
        raw[rng.randrange(width)] = 0.0  # a rank that never wins
    total = rng.uniform(0.3, 1.0)
    scale = total / (sum(raw) or 1.0)
    values = [v * scale for v in raw]
    return sorted(values, reverse=True) if ordered else values


def test_brute_force_enumerates_ordered_forests():
    # ordered forests of n nodes are counted by the Catalan numbers; depth 1 allows only one
    assert [sum(1 for _ in forests(n, 99)) for n in range(7)] == [1, 1, 2, 5, 14, 42, 132]
    assert [sum(1 for _ in forests(n, 1)) for n in range(5)] == [1, 1, 1, 1, 1]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("ordered", [True, False])
def test_dp_matches_brute_force(seed, ordered):
    rng = random.Random(seed)
    P = random_vector(rng, rng.choice([1, 2, 3, 4, 6]), ordered)
    max_nodes, max_depth = 7, 4
    table = optimal_scores(P, max_nodes, max_depth)
    assert len(table) == max_nodes + 1 and all(len(row) == max_depth + 1 for row in table)
    for n in range(max_nodes + 1):
        for d in range(max_depth + 1):
            expected, fewest_nodes = brute_force_best(P, n, d)
            assert table[n][d] == pytest.approx(expected, rel=1e-12, abs=1e-12)
            score, shape = optimal_tree(P, n, d)
            assert score == pytest.approx(expected, rel=1e-12, abs=1e-12)
            assert len(shape) == fewest_nodes <= n and shape.depth <= d  # no node that adds nothing
            assert shape.expected_accept_length(P) == pytest.approx(score, rel=1e-12)
            assert score_from_parents(shape.parents, P) == pytest.approx(score, rel=1e-12)
            # breadth-first with children in rank order is what TreeShape enforces on construction
            assert TreeShape(shape.parents) == shape


def test_dp_scores_are_monotone_and_fast_enough_for_tune():
    rng = random.Random(1)
    P = random_vector(rng, 16, ordered=True)
    table = optimal_scores(P, 128, 12)
    for n in range(129):
        for d in range(13):
            if n:
                assert table[n][d] >= table[n - 1][d] - 1e-12
            if d:
                assert table[n][d] >= table[n][d - 1] - 1e-12
    score, shape = optimal_tree(P, 128, 12)
    assert score == pytest.approx(table[128][12]) and len(shape) <= 128 and shape.depth <= 12
    assert shape.expected_accept_length(P) == pytest.approx(score, rel=1e-12)


def test_dp_special_vectors():
    # only the first sibling can win: the best tree is a chain (no node that adds nothing is kept)
    a = 0.7
    score, shape = optimal_tree([a, 0.0, 0.0], 5, 5)
    assert shape == TreeShape.chain(5)
    assert score == pytest.approx(sum(a**k for k in range(6)))
    score, shape = optimal_tree([a, 0.0, 0.0], 5, 3)  # the depth limit binds: a chain of 3
    assert shape == TreeShape.chain(3)
    # a draft that is always right: every node is accepted, tau = n + 1
    for n in range(1, 8):
        score, shape = optimal_tree([1.0, 0.0, 0.0, 0.0], n, n + 2)
        assert score == pytest.approx(n + 1) and shape == TreeShape.chain(n)
    # nothing is ever accepted: the empty tree, F = 1
    assert optimal_tree([0.0, 0.0], 6, 3) == (1.0, TreeShape(()))
    assert optimal_tree([0.5, 0.3], 0, 3) == (1.0, TreeShape(()))
    assert optimal_tree([0.5, 0.3], 4, 0) == (1.0, TreeShape(()))
    # one level: the best depth-1 tree takes the W best ranks; the root's children stay in rank order
    score, shape = optimal_tree(AcceptanceVector([0.5, 0.3, 0.1], 1.0), 2, 1)
    assert shape == TreeShape((-1, -1)) and score == pytest.approx(1.8)
    with pytest.raises(ValueError, match="budget"):
        optimal_tree([0.5], -1, 2)


# ---------------------------------------------------------------------------------------------------
# Sibling acceptance under verification without replacement
# ---------------------------------------------------------------------------------------------------


def random_dist(gen, vocab, zeros=0):
    x = torch.rand(vocab, generator=gen, dtype=torch.float64) + 0.05
    if zeros:
        x[torch.randperm(vocab, generator=gen)[:zeros]] = 0.0
    return (x / x.sum()).float()


def per_child_q(q, drawn):
    """q_j: q with the earlier siblings removed, renormalised (what each sibling is drawn from)."""
    qs, current = [], q.double().clone()
    for x in drawn:
        current = current / current.sum()
        qs.append(current.float())
        current = current.clone()
        current[x] = 0.0
    return qs


def enumerated_acceptance(p, q, drawn):
    """The exact distribution of the accepted position, from every coin flip of the real verifier."""
    outcomes = enumerate_outcomes(lambda s: rejection_select(p, drawn, per_child_q(q, drawn), s)[0])
    return [outcomes.get(j, 0.0) for j in range(len(drawn))], outcomes.get(None, 0.0)


def wrong_sibling_acceptance(p, q, drawn):
    """A wrong rule for comparison: q is never reduced (SpecInfer's i.i.d. rule applied to siblings that
    were drawn without replacement)."""
    p_res, undecided, out = p.double(), 1.0, []
    q = q.double()
    for x in drawn:
        a = min(1.0, float(p_res[x]) / float(q[x]))
        out.append(undecided * a)
        undecided *= 1.0 - a
        p_res = residual_distribution(p_res, q)
    return out


def cases(count=12, vocab=5):
    gen = torch.Generator().manual_seed(1234)
    for i in range(count):
        p = random_dist(gen, vocab, zeros=i % 2)
        q = random_dist(gen, vocab, zeros=(i // 2) % 2)
        drawn = draw_without_replacement(q, 3, gen)
        yield p, q, drawn


def test_sibling_acceptance_equals_enumerated_verification():
    for p, q, drawn in cases():
        exact = sibling_acceptance(p, q, drawn)
        enumerated, all_rejected = enumerated_acceptance(p, q, drawn)
        assert exact == pytest.approx(enumerated, abs=1e-6)  # the verifier runs in fp32
        assert sum(exact) == pytest.approx(1.0 - all_rejected, abs=1e-6)


def test_wrong_rule_is_caught_by_the_same_check():
    worst = 0.0
    for p, q, drawn in cases():
        enumerated, _ = enumerated_acceptance(p, q, drawn)
        worst = max(worst, max(abs(a - b) for a, b in zip(wrong_sibling_acceptance(p, q, drawn), enumerated)))
    assert worst > 1e-2  # the check above would fail for it


def test_drawing_the_whole_support_of_q_always_accepts():
    # after x_j is rejected p_res(x_j) = 0, so the last token of q's support is accepted w.p. 1
    gen = torch.Generator().manual_seed(7)
    for _ in range(5):
        p, q = random_dist(gen, 6), random_dist(gen, 6)
        drawn = draw_without_replacement(q, 6, gen)
        assert sum(sibling_acceptance(p, q, drawn)) == pytest.approx(1.0, abs=1e-9)
    q = torch.tensor([0.0, 0.6, 0.0, 0.4])
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    drawn = draw_without_replacement(q, 4, gen)
    assert sorted(drawn) == [1, 3]  # only two tokens can be drawn
    acc = sibling_acceptance(p, q, [*drawn, 0])  # q is exhausted after two: the rest are 0
    assert acc[2] == 0.0 and sum(acc) < 1.0
    with pytest.raises(ValueError, match="probability 0"):
        sibling_acceptance(p, q, [0, 1])
    with pytest.raises(ValueError, match="probability 0"):
        sibling_acceptance(p, q, [1, 1])  # a repeat cannot come from sampling without replacement


def test_greedy_sibling_acceptance():
    assert sibling_acceptance_greedy(4, [2, 4, 7]) == [0.0, 1.0, 0.0]
    assert sibling_acceptance_greedy(5, [2, 4, 7]) == [0.0, 0.0, 0.0]


def test_draw_without_replacement_is_sequential_sampling():
    q = torch.tensor([0.5, 0.3, 0.2, 0.0])
    gen = torch.Generator().manual_seed(0)
    trials = 4000
    pairs: dict[tuple[int, int], int] = {}
    for _ in range(trials):
        drawn = draw_without_replacement(q, 3, gen)
        assert len(drawn) == 3 and len(set(drawn)) == 3 and 3 not in drawn
        pairs[tuple(drawn[:2])] = pairs.get(tuple(drawn[:2]), 0) + 1
    for (a, b), count in pairs.items():
        expected = float(q[a] * q[b] / (1 - q[a]))
        # binomial std <= sqrt(0.25 / 4000) = 0.008; 0.03 is over 3.5 sigma
        assert count / trials == pytest.approx(expected, abs=0.03)
    assert draw_without_replacement(q, 0, gen) == []


def test_offline_measurement_matches_monte_carlo_of_the_verifier():
    gen = torch.Generator().manual_seed(3)
    p, q = random_dist(gen, 5), random_dist(gen, 5, zeros=1)
    width = 3

    # exact: every draw order of the siblings and every coin flip of the real verifier
    def step(sampler):
        remaining, drawn = q.double().clone(), []
        for _ in range(width):
            if remaining.sum() <= 0:
                break
            drawn.append(sampler.categorical(remaining / remaining.sum()))
            remaining[drawn[-1]] = 0.0
        return rejection_select(p, drawn, per_child_q(q, drawn), sampler)[0]

    exact = enumerate_outcomes(step)
    exact = [exact.get(k, 0.0) for k in range(width)]

    # measure_acceptance_offline over the same position repeated (one draw per row)
    rows = 3000
    measured = measure_acceptance_offline(p.repeat(rows, 1), q.repeat(rows, 1), width, torch.Generator().manual_seed(4))
    assert measured.num_positions == rows and measured.source == "offline" and measured.temperature == 1.0

    # Monte Carlo of the real verifier with the per-child q_j under a seeded Sampler
    sampler, draw_gen = Sampler(seed=5), torch.Generator().manual_seed(6)
    counts = [0] * width
    for _ in range(rows):
        drawn = draw_without_replacement(q, width, draw_gen)
        chosen, _ = rejection_select(p, drawn, per_child_q(q, drawn), sampler)
        if chosen is not None:
            counts[chosen] += 1
    empirical = [c / rows for c in counts]

    # std of each estimate <= 0.5 / sqrt(3000) = 0.009: 0.035 (~4 sigma) against the exact values,
    # 0.05 (~4 sigma of the difference) between the two estimates
    assert measured.values == pytest.approx(exact, abs=0.035)
    assert empirical == pytest.approx(exact, abs=0.035)
    assert measured.values == pytest.approx(empirical, abs=0.05)


def test_offline_greedy_measurement():
    # target argmax at rows: 2, 0, 3, 1; draft ranking (top first) per row below
    target = torch.nn.functional.one_hot(torch.tensor([2, 0, 3, 1]), 4).float()
    draft = torch.tensor(
        [
            [0.1, 0.2, 0.6, 0.1],  # 2 first -> rank 0
            [0.3, 0.5, 0.1, 0.1],  # 1, 0 -> rank 1
            [0.4, 0.3, 0.2, 0.1],  # 3 is fourth -> beyond width 3
            [0.2, 0.6, 0.1, 0.1],  # 1 first -> rank 0
        ]
    )
    vec = measure_acceptance_offline(target, draft, 3, torch.Generator(), greedy=True)
    assert vec.values == [0.5, 0.25, 0.0] and vec.temperature == 0.0
    vec = measure_acceptance_offline(target, draft, 3, torch.Generator(), params=SamplingParams(temperature=0))
    assert vec.values == [0.5, 0.25, 0.0] and vec.matches(SamplingParams(temperature=0, top_p=0.5))
    with pytest.raises(ValueError, match="greedy"):
        measure_acceptance_offline(target, draft, 3, torch.Generator(), greedy=True, params=SamplingParams())


def test_online_counts():
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=50)
    vec = acceptance_from_counts([30, 10, 0], [100, 100, 0], params)
    assert vec.values == pytest.approx([0.3, 0.1, 0.0]) and vec.source == "online" and vec.num_positions == 100
    assert vec.matches(params) and not vec.matches(SamplingParams(temperature=0.7))
    assert not vec.matches(SamplingParams(temperature=0))
    noisy = acceptance_from_counts([8, 1], [10, 1], params)  # 0.8 + 1.0 > 1 by noise: scaled to 1
    assert sum(noisy.values) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="accepted"):
        acceptance_from_counts([3], [2], params)


# ---------------------------------------------------------------------------------------------------
# AcceptanceVector validation
# ---------------------------------------------------------------------------------------------------


def test_acceptance_vector_round_trip_and_validation():
    vec = AcceptanceVector([0.6, 0.2], 0.8, top_p=0.95, top_k=20, source="offline", num_positions=17)
    assert AcceptanceVector.from_dict(json.loads(json.dumps(vec.to_dict()))) == vec
    assert vec.matches(SamplingParams(temperature=0.8, top_p=0.95, top_k=20))
    assert not vec.matches(SamplingParams(temperature=0.8, top_p=0.95, top_k=20, min_p=0.1))
    assert AcceptanceVector([0.5], 1.0, top_k=-1).matches(SamplingParams(top_k=0))
    bad = [
        (dict(values=[0.7, 0.5], temperature=1.0), "sum"),
        (dict(values=[-0.1], temperature=1.0), "probability"),
        (dict(values=[], temperature=1.0), "empty"),
        (dict(values=[0.5], temperature=-1.0), "temperature"),
        (dict(values=[0.5], temperature=1.0, source="guess"), "source"),
        (dict(values=[0.5], temperature=1.0, top_p=0.0), "top_p"),
        (dict(values=["x"], temperature=1.0), "finite number"),
        (dict(temperature=1.0), "missing 'values'"),
        (dict(values=[0.5], temperature=1.0, width=3), "unknown keys"),
    ]
    for d, message in bad:
        with pytest.raises(ValueError, match=message):
            AcceptanceVector.from_dict(d)


# ---------------------------------------------------------------------------------------------------
# Hardware-aware choice
# ---------------------------------------------------------------------------------------------------


def test_profile_interpolation_and_step_time():
    prof = HardwareProfile({1: 10.0, 2: 12.0, 4: 20.0}, {1: 1.0, 2: 2.0, 4: 4.0}, 512, "cpu", "bfloat16")
    assert prof.target_time(1) == 10.0 and prof.target_time(3) == pytest.approx(16.0)
    assert prof.target_time(8) == pytest.approx(36.0)  # slope of the last two points, 4 ms/token
    assert HardwareProfile({2: 12.0, 4: 20.0}, {1: 1.0}).target_time(1) == 12.0  # clamped below
    assert HardwareProfile({2: 12.0}, {1: 1.0}).target_time(9) == 12.0
    assert HardwareProfile({2: 12.0, 4: 11.0}, {1: 1.0}).target_time(8) == 11.0  # never decreasing beyond
    # kary 2x2: levels [2, 4]: draft(1) for the root + draft(2) for depth 1; target over 1 + 6 tokens
    assert prof.step_time(TreeShape.kary(2, 2)) == pytest.approx(1.0 + 2.0 + prof.target_time(7))
    assert prof.step_time(TreeShape(())) == 10.0
    assert HardwareProfile.from_dict(json.loads(json.dumps(prof.to_dict()))) == prof
    with pytest.raises(ValueError, match="target_ms"):
        HardwareProfile({}, {1: 1.0})
    with pytest.raises(ValueError, match="target_ms"):
        HardwareProfile({1: 0.0}, {1: 1.0})


P16 = [0.55, 0.15, 0.07, 0.04, 0.03, 0.02, 0.01, 0.01]


def profile(target):
    points = [1, 2, 4, 8, 16, 32, 64, 128]
    return HardwareProfile({n: target(n) for n in points}, {n: 0.5 + 0.01 * n for n in points}, 256, "test", "fp32")


def test_choose_tree_flat_target_picks_a_large_tree():
    prof = profile(lambda n: 20.0)  # verifying 128 tokens costs what 1 does (memory-bound)
    choices = choose_tree(P16, prof, max_depth=8)
    assert [c.num_nodes for c in choices] == [1, 2, 4, 8, 16, 32, 64]
    for c in choices:
        assert len(c.shape) <= c.num_nodes and c.shape.depth <= c.max_depth <= 8
        assert c.step_time_ms == pytest.approx(prof.step_time(c.shape))
        assert c.predicted_speedup == pytest.approx(c.predicted_accept_length * 20.0 / c.step_time_ms)
        # no depth does better for that budget
        for depth in range(1, 9):
            score, shape = optimal_tree(P16, c.num_nodes, depth)
            assert score * 20.0 / prof.step_time(shape) <= c.predicted_speedup * (1 + 1e-9)
    chosen = best_choice(choices)
    assert chosen.num_nodes >= 32 and len(chosen.shape) > 16 and chosen.predicted_speedup > 2.0
    assert any(len(chosen.shape.children(i)) > 1 for i in range(-1, len(chosen.shape)))  # a real tree


def test_choose_tree_linear_target_picks_a_small_chain():
    prof = profile(lambda n: 20.0 + 8.0 * (n - 1))  # compute-bound: every token costs
    chosen = best_choice(choose_tree(P16, prof, max_depth=8))
    assert len(chosen.shape) <= 2
    assert all(len(chosen.shape.children(i)) <= 1 for i in range(-1, len(chosen.shape)))  # a chain
    flat = best_choice(choose_tree(P16, profile(lambda n: 20.0), max_depth=8))
    assert len(flat.shape) > len(chosen.shape)


def test_tree_file_round_trip(tmp_path):
    prof = profile(lambda n: 20.0 + 0.2 * n)
    choices = choose_tree(P16, prof, budgets=(4, 16), max_depth=5)
    chosen = best_choice(choices)
    vec = AcceptanceVector(P16, 0.6, source="online", num_positions=1000)
    path = tmp_path / "tree.json"
    path.write_text(json.dumps(tree_file_dict(chosen, vec, prof, choices)))
    shape, data = load_tree_file(path)
    assert shape == chosen.shape == parse_tree(str(path))
    assert data["num_nodes"] == len(shape) and data["depth"] == shape.depth and data["budget"] == chosen.num_nodes
    assert data["predicted_accept_length"] == pytest.approx(shape.expected_accept_length(P16))
    assert AcceptanceVector.from_dict(data["acceptance"]) == vec
    assert HardwareProfile.from_dict(data["profile"]) == prof
    assert [c["budget"] for c in data["choices"]] == [4, 16]
    # 'sequoia:N[xD]:FILE': the DP's accept-length-optimal tree from the file's acceptance vector
    assert parse_tree(f"sequoia:12:{path}") == optimal_tree(P16, 12, 12)[1]
    assert parse_tree(f"sequoia:12x3:{path}") == optimal_tree(P16, 12, 3)[1]
    assert parse_tree(f"sequoia:12x3:{path}").depth <= 3
    for bad in ("sequoia:12", f"sequoia:x:{path}", f"sequoia:4xy:{path}"):
        with pytest.raises(ValueError, match="sequoia:N"):
            parse_tree(bad)
    # without a profile: the optimal tree for a budget, untimed
    plain = choice_for_budget(P16, 6, 3)
    assert isinstance(plain, TreeChoice) and plain.step_time_ms is None
    assert (plain.predicted_accept_length, plain.shape) == optimal_tree(P16, 6, 3)
    path.write_text(json.dumps(tree_file_dict(plain, vec, None)))
    shape, data = load_tree_file(path)
    assert shape == plain.shape and data["profile"] is None and len(data["choices"]) == 1
    # broken files say what is wrong
    data["num_nodes"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="num_nodes"):
        load_tree_file(path)
    path.write_text(json.dumps({"parents": [0]}))
    with pytest.raises(ValueError, match="parents"):
        load_tree_file(path)
    with pytest.raises(ValueError, match="does not exist"):
        load_tree_file(tmp_path / "missing.json")
    assert math.isfinite(chosen.predicted_speedup)


def test_a_larger_budget_never_predicts_slower():
    """A budget is an upper bound: when a verify forward grows costly (here as on this CPU, about
    linear past 8 tokens), the best tree for 32 nodes is the best tree of any size up to 32, never a
    32-node tree slower than the 16-node choice."""
    prof = profile(lambda n: 100.0 if n <= 8 else 100.0 + 12.0 * (n - 8))
    choices = choose_tree(P16, prof, budgets=(4, 8, 16, 32, 64), max_depth=6)
    speedups = [c.predicted_speedup for c in choices]
    assert speedups == sorted(speedups)
    assert len(choices[-1].shape) < 64
    for c in choices:  # every choice is the DP optimum for its own size and depth
        assert c.predicted_accept_length == pytest.approx(optimal_tree(P16, len(c.shape), c.shape.depth)[0])
