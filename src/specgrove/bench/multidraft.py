"""`specgrove multidraft`: SpecHub's comparison of multi-draft methods, measured on the real models.

1. one step: real (p, q) pairs, the target's and the draft's processed distributions at each
   position of the target's own text (teacher-forced, Spec-Bench prompts disjoint from the bench's
   first 20), restricted to the `top` tokens with the most p + q mass and renormalised; for each
   pair the exact two-draft acceptance of RRS, RRS without replacement and SpecHub
   (specgrove.verify.multidraft.acceptance_probability) next to the OTM bound of each method's joint
   draft distribution (HiGHS), and how often / by how much each method beats the others;
2. the paper's table: mean accepted tokens per step of binary trees (kary:2xD) of each depth under
   the three methods, by decoding the Spec-Bench prompts with the engine (run_bench's rrs:, rrs_wo:
   and spechub: methods);
3. a plot of both (matplotlib).
"""

from __future__ import annotations

import itertools
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from specgrove.sampling import SamplingParams, process_logits
from specgrove.verify import multidraft

METHOD_PREFIX = {"rrs": "rrs", "rrs_wo": "rrs_wo", "spechub": "spechub"}  # bench method prefix per method
DEFAULT_TOP = 50


def restrict(p: torch.Tensor, q: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """p and q on the `top` tokens with the most p + q, each renormalised; and the p + q mass dropped / 2."""
    keep = torch.topk(p.double() + q.double(), min(top, p.shape[-1])).indices
    p_top, q_top = p.double()[keep], q.double()[keep]
    dropped = 1.0 - 0.5 * float(p_top.sum() + q_top.sum())
    if float(p_top.sum()) <= 0 or float(q_top.sum()) <= 0:
        raise ValueError("a distribution has no mass on the kept tokens")
    return p_top / p_top.sum(), q_top / q_top.sum(), dropped


def real_pairs(
    target,
    draft,
    params: SamplingParams,
    *,
    num_prompts: int = 4,
    max_new_tokens: int = 64,
    top: int = DEFAULT_TOP,
    data=None,
    prompts: list[list[int]] | None = None,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[float]]:
    """(p, q) pairs restricted to `top` tokens, one per position of the target's own continuations."""
    from specgrove import tuning

    if prompts is None:
        prompts = tuning.tune_prompts(target, num_prompts, data)
    samples = tuning.generate_text(target, draft, prompts, params, max_new_tokens)
    pairs, dropped = [], []
    for sample in samples:
        if not sample.output_ids:
            continue
        p_all = process_logits(tuning.teacher_forced_logits(target, sample), params)
        q_all = process_logits(tuning.teacher_forced_logits(draft, sample), params)
        for p, q in zip(p_all, q_all):
            p_top, q_top, lost = restrict(p, q, top)
            pairs.append((p_top, q_top))
            dropped.append(lost)
    return pairs, dropped


def one_step_figures(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Mean exact acceptance and OTM bound per method, and pairwise wins, over the pairs."""
    accept = {m: [] for m in multidraft.METHODS}
    bound = {m: [] for m in multidraft.METHODS}
    single, condition = [], []
    for p, q in pairs:
        single.append(multidraft.acceptance_probability(p, q, "rrs", k=1))
        condition.append(multidraft.spechub_dominates(p, q))
        for m in multidraft.METHODS:
            accept[m].append(multidraft.acceptance_probability(p, q, m))
            bound[m].append(multidraft.otm_bound(p, multidraft.joint_draft_distribution(q, m)))
    methods = {}
    for m in multidraft.METHODS:
        gaps = [b - a for a, b in zip(accept[m], bound[m])]
        methods[m] = {
            "acceptance": statistics.fmean(accept[m]),
            "otm_bound": statistics.fmean(bound[m]),
            "mean_gap_to_bound": statistics.fmean(gaps),
            "max_gap_to_bound": max(gaps),
            "above_bound": sum(g < -1e-7 for g in gaps),
        }
    wins = {}
    for a, b in itertools.permutations(multidraft.METHODS, 2):
        margins = [x - y for x, y in zip(accept[a], accept[b])]
        better = [d for d in margins if d > 1e-9]
        wins[f"{a}>{b}"] = {
            "fraction": len(better) / len(margins),
            "mean_margin_when_better": statistics.fmean(better) if better else 0.0,
            "mean_difference": statistics.fmean(margins),
        }
    held = [i for i, c in enumerate(condition) if c]
    dominance = {
        "pairs": len(held),
        "fraction": len(held) / len(pairs),
        "spechub_at_least_both_rrs": sum(
            accept["spechub"][i] >= max(accept["rrs"][i], accept["rrs_wo"][i]) - 1e-9 for i in held
        ),
    }
    return {
        "num_pairs": len(pairs),
        "single_draft_acceptance": statistics.fmean(single),
        "methods": methods,
        "wins": wins,
        "dominance_condition": dominance,
    }


def depth_methods(depths: Sequence[int]) -> list[str]:
    """The bench methods of the paper's table: each method on the binary tree of each depth."""
    return [f"{METHOD_PREFIX[m]}:kary:2x{d}" for d in depths for m in multidraft.METHODS]


def depth_table(bench_result: dict, depths: Sequence[int]) -> dict:
    """{method: {depth: mean accepted tokens per step (tau)}} from a run_bench result."""
    figures = bench_result["methods"]
    return {
        m: {d: figures[f"{METHOD_PREFIX[m]}:kary:2x{d}"]["mean_accept_length"] for d in depths}
        for m in multidraft.METHODS
    }


def _per_prompt_tau(bench_result: dict, method: str, depth: int) -> list[float]:
    entry = bench_result["methods"][f"{METHOD_PREFIX[method]}:kary:2x{depth}"]
    return [p["mean_accept_length"] for p in entry["per_prompt"]]


def _stderr(values: Sequence[float]) -> float:
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")


def depth_spread(bench_result: dict, depths: Sequence[int]) -> dict:
    """How sure the table is: per method and depth the standard error of the per-prompt tau, and per pair
    of methods the mean per-prompt difference in tau with its paired standard error (same prompts)."""
    spread = {"stderr": {}, "paired_difference": {}}
    for m in multidraft.METHODS:
        spread["stderr"][m] = {str(d): _stderr(_per_prompt_tau(bench_result, m, d)) for d in depths}
    for a, b in (("spechub", "rrs"), ("spechub", "rrs_wo"), ("rrs_wo", "rrs")):
        rows = {}
        for d in depths:
            diffs = [x - y for x, y in zip(_per_prompt_tau(bench_result, a, d), _per_prompt_tau(bench_result, b, d))]
            rows[str(d)] = {"mean": statistics.fmean(diffs), "stderr": _stderr(diffs)}
        spread["paired_difference"][f"{a}-{b}"] = rows
    return spread


def run_report(
    target=None,
    draft=None,
    *,
    temperatures: Sequence[float] = (0.6, 1.0),
    num_prompts: int = 4,
    max_new_tokens: int = 64,
    top: int = DEFAULT_TOP,
    depths: Sequence[int] = (),
    bench_limit: int = 20,
    bench_max_new_tokens: int = 64,
    seed: int = 0,
    dtype: str = "auto",
    device: str = "cpu",
    data=None,
    log=None,
) -> dict:
    from specgrove.bench.spec_bench import BenchConfig, run_bench
    from specgrove.models import defaults
    from specgrove.models.loader import check_compatible, load_model

    say = log or (lambda msg: print(f"[specgrove] {msg}", file=sys.stderr, flush=True))
    if any(t <= 0 for t in temperatures):
        raise ValueError(
            f"multi-draft verification is about sampling: temperatures must be > 0, got {list(temperatures)}"
        )
    if top < 2:
        raise ValueError(f"--top must be >= 2, got {top}")
    if any(d < 1 for d in depths):
        raise ValueError(f"tree depths must be >= 1, got {list(depths)}")
    started = time.perf_counter()
    target = target or defaults.DEFAULT_TARGET
    draft = draft or defaults.DEFAULT_DRAFT
    target_model = load_model(target, dtype=dtype, device=device)
    draft_model = load_model(draft, dtype=dtype, device=device)
    check_compatible(target_model, draft_model)
    report = {
        "config": {
            "target": str(target),
            "draft": str(draft),
            "temperatures": list(temperatures),
            "num_prompts": num_prompts,
            "max_new_tokens": max_new_tokens,
            "top": top,
            "depths": list(depths),
            "bench_limit": bench_limit,
            "bench_max_new_tokens": bench_max_new_tokens,
            "seed": seed,
            "dtype": dtype,
        },
        "one_step": {},
        "depth_table": {},
    }
    for temperature in temperatures:
        params = SamplingParams(temperature=temperature, seed=seed)
        say(f"multidraft: (p, q) pairs at temperature {temperature:g} from {num_prompts} prompts ...")
        pairs, dropped = real_pairs(
            target_model,
            draft_model,
            params,
            num_prompts=num_prompts,
            max_new_tokens=max_new_tokens,
            top=top,
            data=data,
        )
        figures = one_step_figures(pairs)
        figures["mean_mass_outside_top"] = statistics.fmean(dropped) if dropped else 0.0
        report["one_step"][f"{temperature:g}"] = figures
    del target_model, draft_model
    for temperature in temperatures if depths else ():
        say(f"multidraft: binary trees of depth {', '.join(map(str, depths))} at temperature {temperature:g} ...")
        config = BenchConfig(
            target,
            draft,
            methods=depth_methods(depths),
            data=data,
            limit=bench_limit,
            max_new_tokens=bench_max_new_tokens,
            temperature=temperature,
            seed=seed,
            dtype=dtype,
            device=device,
            measure_bandwidth=False,
        )
        result = run_bench(config, log=say)
        report["depth_table"][f"{temperature:g}"] = {
            m: {str(d): v for d, v in row.items()} for m, row in depth_table(result, depths).items()
        }
        report.setdefault("depth_spread", {})[f"{temperature:g}"] = depth_spread(result, depths)
        report.setdefault("bench", {})[f"{temperature:g}"] = result
    report["config"]["wall_time_s"] = time.perf_counter() - started
    return report


def plot_report(report: dict, path: str | Path) -> Path:
    """One panel of one-step acceptance vs OTM bound per temperature; one of tau by depth if measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temps = list(report["one_step"])
    has_table = bool(report.get("depth_table"))
    fig, axes = plt.subplots(1, 2 if has_table else 1, figsize=(11 if has_table else 6, 4), squeeze=False)
    ax = axes[0][0]
    width = 0.8 / len(multidraft.METHODS)
    for i, m in enumerate(multidraft.METHODS):
        xs = [j + i * width for j in range(len(temps))]
        ax.bar(xs, [report["one_step"][t]["methods"][m]["acceptance"] for t in temps], width, label=f"{m}")
        ax.scatter(
            xs,
            [report["one_step"][t]["methods"][m]["otm_bound"] for t in temps],
            marker="_",
            s=400,
            color="black",
            zorder=3,
            label="OTM bound" if i == 0 else None,
        )
    ax.set_xticks([j + width for j in range(len(temps))], [f"T = {t}" for t in temps])
    ax.set_ylabel("P(one of 2 drafts accepted)")
    ax.set_ylim(0, 1)
    ax.set_title("one step, real (p, q) pairs")
    ax.legend(loc="lower right", fontsize=8)
    if has_table:
        ax = axes[0][1]
        for t, rows in report["depth_table"].items():
            for m, row in rows.items():
                depths = sorted(row, key=int)
                ax.plot([int(d) for d in depths], [row[d] for d in depths], marker="o", label=f"{m}, T = {t}")
        ax.set_xlabel("binary tree depth")
        ax.set_ylabel("mean accepted tokens per step")
        ax.set_title("decoding Spec-Bench prompts")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
