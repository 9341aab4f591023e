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

import gc
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from specgrove.bench.questions import (  # noqa: F401 (the benchmark's prompt API)
    SPEC_BENCH_ENV,
    SPEC_BENCH_RELATIVE,
    BenchPrompt,
    encode_questions,
    find_spec_bench,
    load_questions,
)
from specgrove.config import GRAMMAR, SpeculativeConfig, method_fields
from specgrove.engine.metrics import SpecMetrics
from specgrove.models import defaults
from specgrove.trees.shape import TreeShape

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


def engine_config(method: str, num_speculative_tokens: int, prompt_lookup_min: int = 1,
                  prompt_lookup_max: int = 3) -> SpeculativeConfig:
    """The validated config of an engine method with the bench's k and prompt-lookup settings."""
    fields = engine_fields(method)
    if fields is None:
        raise ValueError(f"{method!r} is not an engine method of the bench; use {BENCH_GRAMMAR}")
    return SpeculativeConfig.of_fields({**fields, "num_speculative_tokens": num_speculative_tokens,
                                        "prompt_lookup_min": prompt_lookup_min, "prompt_lookup_max": prompt_lookup_max})


BENCH_GRAMMAR = f"{', '.join(DEFAULT_METHODS + PEER_METHODS)}, or a method: {GRAMMAR.removeprefix('none, ')}"


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
    if not out:
        raise ValueError("no prompts to run")
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
    order = (list(ENGINE_METHODS) + [m for m in methods if is_tree_method(m)] + [m for m in methods if is_sorted_method(m)]
             + list(HF_METHODS) + list(PEER_METHODS))
    return [m for m in order if m in methods]


# ---- running ---------------------------------------------------------------------------------------
def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="prompt", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def _warm_up(engine, prompts: list[BenchPrompt], warmup_params, warmup: int) -> None:
    for i in range(warmup):
        engine.generate(engine.new_sequence(prompts[i % len(prompts)].token_ids, warmup_params))


def _timed_prompt(engine, prompt: BenchPrompt, params, run: "MethodRun"):
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


def _run_engine_method(engine, prompts: list[BenchPrompt], params, warmup_params, warmup: int, progress: bool,
                       desc: str) -> MethodRun:
    _warm_up(engine, prompts, warmup_params, warmup)
    run = MethodRun()
    with _progress(len(prompts), desc, progress) as bar:
        for p in prompts:
            seq = _timed_prompt(engine, p, params, run)
            bar.set_postfix(tok_s=f"{sum(map(len, run.outputs)) / sum(run.seconds):.2f}",
                            tau=f"{seq.metrics.mean_accept_length:.2f}")
            bar.update()
    return run


def _run_interleaved(engines: dict, prompts: list[BenchPrompt], params, warmup_params, warmup: int,
                     progress: bool) -> dict[str, "MethodRun"]:
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


def _record_exit_counts(run: "MethodRun", engine) -> None:
    """Adaptive sorted drafting: how often each exit drafted (warm-up included)."""
    if engine.proposer is not None and engine.proposer.exit_counts is not None:
        run.exit_counts = {str(e): n for e, n in sorted(engine.proposer.exit_counts.items())}


def _run_peer_method(generate, prompts: list[BenchPrompt], warmup: int, progress: bool, desc: str,
                     **gen_kwargs) -> MethodRun:
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
        "draft_time_s": merged.draft_time_s,  # the draft phase, the draft's own prompt prefill included
        "target_time_s": merged.target_time_s,  # the target's step forwards
        "prefill_time_s": merged.prefill_time_s,  # the target's prompt prefill
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


def _figures(run: MethodRun, idx: list[int], is_speculative: bool, baseline: MethodRun | None, greedy: bool,
             is_hf: bool = False, plain: MethodRun | None = None, weight_bytes: dict | None = None) -> dict:
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


def summarize(runs: dict[str, MethodRun], prompts: list[BenchPrompt], greedy: bool,
              weight_bytes: dict | None = None) -> dict:
    """`weight_bytes`: {"target": bytes, "draft": bytes} for the weight bandwidth of each forward."""
    categories = list(dict.fromkeys(p.category for p in prompts))
    all_idx = list(range(len(prompts)))
    result = {}
    for method, run in runs.items():
        baseline = runs.get(baseline_of(method))
        speculative = method not in ("plain", "hf_plain") + PEER_METHODS

        def figures(idx: list[int]) -> dict:
            return _figures(run, idx, speculative, baseline, greedy, method in HF_METHODS, runs.get("plain"),
                            weight_bytes)

        entry = {"baseline": baseline_of(method), **figures(all_idx)}
        entry["per_category"] = {c: figures([i for i, p in enumerate(prompts) if p.category == c]) for c in categories}
        if run.exit_counts is not None:
            entry["exit_counts"] = run.exit_counts
        entry["per_prompt"] = [
            {"question_id": p.question_id, "category": p.category, "generated_tokens": len(run.outputs[i]),
             "time_s": run.seconds[i],
             "mean_accept_length": run.metrics[i].mean_accept_length if (speculative and run.metrics[i]) else None,
             "identical_to_baseline": (run.outputs[i] == baseline.outputs[i]) if (greedy and baseline) else None}
            for i, p in enumerate(prompts)
        ]
        result[method] = entry
    return result


# ---- the runner ------------------------------------------------------------------------------------
def run_bench(
    target: str | os.PathLike = defaults.DEFAULT_TARGET,
    draft: str | os.PathLike | None = None,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    prompts: Sequence[BenchPrompt | Sequence[int]] | None = None,
    data: str | os.PathLike | None = None,
    limit: int | None = 20,
    categories: Sequence[str] | None = None,
    num_speculative_tokens: int = 4,
    prompt_lookup_min: int = 1,
    prompt_lookup_max: int = 3,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    seed: int | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | None = "cpu",
    warmup: int = 1,
    measure_bandwidth: bool = True,
    bandwidth_num_floats: int | None = None,
    progress: bool = True,
    log=None,
    interleave: bool = False,
    tree_acceptance: str | os.PathLike | None = None,
    quantization: str | None = "auto",
    draft_quantization: str | None = "auto",
    draft_vocab: int | None = None,
    sorted_draft=None,
    enforce_eager: bool = False,
) -> dict:
    """Run every method in `methods` over the prompts and return the figures (see the module docstring).

    `prompts`: token-id prompts (BenchPrompt, or plain lists of ids, category "custom") instead of
    Spec-Bench questions; then `data`, `limit` and `categories` are unused and no tokenizer is needed.
    `sorted_draft` (a path or an already loaded LoadedModel, so one copy can serve several targets) is
    the draft of the sorted / sorted@L methods. `interleave`: the engine methods take turns prompt by
    prompt (`_run_interleaved`) instead of one method over every prompt, then the next.
    The target (and the draft, when a method needs one) are loaded once and shared by the engine methods;
    the hf_* methods load transformers models from the same converted directories afterwards.
    """
    from specgrove.bench.bandwidth import DEFAULT_NUM_FLOATS, measure_memory_bandwidth
    from specgrove.bench.hf_peer import HFPeer
    from specgrove.drafting.factory import build_proposer, shape_size
    from specgrove.engine.engine import SpecEngine, eos_token_ids
    from specgrove.models.loader import check_compatible, load_model
    from specgrove.sampling import SamplingParams
    from specgrove.tuning import resolve_shape

    say = log or (lambda msg: print(f"[specgrove] {msg}", file=sys.stderr, flush=True))
    started = time.perf_counter()

    # Validate everything cheap before loading anything.
    methods = _ordered_methods(methods)
    if not isinstance(num_speculative_tokens, int) or num_speculative_tokens < 1:
        raise ValueError(f"num_speculative_tokens (k) must be an integer >= 1 for the benchmark, got {num_speculative_tokens!r}")
    if not (1 <= prompt_lookup_min <= prompt_lookup_max):
        raise ValueError(f"prompt lookup needs 1 <= min <= max, got {prompt_lookup_min}, {prompt_lookup_max}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    params = SamplingParams(temperature=temperature, top_p=1.0, top_k=0, min_p=0.0, seed=seed, max_tokens=max_new_tokens)
    warmup_params = SamplingParams(temperature=temperature, seed=seed, max_tokens=min(max_new_tokens, WARMUP_MAX_NEW_TOKENS))
    questions = None
    data_path = None
    if prompts is None:
        data_path = find_spec_bench(data)
        questions = load_questions(data_path, limit, categories)
    if "llama_cpp" in methods:
        from specgrove.bench.llamacpp_peer import require_llama_cpp

        require_llama_cpp()
    drafted = [m for m in methods if needs_draft(m)]
    sorted_methods = [m for m in methods if is_sorted_method(m)]
    if sorted_methods and sorted_draft is None:
        raise ValueError(f"methods {', '.join(sorted_methods)} need a sorted draft: pass --sorted-draft DIR "
                         "(made by `specgrove train-sorted`)")
    if drafted and draft is None:
        if str(target) != defaults.DEFAULT_TARGET:
            raise ValueError(f"methods {', '.join(drafted)} need a draft model: pass --draft")
        draft = defaults.DEFAULT_DRAFT
    acceptance = None
    if tree_acceptance is not None:
        from specgrove.trees.sequoia import AcceptanceVector, load_tree_file

        acceptance = AcceptanceVector.from_dict(load_tree_file(tree_acceptance)[1]["acceptance"])
        if not acceptance.matches(params):
            say(f"note: the acceptance vector in {tree_acceptance} was measured at temperature {acceptance.temperature}, "
                f"top_p {acceptance.top_p}; this run samples at temperature {temperature}")

    from specgrove.cpu import cpu_features
    machine = {"device": str(device), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "platform": platform.platform(), "cpu": cpu_features().as_dict(),
               "memory_bandwidth_gbs": None, "read_bandwidth_gbs": None}

    def bandwidth(when: str) -> None:
        bw = measure_memory_bandwidth(bandwidth_num_floats or DEFAULT_NUM_FLOATS, device=device or "cpu")
        machine.update(bw.to_dict() if when == "start" else {})
        machine.setdefault("bandwidth_runs", []).append({"when": when, "read_gbs": bw.read_bandwidth_gbs,
                                                         "copy_gbs": bw.memory_bandwidth_gbs})
        say(f"memory bandwidth at the {when}: read {bw.read_bandwidth_gbs:.1f} GB/s, copy (read + write) "
            f"{bw.memory_bandwidth_gbs:.1f} GB/s")

    if measure_bandwidth:
        bandwidth("start")

    graphs = False if enforce_eager else None  # CUDA graphs (on a GPU only)
    target_model = load_model(target, dtype=dtype, device=device, quantization=quantization, cuda_graphs=graphs)
    say(f"loaded target {target_model.name} ({target_model.dtype}) in {target_model.load_seconds:.1f} s")
    loaded_as = {"dtype": str(target_model.dtype).removeprefix("torch."),
                 "quantization": getattr(target_model.model, "quantization", None), "draft_quantization": None}
    draft_model = None
    if drafted:
        draft_model = load_model(draft, dtype=dtype, device=device, quantization=draft_quantization, cuda_graphs=graphs,
                                 head_vocab=draft_vocab)
        check_compatible(target_model, draft_model)
        loaded_as["draft_quantization"] = getattr(draft_model.model, "quantization", None)
        say(f"loaded draft {draft_model.name} in {draft_model.load_seconds:.1f} s")
    sorted_model = None
    if sorted_methods:
        from specgrove.models.loader import LoadedModel

        sorted_model = sorted_draft if isinstance(sorted_draft, LoadedModel) else load_model(
            sorted_draft, dtype=dtype, device=device, quantization=draft_quantization, cuda_graphs=graphs)
        check_compatible(target_model, sorted_model)

    bench_prompts = encode_questions(questions, target_model.tokenizer) if prompts is None else _as_prompts(prompts)
    k = num_speculative_tokens
    configs = {m: engine_config(m, k, prompt_lookup_min, prompt_lookup_max) for m in methods if engine_fields(m)}
    draft_of = {m: sorted_model if is_sorted_method(m) else draft_model for m in configs}
    shapes = {m: resolve_shape(c, target_model, draft_of[m]) for m, c in configs.items() if c.tree is not None}
    shapes["draft_model"] = TreeShape.chain(k)
    longest = max([k] + [shape_size(shape) for shape in shapes.values()])
    max_model_len = max(len(p.token_ids) for p in bench_prompts) + max_new_tokens + longest + 8
    weight_bytes = target_model.model.weight_bytes()
    draft_weight_bytes = draft_model.model.weight_bytes() if draft_model is not None and draft_model.is_fast else None
    target_dir, draft_dir = target_model.path, draft_model.path if draft_model is not None else None
    gguf_path = None
    if "llama_cpp" in methods:
        from specgrove.bench.llamacpp_peer import gguf_of

        gguf_path = gguf_of(target_dir)  # fail now, not after the engine methods ran
    eos_ids = sorted(eos_token_ids(target_model))
    say(f"{len(bench_prompts)} prompts ({len(set(p.category for p in bench_prompts))} categories), "
        f"methods: {', '.join(methods)}; k={k}, max_new_tokens={max_new_tokens}, temperature={temperature}")

    def engine_for(method: str) -> SpecEngine:
        proposer, num_draft = build_proposer(configs[method], target_model, draft_of[method], max_model_len,
                                             shape=shapes.get(method))
        return SpecEngine(target_model, proposer, num_draft, max_model_len)

    runs: dict[str, MethodRun] = {}
    engine_methods = [m for m in methods if m not in HF_METHODS + PEER_METHODS]
    if interleave:
        engines = {m: engine_for(m) for m in engine_methods}
        runs.update(_run_interleaved(engines, bench_prompts, params, warmup_params, warmup, progress))
        for method, engine in engines.items():
            _record_exit_counts(runs[method], engine)
    else:
        for method in engine_methods:
            engine = engine_for(method)  # one method's engine (and draft caches) alive at a time
            runs[method] = _run_engine_method(engine, bench_prompts, params, warmup_params, warmup, progress, method)
            _record_exit_counts(runs[method], engine)
    engine = engines = None

    hf_methods = [m for m in methods if m in HF_METHODS]
    if hf_methods:
        # Free the engine's copies before transformers loads its own: one set of weights in memory at a time.
        target_model = draft_model = sorted_model = None
        gc.collect()
        peer = HFPeer(target_dir, draft_dir if "hf_assisted" in hf_methods else None, dtype, device or "cpu", eos_ids)
        try:
            for method in hf_methods:
                runs[method] = _run_peer_method(
                    lambda ids, **kw: peer.generate(ids, method, **kw), bench_prompts, warmup, progress, method,
                    max_new_tokens=max_new_tokens, num_speculative_tokens=k, temperature=temperature, seed=seed,
                    prompt_lookup_max=prompt_lookup_max)
        finally:
            peer.close()
    if "llama_cpp" in methods:
        from specgrove.bench.llamacpp_peer import LlamaCppPeer

        target_model = draft_model = sorted_model = None
        gc.collect()
        n_ctx = max(len(p.token_ids) for p in bench_prompts) + max_new_tokens + 8
        with LlamaCppPeer(gguf_path, n_ctx, eos_ids) as peer:
            runs["llama_cpp"] = _run_peer_method(peer.generate, bench_prompts, warmup, progress, "llama_cpp",
                                                 max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    if measure_bandwidth:
        bandwidth("end")

    greedy = params.greedy
    method_figures = summarize(runs, bench_prompts, greedy, {"target": weight_bytes, "draft": draft_weight_bytes})
    for method, shape in shapes.items():
        if method in method_figures:
            fixed = isinstance(shape, TreeShape)
            method_figures[method]["tree"] = shape.to_dict() if fixed else "auto"
            # P[rank] is measured for siblings drawn without replacement: it predicts only those trees
            predicted = (fixed and acceptance is not None and tree_sampling_of(method) == "without_replacement"
                         and not is_sorted_method(method))  # the vector is the draft model's, not an exit's
            method_figures[method]["predicted_accept_length"] = (
                shape.expected_accept_length(acceptance.values) if predicted else None)
    baseline_bandwidth = None
    plain = _merge(runs["plain"].metrics) if "plain" in runs else None
    if plain is not None and plain.target_time_s > 0:
        baseline_bandwidth = weight_bytes * plain.target_forwards / plain.target_time_s / 1e9

    import transformers

    from specgrove.version import __version__

    return {
        "config": {
            "target": str(target), "draft": str(draft) if draft is not None else None, "methods": methods,
            "sorted_draft": None if sorted_draft is None else str(getattr(sorted_draft, "path", sorted_draft)),
            "interleave": interleave,
            "num_speculative_tokens": k, "prompt_lookup_min": prompt_lookup_min, "prompt_lookup_max": prompt_lookup_max,
            "tree_acceptance": None if acceptance is None else {"file": str(tree_acceptance), **acceptance.to_dict()},
            "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed,
            "dtype": loaded_as["dtype"],
            "device": str(device), "quantization": loaded_as["quantization"],
            "draft_quantization": loaded_as["draft_quantization"],
            "draft_vocab": draft_vocab,
            "cuda_graphs": str(device).startswith("cuda") and not enforce_eager,
            "warmup": warmup, "warmup_max_new_tokens": min(max_new_tokens, WARMUP_MAX_NEW_TOKENS),
            "data": str(data_path) if data_path else None, "num_prompts": len(bench_prompts),
            "categories": list(dict.fromkeys(p.category for p in bench_prompts)),
            "question_ids": [p.question_id for p in bench_prompts],
            "prompt_tokens": [len(p.token_ids) for p in bench_prompts],
            "target_weight_bytes": weight_bytes, "draft_weight_bytes": draft_weight_bytes,
            "versions": {"specgrove": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                         "python": platform.python_version()},
            "wall_time_s": time.perf_counter() - started,
        },
        "machine": machine,
        "baseline_weight_bandwidth_gbs": baseline_bandwidth,
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
    return (f"Spec-Bench: {config['num_prompts']} prompts, target {config['target']}"
            f"{', draft ' + config['draft'] if config.get('draft') else ''}, {config['dtype']} on {config['device']}, "
            f"k={config['num_speculative_tokens']}, max_new_tokens={config['max_new_tokens']}, "
            f"temperature={config['temperature']}, warmup={config['warmup']}")


def _method_table(methods: dict):
    """One row per method: speed, speedups, tau, identical outputs, time and weight bandwidth per forward."""
    from rich.table import Table

    table = Table()
    for name in ("method", "tokens/s", "speedup", "vs plain", "tau", "pred. tau", "accept", "identical",
                 "identical vs plain", "ms/target fwd", "target GB/s", "ms/draft fwd", "draft GB/s"):
        table.add_column(name, justify="left" if name == "method" else "right")
    for method, e in methods.items():
        hf = "speedup_vs_plain" in e
        table.add_row(
            method, _fmt(e["tokens_per_s"]), _fmt(e["speedup"], ".2f", "x") + f" ({e['baseline']})",
            _fmt(e["speedup_vs_plain"], ".2f", "x") if hf else _fmt(e["speedup"], ".2f", "x"),
            _fmt(e["mean_accept_length"]), _fmt(e.get("predicted_accept_length")), _fmt(e["acceptance_rate"], ".1%"),
            _identical(e),
            _identical(e, "identical_to_plain", "identical_to_plain_count") if hf else _identical(e),
            _fmt(e.get("target_ms_per_forward"), ".1f"), _fmt(e.get("target_weight_gbs"), ".1f"),
            _fmt(e.get("draft_ms_per_forward"), ".1f"), _fmt(e.get("draft_weight_gbs"), ".1f"),
        )
    return table


def _exit_count_lines(methods: dict) -> list[str]:
    """Adaptive sorted drafting: the share of draft tokens from each exit."""
    lines = []
    for method, e in methods.items():
        if e.get("exit_counts"):
            total = sum(e["exit_counts"].values())
            lines.append(f"{method}: draft tokens per exit " + ", ".join(
                f"{layer} layers {n / total:.0%}" for layer, n in e["exit_counts"].items()))
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
    line = "memory bandwidth: " + (", ".join(f"{r['when']} read {r['read_gbs']:.1f} / copy {r['copy_gbs']:.1f} GB/s"
                                             for r in runs) or "not measured")
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
