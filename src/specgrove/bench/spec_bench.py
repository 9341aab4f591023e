"""Spec-Bench runner: several decoding methods over the same prompts, with the models loaded once.

Methods
  plain             the engine with no proposer (k = 0): the baseline of the engine methods
  draft_model       the engine, a draft model proposing a chain of k tokens
  prompt_lookup     the engine, prompt lookup proposing up to k tokens
  tree:SPEC         the engine, the draft model filling a token tree (SPEC: chain:N, kary:BxD, widths:...,
                    sequoia:N:FILE, a tree .json from `specgrove tune`, or auto); children drawn without
                    replacement (Sequoia)
  rrs:SPEC          the same tree, children i.i.d. and verified by recursive rejection sampling (SpecInfer)
  rrs_wo:SPEC       the same as tree:SPEC under the multi-draft name (RRS without replacement)
  spechub:SPEC      the same tree, SpecHub's hub pairs at nodes with two children (binary trees: kary:2xD)
  sorted            S2D: the sorted draft (`sorted_draft`, specgrove.models.sorted) drafting a chain of k
                    adaptively, each token from the first exit confident enough (its sorted.json thresholds)
  sorted@L          the same sorted draft's exit L alone (its first L layers + the shared head), a chain of k
  sorted@L:SPEC     exit L alone drafting the token tree SPEC (as tree:SPEC; e.g. sorted@6:widths:4,2)
  sorted@L1+L2      adaptive over exits L1, L2 only (e.g. the shallow exits for a small target)
  hf_plain          transformers' generate() on the same weights: the baseline of the hf_* methods
  hf_assisted       transformers' assisted generation with the same draft, a fixed k
  hf_prompt_lookup  transformers' prompt lookup decoding, k tokens
  llama_cpp         llama.cpp (llama-cpp-python, optional) decoding the target's own GGUF file plainly: an
                    outside reference for the runtime; its speedup is over the engine's plain decoding

Order: one method over every prompt, then the next; with `interleave`, the engine methods take turns
prompt by prompt (prompt 1 under every method, then prompt 2, ...), which on a machine whose speed drifts
over minutes keeps the drift out of the ratios between methods.

Figures (Spec-Bench's protocol, batch size 1): tokens/s = sum of generated tokens / sum of wall time
(prefill included) over the prompts; speedup = tokens/s over the baseline's; tau and the acceptance
rate come from the merged SpecMetrics (see specgrove.engine.metrics); at temperature 0 every output
is also compared token for token with its baseline's, which a lossless method must match.

Weight bandwidth: for every engine method, the time per target forward and the target's weight bytes x
target forwards / time in target forwards, next to the machine's memory bandwidth measured before the
first method and after the last (specgrove.bench.bandwidth): their ratio is how close a forward is to
the limit. Likewise for the draft model's forwards (time of the draft phase, sampling included, per
draft forward).
"""

from __future__ import annotations

import functools
import gc
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from specgrove.bench.questions import (  # noqa: F401 (the benchmark's prompt API)
    SPEC_BENCH_ENV,
    SPEC_BENCH_RELATIVE,
    BenchPrompt,
    encode_questions,
    find_spec_bench,
    load_questions,
)
from specgrove.config import SpeculativeConfig, grammar, method_fields
from specgrove.engine.metrics import SpecMetrics
from specgrove.models import defaults
from specgrove.trees.shape import TreeShape

if TYPE_CHECKING:
    from specgrove.engine.engine import SpecEngine
    from specgrove.models.loader import LoadedModel
    from specgrove.sampling import SamplingParams

ENGINE_METHODS = ("plain", "draft_model", "prompt_lookup")
HF_METHODS = ("hf_plain", "hf_assisted", "hf_prompt_lookup")
DEFAULT_METHODS = ENGINE_METHODS + HF_METHODS
PEER_METHODS = ("llama_cpp",)  # optional outside peers, run only when asked for


def engine_fields(method: str) -> dict | None:
    """The SpeculativeConfig fields of an engine method, read by the one method language
    (`specgrove.config`): 'plain', 'draft_model', 'prompt_lookup', 'tree:SHAPE', 'rrs:SHAPE', 'sorted@6',
    ...; None for the HF and peer methods and for what is not a bench method ('tree' needs its SHAPE here)."""
    if method in HF_METHODS + PEER_METHODS or method == "none":
        return None
    try:
        fields = method_fields(method)
    except ValueError:
        return None
    if fields["method"] == "tree" and "tree" not in fields:
        return None
    return fields


def is_tree_method(method: str) -> bool:
    fields = engine_fields(method)
    return fields is not None and fields["method"] == "tree"


def is_sorted_method(method: str) -> bool:
    fields = engine_fields(method)
    return fields is not None and fields["method"] == "sorted"


def tree_sampling_of(method: str) -> str:
    """How a drafted method's siblings are drawn (draft_model: a chain, nothing to choose)."""
    fields = engine_fields(method) or {}
    return fields.get("tree_sampling", "without_replacement")


def baseline_of(method: str) -> str:
    return "hf_plain" if method in HF_METHODS else "plain"


def needs_draft(method: str) -> bool:
    """Whether a method runs the draft model (--draft); the sorted methods run the sorted draft instead."""
    return method in ("draft_model", "hf_assisted") or is_tree_method(method)


def engine_config(
    method: str,
    num_speculative_tokens: int,
    prompt_lookup_min: int = 1,
    prompt_lookup_max: int = 3,
    eagle_head: str | os.PathLike | None = None,
) -> SpeculativeConfig:
    """The validated config of an engine method with the bench's k, prompt-lookup settings and eagle head."""
    fields = engine_fields(method)
    if fields is None:
        raise ValueError(f"{method!r} is not an engine method of the bench; use {BENCH_GRAMMAR}")
    if fields["method"] == "eagle" and eagle_head is not None:
        fields["eagle_head"] = str(eagle_head)
    return SpeculativeConfig.of_fields(
        {
            **fields,
            "num_speculative_tokens": num_speculative_tokens,
            "prompt_lookup_min": prompt_lookup_min,
            "prompt_lookup_max": prompt_lookup_max,
        }
    )


BENCH_GRAMMAR = f"{', '.join(DEFAULT_METHODS + PEER_METHODS)}, or a method: {grammar().removeprefix('none, ')}"


WARMUP_MAX_NEW_TOKENS = 32  # a warm-up only has to touch every code path once


@dataclass
class MethodRun:
    """What one method produced on each prompt (in prompt order)."""

    outputs: list[list[int]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    metrics: list[SpecMetrics | None] = field(default_factory=list)
    exit_counts: dict | None = None  # sorted drafts: draft tokens per exit


def _as_prompts(prompts: Sequence[BenchPrompt | Sequence[int]]) -> list[BenchPrompt]:
    out = []
    for i, p in enumerate(prompts):
        out.append(p if isinstance(p, BenchPrompt) else BenchPrompt(i, "custom", [int(t) for t in p]))
    return out


def _ordered_methods(methods: Sequence[str]) -> list[str]:
    methods = list(dict.fromkeys(m.strip() for m in methods if m.strip()))
    unknown = [m for m in methods if m not in DEFAULT_METHODS + PEER_METHODS and engine_fields(m) is None]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; use {BENCH_GRAMMAR}")
    if not methods:
        raise ValueError(f"no methods given; use some of {', '.join(DEFAULT_METHODS)}")
    for m in methods:
        if engine_fields(m) is not None:
            engine_config(m, 1)  # a bad tree spec fails now, before any model loads
    # Speedups are relative to a baseline, so a method's baseline always runs too.
    for m in list(methods):
        if baseline_of(m) not in methods:
            methods.append(baseline_of(m))
    order = (
        list(ENGINE_METHODS)
        + [m for m in methods if is_tree_method(m)]
        + [m for m in methods if is_sorted_method(m)]
        + [  # the other drafters of the method language (eagle, a registered one), in the order given
            m
            for m in methods
            if engine_fields(m) is not None
            and m not in ENGINE_METHODS
            and not is_tree_method(m)
            and not is_sorted_method(m)
        ]
        + list(HF_METHODS)
        + list(PEER_METHODS)
    )
    return [m for m in order if m in methods]


# ---- the configuration -----------------------------------------------------------------------------
@dataclass
class BenchConfig:
    """One benchmark run: the models, the methods, the prompts and the decoding settings (the options of
    `specgrove bench`). Checked when made and again by run_bench (`validate`), before any model loads.

    `prompts`: token-id prompts (BenchPrompt, or plain lists of ids, category "custom") instead of
    Spec-Bench questions; then `data`, `limit` and `categories` are unused and no tokenizer is needed.
    `sorted_draft` (a path or an already loaded LoadedModel, so one copy can serve several targets) is
    the draft of the sorted / sorted@L methods. `interleave`: the engine methods take turns prompt by
    prompt (`_run_interleaved`) instead of one method over every prompt, then the next.
    """

    target: str | os.PathLike = defaults.DEFAULT_TARGET
    draft: str | os.PathLike | None = None  # None: the default draft, with the default target only
    _: KW_ONLY
    methods: Sequence[str] = DEFAULT_METHODS
    prompts: Sequence[BenchPrompt | Sequence[int]] | None = None
    data: str | os.PathLike | None = None  # Spec-Bench's question.jsonl; None: find_spec_bench's search
    limit: int | None = 20
    categories: Sequence[str] | None = None
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 3
    max_new_tokens: int = 128
    temperature: float = 0.0
    seed: int | None = None
    dtype: str | torch.dtype = "auto"
    device: str | None = "cpu"
    warmup: int = 1  # warm-up prompts per method, excluded from the figures
    measure_bandwidth: bool = True
    bandwidth_num_floats: int | None = None  # None: the bandwidth probe's default size
    interleave: bool = False
    tree_acceptance: str | os.PathLike | None = None  # a `specgrove tune` file: each tree's predicted tau
    quantization: str | None = "auto"
    draft_quantization: str | None = "auto"
    draft_vocab: int | None = None
    sorted_draft: str | os.PathLike | LoadedModel | None = None
    enforce_eager: bool = False  # no CUDA graphs
    eagle_head: str | os.PathLike | None = None  # method eagle's head (None: train-eagle's default place)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError, saying what is wrong and what to pass, for what cannot run; loads nothing.
        Whether the methods' draft models are given is run_bench's check (`_draft_for`)."""
        self.run_order()  # unknown methods and bad tree specs
        k = self.num_speculative_tokens
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"num_speculative_tokens (k) must be an integer >= 1 for the benchmark, got {k!r}")
        if not (1 <= self.prompt_lookup_min <= self.prompt_lookup_max):
            raise ValueError(
                f"prompt lookup needs 1 <= min <= max, got {self.prompt_lookup_min}, "
                f"{self.prompt_lookup_max}: pass prompt_lookup_min <= prompt_lookup_max"
            )
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be an integer >= 0 (0: no warm-up), got {self.warmup!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 (or None for every question), got {self.limit}")
        if self.prompts is not None and len(self.prompts) == 0:
            raise ValueError("no prompts to run: give at least one, or prompts=None for Spec-Bench's questions")
        self.sampling_params()  # temperature, max_new_tokens

    def run_order(self) -> list[str]:
        """The methods in the order they run, each one's baseline added (its speedup is relative to it)."""
        return _ordered_methods(self.methods)

    def sampling_params(self, warmup: bool = False) -> SamplingParams:
        """The sampling of every engine method; a warm-up's stops after WARMUP_MAX_NEW_TOKENS."""
        from specgrove.sampling import SamplingParams

        if warmup:
            return SamplingParams(
                temperature=self.temperature, seed=self.seed, max_tokens=min(self.max_new_tokens, WARMUP_MAX_NEW_TOKENS)
            )
        return SamplingParams(
            temperature=self.temperature, top_p=1.0, top_k=0, min_p=0.0, seed=self.seed, max_tokens=self.max_new_tokens
        )


# ---- running ---------------------------------------------------------------------------------------
def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="prompt", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def _warm_up(engine, prompts: list[BenchPrompt], warmup_params, warmup: int) -> None:
    for i in range(warmup):
        engine.generate(engine.new_sequence(prompts[i % len(prompts)].token_ids, warmup_params))


def _timed_prompt(engine, prompt: BenchPrompt, params, run: MethodRun):
    """Generate one prompt's answer, timed (prefill included), into `run`."""
    cuda = engine.target.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    seq = engine.generate(engine.new_sequence(prompt.token_ids, params))
    if cuda:
        torch.cuda.synchronize()
    run.outputs.append(list(seq.output_ids))
    run.seconds.append(time.perf_counter() - t0)
    run.metrics.append(seq.metrics)
    return seq


def _run_engine_method(
    engine, prompts: list[BenchPrompt], params, warmup_params, warmup: int, progress: bool, desc: str
) -> MethodRun:
    _warm_up(engine, prompts, warmup_params, warmup)
    run = MethodRun()
    with _progress(len(prompts), desc, progress) as bar:
        for p in prompts:
            seq = _timed_prompt(engine, p, params, run)
            bar.set_postfix(
                tok_s=f"{sum(map(len, run.outputs)) / sum(run.seconds):.2f}",
                tau=f"{seq.metrics.mean_accept_length:.2f}",
            )
            bar.update()
    return run


def _run_interleaved(
    engines: dict, prompts: list[BenchPrompt], params, warmup_params, warmup: int, progress: bool
) -> dict[str, MethodRun]:
    """Every method on prompt 1, then every method on prompt 2, ...: a machine whose speed drifts over
    minutes (the bandwidth probe read 31-67 GB/s in runs of 2026-11-26) then slows all methods alike,
    not whichever ran during a slow spell, so the ratios between methods are what differs between them."""
    for engine in engines.values():
        _warm_up(engine, prompts, warmup_params, warmup)
    runs = {m: MethodRun() for m in engines}
    with _progress(len(prompts) * len(engines), "interleaved", progress) as bar:
        for p in prompts:
            for method, engine in engines.items():
                _timed_prompt(engine, p, params, runs[method])
                bar.update()
    return runs


def _record_exit_counts(run: MethodRun, engine) -> None:
    """Adaptive sorted drafting: how often each exit drafted (warm-up included)."""
    if engine.proposer is not None and engine.proposer.exit_counts is not None:
        run.exit_counts = {str(e): n for e, n in sorted(engine.proposer.exit_counts.items())}


def _generate_with(peer, method: str, ids, **kwargs):
    return peer.generate(ids, method, **kwargs)


def _run_peer_method(
    generate, prompts: list[BenchPrompt], warmup: int, progress: bool, desc: str, **gen_kwargs
) -> MethodRun:
    """An outside peer's run: generate(prompt_ids, **gen_kwargs) -> (new ids, wall seconds)."""
    warm_kwargs = {**gen_kwargs, "max_new_tokens": min(gen_kwargs["max_new_tokens"], WARMUP_MAX_NEW_TOKENS)}
    for i in range(warmup):
        generate(prompts[i % len(prompts)].token_ids, **warm_kwargs)
    run = MethodRun()
    tokens, seconds = 0, 0.0
    with _progress(len(prompts), desc, progress) as bar:
        for p in prompts:
            ids, dt = generate(p.token_ids, **gen_kwargs)
            run.outputs.append(ids)
            run.seconds.append(dt)
            run.metrics.append(None)
            tokens += len(ids)
            seconds += dt
            bar.set_postfix(tok_s=f"{tokens / seconds:.2f}")
            bar.update()
    return run


# ---- figures ---------------------------------------------------------------------------------------
def _merge(metrics: list[SpecMetrics | None]) -> SpecMetrics | None:
    if not metrics or any(m is None for m in metrics):
        return None
    merged = SpecMetrics()
    for m in metrics:
        merged = merged.merge(m)
    return merged


def _speed(run: MethodRun, idx: list[int]) -> tuple[int, float, float]:
    """Generated tokens, wall seconds and tokens/s over the prompts `idx`."""
    tokens = sum(len(run.outputs[i]) for i in idx)
    seconds = sum(run.seconds[i] for i in idx)
    return tokens, seconds, tokens / seconds if seconds > 0 else 0.0


def _speed_ratio(tokens_per_s: float, base: MethodRun | None, idx: list[int]) -> float | None:
    if base is None:
        return None
    base_tokens_per_s = _speed(base, idx)[2]
    return tokens_per_s / base_tokens_per_s if base_tokens_per_s > 0 else None


def _identical_outputs(run: MethodRun, base: MethodRun | None, idx: list[int], greedy: bool):
    """(all identical, how many) against `base`; (None, None) when not compared (sampling, no base)."""
    if base is None or not greedy:
        return None, None
    count = sum(run.outputs[i] == base.outputs[i] for i in idx)
    return count == len(idx), count


def _forward_figures(merged: SpecMetrics, is_speculative: bool, weight_bytes: dict | None) -> dict:
    """The forwards' counts and times, and the weight bandwidth of a target and of a draft forward."""
    out = {
        "target_forwards": merged.target_forwards,
        "per_position_acceptance": merged.per_position_acceptance if is_speculative else [],
        "draft_time_s": merged.draft_time_s,  # the draft phase (a draft model's prompt prefill is in prefill_time_s)
        "target_time_s": merged.target_time_s,  # the target's step forwards
        "prefill_time_s": merged.prefill_time_s,  # the prompt prefill, the target's and a draft model's
        "verify_time_s": merged.verify_time_s,  # verification, KV commit and appending, after the forwards
    }
    if merged.target_forwards and merged.target_time_s > 0:
        out["target_ms_per_forward"] = merged.target_time_s / merged.target_forwards * 1e3
        if (weight_bytes or {}).get("target"):
            out["target_weight_gbs"] = weight_bytes["target"] * merged.target_forwards / merged.target_time_s / 1e9
    if merged.draft_forwards and merged.draft_time_s > 0:  # the draft phase's time (sampling included) per forward
        out["draft_ms_per_forward"] = merged.draft_time_s / merged.draft_forwards * 1e3
        if (weight_bytes or {}).get("draft"):
            out["draft_weight_gbs"] = weight_bytes["draft"] * merged.draft_forwards / merged.draft_time_s / 1e9
    return out


def _figures(
    run: MethodRun,
    idx: list[int],
    is_speculative: bool,
    baseline: MethodRun | None,
    greedy: bool,
    is_hf: bool = False,
    plain: MethodRun | None = None,
    weight_bytes: dict | None = None,
) -> dict:
    tokens, seconds, tps = _speed(run, idx)
    merged = _merge([run.metrics[i] for i in idx])
    same, same_count = _identical_outputs(run, baseline, idx, greedy)
    out = {
        "tokens_per_s": tps,
        "speedup": _speed_ratio(tps, baseline, idx),
        "mean_accept_length": merged.mean_accept_length if (merged is not None and is_speculative) else None,
        "acceptance_rate": merged.acceptance_rate if (merged is not None and is_speculative) else None,
        "identical_to_baseline": same,
        "identical_count": same_count,
        "num_prompts": len(idx),
        "generated_tokens": tokens,
        "time_s": seconds,
    }
    if merged is not None:
        out.update(_forward_figures(merged, is_speculative, weight_bytes))
    if is_hf:  # transformers methods: also against the engine's plain decoding
        out["speedup_vs_plain"] = _speed_ratio(tps, plain, idx)
        out["identical_to_plain"], out["identical_to_plain_count"] = _identical_outputs(run, plain, idx, greedy)
    return out


def summarize(
    runs: dict[str, MethodRun], prompts: list[BenchPrompt], greedy: bool, weight_bytes: dict | None = None
) -> dict:
    """`weight_bytes`: {"target": bytes, "draft": bytes} for the weight bandwidth of each forward."""
    categories = list(dict.fromkeys(p.category for p in prompts))
    all_idx = list(range(len(prompts)))
    result = {}
    for method, run in runs.items():
        baseline = runs.get(baseline_of(method))
        speculative = method not in ("plain", "hf_plain") + PEER_METHODS

        figures = functools.partial(
            _figures,
            run,
            is_speculative=speculative,
            baseline=baseline,
            greedy=greedy,
            is_hf=method in HF_METHODS,
            plain=runs.get("plain"),
            weight_bytes=weight_bytes,
        )

        entry = {"baseline": baseline_of(method), **figures(all_idx)}
        entry["per_category"] = {c: figures([i for i, p in enumerate(prompts) if p.category == c]) for c in categories}
        if run.exit_counts is not None:
            entry["exit_counts"] = run.exit_counts
        entry["per_prompt"] = [
            {
                "question_id": p.question_id,
                "category": p.category,
                "generated_tokens": len(run.outputs[i]),
                "time_s": run.seconds[i],
                "mean_accept_length": run.metrics[i].mean_accept_length if (speculative and run.metrics[i]) else None,
                "identical_to_baseline": (run.outputs[i] == baseline.outputs[i]) if (greedy and baseline) else None,
            }
            for i, p in enumerate(prompts)
        ]
        result[method] = entry
    return result


# ---- the runner's steps ----------------------------------------------------------------------------
def _say(message: str) -> None:
    print(f"[specgrove] {message}", file=sys.stderr, flush=True)


def _questions(config: BenchConfig) -> tuple[list[dict] | None, Path | None]:
    """Spec-Bench's questions and their file; (None, None) when the config gives its own prompts."""
    if config.prompts is not None:
        return None, None
    data_path = find_spec_bench(config.data)
    return load_questions(data_path, config.limit, config.categories), data_path


def _draft_for(config: BenchConfig, methods: list[str]) -> str | os.PathLike | None:
    """The draft the run names: `config.draft`, or the default draft when a method needs one beside the
    default target. Fails before anything loads when a method's draft or outside package is missing."""
    if "llama_cpp" in methods:
        from specgrove.bench.llamacpp_peer import require_llama_cpp

        require_llama_cpp()
    sorted_methods = [m for m in methods if is_sorted_method(m)]
    if sorted_methods and config.sorted_draft is None:
        raise ValueError(
            f"methods {', '.join(sorted_methods)} need a sorted draft: pass --sorted-draft DIR "
            "(made by `specgrove train-sorted`)"
        )
    drafted = [m for m in methods if needs_draft(m)]
    if drafted and config.draft is None:
        if str(config.target) != defaults.DEFAULT_TARGET:
            raise ValueError(f"methods {', '.join(drafted)} need a draft model: pass --draft")
        return defaults.DEFAULT_DRAFT
    return config.draft


def _acceptance(config: BenchConfig, say):
    """The acceptance vector of `config.tree_acceptance` (None without one), which predicts each tree's tau."""
    if config.tree_acceptance is None:
        return None
    from specgrove.trees.sequoia import AcceptanceVector, load_tree_file

    acceptance = AcceptanceVector.from_dict(load_tree_file(config.tree_acceptance)[1]["acceptance"])
    if not acceptance.matches(config.sampling_params()):
        say(
            f"note: the acceptance vector in {config.tree_acceptance} was measured at temperature "
            f"{acceptance.temperature}, top_p {acceptance.top_p}; this run samples at temperature {config.temperature}"
        )
    return acceptance


def _machine(device: str | None) -> dict:
    from specgrove.cpu import cpu_features

    return {
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "cpu": cpu_features().as_dict(),
        "memory_bandwidth_gbs": None,
        "read_bandwidth_gbs": None,
    }


def _measure_bandwidth(machine: dict, when: str, config: BenchConfig, say) -> None:
    """The machine's memory bandwidth, into `machine`: the start's is its headline, every one a bandwidth run."""
    from specgrove.bench.bandwidth import DEFAULT_NUM_FLOATS, measure_memory_bandwidth

    bw = measure_memory_bandwidth(config.bandwidth_num_floats or DEFAULT_NUM_FLOATS, device=config.device or "cpu")
    if when == "start":
        machine.update(bw.to_dict())
    machine.setdefault("bandwidth_runs", []).append(
        {"when": when, "read_gbs": bw.read_bandwidth_gbs, "copy_gbs": bw.memory_bandwidth_gbs}
    )
    say(
        f"memory bandwidth at the {when}: read {bw.read_bandwidth_gbs:.1f} GB/s, copy (read + write) "
        f"{bw.memory_bandwidth_gbs:.1f} GB/s"
    )


@dataclass
class _ModelRecord:
    """What the run keeps of its models once the engine methods are done and the models are freed: what the
    outside peers load (the converted directories, llama.cpp's GGUF file) and what the report says of them."""

    target_dir: Path
    draft_dir: Path | None
    gguf_path: Path | None
    eos_ids: list[int]
    loaded_as: dict  # dtype, quantization, draft_quantization
    weight_bytes: dict  # {"target": bytes, "draft": bytes or None}: each forward's weight bandwidth


@dataclass
class _Models:
    """The models one run loads once, shared by its engine methods."""

    target: LoadedModel
    draft: LoadedModel | None
    sorted_draft: LoadedModel | None

    def draft_of(self, method: str) -> LoadedModel | None:
        return self.sorted_draft if is_sorted_method(method) else self.draft

    def record(self, methods: list[str]) -> _ModelRecord:
        from specgrove.engine.engine import eos_token_ids

        target, draft = self.target, self.draft
        gguf_path = None
        if "llama_cpp" in methods:
            from specgrove.bench.llamacpp_peer import gguf_of

            gguf_path = gguf_of(target.path)  # fail now, not after the engine methods ran
        loaded_as = {
            "dtype": str(target.dtype).removeprefix("torch."),
            "quantization": getattr(target.model, "quantization", None),
            "draft_quantization": getattr(draft.model, "quantization", None) if draft is not None else None,
        }
        weight_bytes = {
            "target": target.model.weight_bytes(),
            "draft": draft.model.weight_bytes() if draft is not None and draft.is_fast else None,
        }
        return _ModelRecord(
            target.path,
            draft.path if draft is not None else None,
            gguf_path,
            sorted(eos_token_ids(target)),
            loaded_as,
            weight_bytes,
        )


def _load_models(config: BenchConfig, methods: list[str], draft: str | os.PathLike | None, say) -> _Models:
    """The target, and the draft model and the sorted draft when a method needs them."""
    from specgrove.models.loader import LoadedModel, check_compatible, load_model

    graphs = False if config.enforce_eager else None  # CUDA graphs (on a GPU only)
    target = load_model(
        config.target, dtype=config.dtype, device=config.device, quantization=config.quantization, cuda_graphs=graphs
    )
    say(f"loaded target {target.name} ({target.dtype}) in {target.load_seconds:.1f} s")
    draft_model = None
    if any(needs_draft(m) for m in methods):
        draft_model = load_model(
            draft,
            dtype=config.dtype,
            device=config.device,
            quantization=config.draft_quantization,
            cuda_graphs=graphs,
            head_vocab=config.draft_vocab,
        )
        check_compatible(target, draft_model)
        say(f"loaded draft {draft_model.name} in {draft_model.load_seconds:.1f} s")
    sorted_model = None
    if any(is_sorted_method(m) for m in methods):
        sorted_model = (
            config.sorted_draft
            if isinstance(config.sorted_draft, LoadedModel)
            else load_model(
                config.sorted_draft,
                dtype=config.dtype,
                device=config.device,
                quantization=config.draft_quantization,
                cuda_graphs=graphs,
            )
        )
        check_compatible(target, sorted_model)
    return _Models(target, draft_model, sorted_model)


def _bench_prompts(config: BenchConfig, questions: list[dict] | None, target: LoadedModel) -> list[BenchPrompt]:
    return encode_questions(questions, target.tokenizer) if config.prompts is None else _as_prompts(config.prompts)


@dataclass
class _EnginePlan:
    """How each engine method's engine is built: its config, its draft (the draft model or the sorted draft),
    its tree, and one KV-cache length long enough for every prompt, answer and tree."""

    models: _Models
    configs: dict[str, SpeculativeConfig]
    shapes: dict  # method -> TreeShape, or an AutoTree for tree 'auto'
    max_model_len: int

    @classmethod
    def of(cls, config: BenchConfig, methods: list[str], models: _Models, prompts: list[BenchPrompt]) -> _EnginePlan:
        from specgrove.drafting.factory import shape_size
        from specgrove.tuning import resolve_shape

        k = config.num_speculative_tokens
        configs = {
            m: engine_config(m, k, config.prompt_lookup_min, config.prompt_lookup_max, config.eagle_head)
            for m in methods
            if engine_fields(m)
        }
        shapes = {
            m: resolve_shape(c, models.target, models.draft_of(m)) for m, c in configs.items() if c.tree is not None
        }
        shapes["draft_model"] = TreeShape.chain(k)
        longest = max([k] + [shape_size(shape) for shape in shapes.values()])
        max_model_len = max(len(p.token_ids) for p in prompts) + config.max_new_tokens + longest + 8
        return cls(models, configs, shapes, max_model_len)

    def engine(self, method: str) -> SpecEngine:
        from specgrove.drafting.factory import build_proposer
        from specgrove.engine.engine import SpecEngine

        proposer, num_draft = build_proposer(
            self.configs[method],
            self.models.target,
            self.models.draft_of(method),
            self.max_model_len,
            shape=self.shapes.get(method),
        )
        return SpecEngine(self.models.target, proposer, num_draft, self.max_model_len)


def _run_engine_methods(
    plan: _EnginePlan, methods: list[str], prompts: list[BenchPrompt], config: BenchConfig, progress: bool
) -> dict[str, MethodRun]:
    """Every engine method: one after the other, or taking turns prompt by prompt (`config.interleave`)."""
    params, warmup_params = config.sampling_params(), config.sampling_params(warmup=True)
    engine_methods = [m for m in methods if m not in HF_METHODS + PEER_METHODS]
    runs: dict[str, MethodRun] = {}
    if config.interleave:
        engines = {m: plan.engine(m) for m in engine_methods}
        runs.update(_run_interleaved(engines, prompts, params, warmup_params, config.warmup, progress))
        for method, engine in engines.items():
            _record_exit_counts(runs[method], engine)
    else:
        for method in engine_methods:
            engine = plan.engine(method)  # one method's engine (and draft caches) alive at a time
            runs[method] = _run_engine_method(engine, prompts, params, warmup_params, config.warmup, progress, method)
            _record_exit_counts(runs[method], engine)
    return runs


def _run_hf_methods(
    record: _ModelRecord, methods: list[str], prompts: list[BenchPrompt], config: BenchConfig, progress: bool
) -> dict[str, MethodRun]:
    """transformers' generate() on the same converted weights: plain, assisted, prompt lookup."""
    from specgrove.bench.hf_peer import HFPeer

    hf_methods = [m for m in methods if m in HF_METHODS]
    if not hf_methods:
        return {}
    gc.collect()  # the engine's copies go before transformers loads its own: one set of weights in memory at a time
    peer = HFPeer(
        record.target_dir,
        record.draft_dir if "hf_assisted" in hf_methods else None,
        config.dtype,
        config.device or "cpu",
        record.eos_ids,
    )
    runs = {}
    try:
        for method in hf_methods:
            runs[method] = _run_peer_method(
                functools.partial(_generate_with, peer, method),
                prompts,
                config.warmup,
                progress,
                method,
                max_new_tokens=config.max_new_tokens,
                num_speculative_tokens=config.num_speculative_tokens,
                temperature=config.temperature,
                seed=config.seed,
                prompt_lookup_max=config.prompt_lookup_max,
            )
    finally:
        peer.close()
    return runs


def _run_llama_cpp(record: _ModelRecord, prompts: list[BenchPrompt], config: BenchConfig, progress: bool) -> MethodRun:
    """llama.cpp decoding the target's own GGUF file plainly."""
    from specgrove.bench.llamacpp_peer import LlamaCppPeer

    gc.collect()
    n_ctx = max(len(p.token_ids) for p in prompts) + config.max_new_tokens + 8
    with LlamaCppPeer(record.gguf_path, n_ctx, record.eos_ids) as peer:
        return _run_peer_method(
            peer.generate,
            prompts,
            config.warmup,
            progress,
            "llama_cpp",
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            seed=config.seed,
        )


def _tree_figures(shapes: dict, acceptance) -> dict[str, dict]:
    """Each tree method's tree ("auto" for one tuned per setting) and the tau its acceptance vector predicts."""
    out = {}
    for method, shape in shapes.items():
        fixed = isinstance(shape, TreeShape)
        # P[rank] is measured for siblings drawn without replacement: it predicts only those trees
        predicted = (
            fixed
            and acceptance is not None
            and tree_sampling_of(method) == "without_replacement"
            and not is_sorted_method(method)
        )  # the vector is the draft model's, not an exit's
        out[method] = {
            "tree": shape.to_dict() if fixed else "auto",
            "predicted_accept_length": shape.expected_accept_length(acceptance.values) if predicted else None,
        }
    return out


def _baseline_bandwidth(runs: dict[str, MethodRun], target_weight_bytes: int) -> float | None:
    """The target's weight bytes read per second by plain decoding's forwards (GB/s)."""
    plain = _merge(runs["plain"].metrics) if "plain" in runs else None
    if plain is None or plain.target_time_s <= 0:
        return None
    return target_weight_bytes * plain.target_forwards / plain.target_time_s / 1e9


def _config_record(
    config: BenchConfig,
    methods: list[str],
    draft,
    acceptance,
    data_path: Path | None,
    prompts: list[BenchPrompt],
    record: _ModelRecord,
    started: float,
) -> dict:
    """The report's "config": the run's settings as run (the models as loaded), its prompts and versions."""
    import transformers

    from specgrove.version import __version__

    sorted_draft, device = config.sorted_draft, config.device
    return {
        "target": str(config.target),
        "draft": str(draft) if draft is not None else None,
        "methods": methods,
        "sorted_draft": None if sorted_draft is None else str(getattr(sorted_draft, "path", sorted_draft)),
        "interleave": config.interleave,
        "num_speculative_tokens": config.num_speculative_tokens,
        "prompt_lookup_min": config.prompt_lookup_min,
        "prompt_lookup_max": config.prompt_lookup_max,
        "tree_acceptance": (
            None if acceptance is None else {"file": str(config.tree_acceptance), **acceptance.to_dict()}
        ),
        "max_new_tokens": config.max_new_tokens,
        "temperature": config.temperature,
        "seed": config.seed,
        "dtype": record.loaded_as["dtype"],
        "device": str(device),
        "quantization": record.loaded_as["quantization"],
        "draft_quantization": record.loaded_as["draft_quantization"],
        "draft_vocab": config.draft_vocab,
        "cuda_graphs": str(device).startswith("cuda") and not config.enforce_eager,
        "warmup": config.warmup,
        "warmup_max_new_tokens": min(config.max_new_tokens, WARMUP_MAX_NEW_TOKENS),
        "data": str(data_path) if data_path else None,
        "num_prompts": len(prompts),
        "categories": list(dict.fromkeys(p.category for p in prompts)),
        "question_ids": [p.question_id for p in prompts],
        "prompt_tokens": [len(p.token_ids) for p in prompts],
        "target_weight_bytes": record.weight_bytes["target"],
        "draft_weight_bytes": record.weight_bytes["draft"],
        "versions": {
            "specgrove": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "wall_time_s": time.perf_counter() - started,
    }


# ---- the runner ------------------------------------------------------------------------------------
def run_bench(config: BenchConfig, *, progress: bool = True, log=None) -> dict:
    """Run every method of `config` over its prompts and return the figures (see the module docstring).

    The target (and the draft, when a method needs one) are loaded once and shared by the engine methods;
    the hf_* methods load transformers models from the same converted directories afterwards, and
    llama_cpp the target's GGUF file. `log`: where progress notes go (default: stderr).
    """
    say = log or _say
    started = time.perf_counter()
    config.validate()  # everything cheap before anything loads (again: the config may have changed since made)
    questions, data_path = _questions(config)
    methods = config.run_order()
    draft = _draft_for(config, methods)
    acceptance = _acceptance(config, say)
    machine = _machine(config.device)
    if config.measure_bandwidth:
        _measure_bandwidth(machine, "start", config, say)

    models = _load_models(config, methods, draft, say)
    prompts = _bench_prompts(config, questions, models.target)
    plan = _EnginePlan.of(config, methods, models, prompts)
    record = models.record(methods)
    say(
        f"{len(prompts)} prompts ({len(set(p.category for p in prompts))} categories), methods: {', '.join(methods)}; "
        f"k={config.num_speculative_tokens}, max_new_tokens={config.max_new_tokens}, "
        f"temperature={config.temperature}"
    )
    runs = _run_engine_methods(plan, methods, prompts, config, progress)
    trees = _tree_figures(plan.shapes, acceptance)
    plan = models = None  # freed before a peer loads its own copy of the weights
    runs.update(_run_hf_methods(record, methods, prompts, config, progress))
    if "llama_cpp" in methods:
        runs["llama_cpp"] = _run_llama_cpp(record, prompts, config, progress)
    if config.measure_bandwidth:
        _measure_bandwidth(machine, "end", config, say)

    method_figures = summarize(runs, prompts, config.sampling_params().greedy, record.weight_bytes)
    for method, tree in trees.items():
        if method in method_figures:
            method_figures[method].update(tree)
    return {
        "config": _config_record(config, methods, draft, acceptance, data_path, prompts, record, started),
        "machine": machine,
        "baseline_weight_bandwidth_gbs": _baseline_bandwidth(runs, record.weight_bytes["target"]),
        "methods": method_figures,
    }


# ---- report ----------------------------------------------------------------------------------------
def _fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def _identical(entry: dict, key: str = "identical_to_baseline", count_key: str = "identical_count") -> str:
    if entry.get(key) is None:
        return "—"
    return f"{'yes' if entry[key] else 'NO'} {entry[count_key]}/{entry['num_prompts']}"


def _headline(config: dict) -> str:
    return (
        f"Spec-Bench: {config['num_prompts']} prompts, target {config['target']}"
        f"{', draft ' + config['draft'] if config.get('draft') else ''}, {config['dtype']} on {config['device']}, "
        f"k={config['num_speculative_tokens']}, max_new_tokens={config['max_new_tokens']}, "
        f"temperature={config['temperature']}, warmup={config['warmup']}"
    )


def _method_table(methods: dict):
    """One row per method: speed, speedups, tau, identical outputs, time and weight bandwidth per forward."""
    from rich.table import Table

    table = Table()
    for name in (
        "method",
        "tokens/s",
        "speedup",
        "vs plain",
        "tau",
        "pred. tau",
        "accept",
        "identical",
        "identical vs plain",
        "ms/target fwd",
        "target GB/s",
        "ms/draft fwd",
        "draft GB/s",
    ):
        table.add_column(name, justify="left" if name == "method" else "right")
    for method, e in methods.items():
        hf = "speedup_vs_plain" in e
        table.add_row(
            method,
            _fmt(e["tokens_per_s"]),
            _fmt(e["speedup"], ".2f", "x") + f" ({e['baseline']})",
            _fmt(e["speedup_vs_plain"], ".2f", "x") if hf else _fmt(e["speedup"], ".2f", "x"),
            _fmt(e["mean_accept_length"]),
            _fmt(e.get("predicted_accept_length")),
            _fmt(e["acceptance_rate"], ".1%"),
            _identical(e),
            _identical(e, "identical_to_plain", "identical_to_plain_count") if hf else _identical(e),
            _fmt(e.get("target_ms_per_forward"), ".1f"),
            _fmt(e.get("target_weight_gbs"), ".1f"),
            _fmt(e.get("draft_ms_per_forward"), ".1f"),
            _fmt(e.get("draft_weight_gbs"), ".1f"),
        )
    return table


def _exit_count_lines(methods: dict) -> list[str]:
    """Adaptive sorted drafting: the share of draft tokens from each exit."""
    lines = []
    for method, e in methods.items():
        if e.get("exit_counts"):
            total = sum(e["exit_counts"].values())
            lines.append(
                f"{method}: draft tokens per exit "
                + ", ".join(f"{layer} layers {n / total:.0%}" for layer, n in e["exit_counts"].items())
            )
    return lines


def _category_table(methods: dict, categories: list[str]):
    from rich.table import Table

    per_cat = Table(title="per category: tokens/s, speedup over the method's baseline, tau", title_justify="left")
    per_cat.add_column("category")
    per_cat.add_column("n", justify="right")
    for method in methods:
        per_cat.add_column(method, justify="right")
    for c in categories:
        first = next(iter(methods.values()))["per_category"][c]
        cells = []
        for e in methods.values():
            f = e["per_category"][c]
            cell = f"{f['tokens_per_s']:.2f} {_fmt(f['speedup'], '.2f', 'x')}"
            if f["mean_accept_length"] is not None:
                cell += f" τ{f['mean_accept_length']:.2f}"
            if f["identical_to_baseline"] is False:
                cell += " ≠"
            cells.append(cell)
        per_cat.add_row(c, str(first["num_prompts"]), *cells)
    return per_cat


def _bandwidth_line(result: dict) -> str:
    """The machine's bandwidth runs, and plain decoding's weight bandwidth as a share of them."""
    runs = result["machine"].get("bandwidth_runs") or []
    reads = [r["read_gbs"] for r in runs]
    achieved = result.get("baseline_weight_bandwidth_gbs")
    line = "memory bandwidth: " + (
        ", ".join(f"{r['when']} read {r['read_gbs']:.1f} / copy {r['copy_gbs']:.1f} GB/s" for r in runs)
        or "not measured"
    )
    line += f"; plain decoding reads the target's weights at {_fmt(achieved, '.1f', ' GB/s')}"
    if reads and achieved:  # the machine's bandwidth moves with its neighbours' load: the share against each
        low, high = achieved / max(reads), achieved / min(reads)
        line += f" ({low:.0%} of the highest read bandwidth"
        line += f", {high:.0%} of the lowest)" if len(reads) > 1 else ")"
    return line


def print_report(result: dict, console=None) -> None:
    """The method table, the per-category table, and the bandwidth line."""
    from rich.console import Console

    if console is None:
        console = Console(width=None if sys.stdout.isatty() else 160)
    config, methods = result["config"], result["methods"]
    console.print(_headline(config))
    console.print(_method_table(methods))
    for line in _exit_count_lines(methods):
        console.print(line)
    console.print(_category_table(methods, config["categories"]))
    console.print(_bandwidth_line(result))
    if any(f["identical_to_baseline"] is False for e in methods.values() for f in e["per_category"].values()):
        console.print("≠: in this category at least one output differs from the baseline's")
    console.print(f"wall time {config['wall_time_s']:.0f} s")
