"""The `specgrove` command: generate | bench | models.

  specgrove generate [--prompt TEXT | --chat MESSAGE | --prompt-ids 1,2,3] [--method METHOD] ...
  specgrove bench [--limit 20] [--methods plain,draft_model,tree:kary:2x3,...] [--json PATH] ...
  specgrove tune [--method tree:auto] [--temperature T] [--out tree.json]   Sequoia: acceptance vector, profile,
                                         DP, best tree (default --out: the cache file the method's 'auto' reads)
  specgrove multidraft [--depths 2,3,4,5] --json r.json --plot r.png   SpecHub vs RRS vs RRS w/o, OTM bound
  specgrove models list | fetch [NAMES...] | verify [NAMES...]

Bad input (an invalid sampling setting, a missing model, ...) exits with status 2 and one line
`error: ...` on stderr; `models verify` exits 1 when a file fails its check.
"""

from __future__ import annotations

import argparse
import json
import sys

from specgrove.cli_options import (
    _budget_list,
    _float_list,
    _int_list,
    _method_list,
    _name_list,
    build_llm,
    eagle_head_option,
    model_options,
    speculative_options,
)
from specgrove.config import grammar, method_name
from specgrove.sampling import (
    MAX_LOGPROBS,
    MAX_N,
    MAX_PENALTY,
    MAX_REPETITION_PENALTY,
    MIN_REPETITION_PENALTY,
)

EXAMPLE_CHAT = "Write a Python function that checks whether a number is prime."
EXIT_BAD_INPUT = 2


# ---- parser ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from specgrove.serve.cli import add_parsers as add_serve_parsers
    from specgrove.train.cli import add_calibrate_parser
    from specgrove.train.cli import add_parser as add_train_sorted
    from specgrove.train.eagle_cli import add_parser as add_train_eagle

    parser = argparse.ArgumentParser(prog="specgrove", description="Lossless speculative decoding engine.")
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="{generate,bench,tune,multidraft,train-sorted,calibrate-sorted,train-eagle,serve,profile,models}",
    )
    for add in (
        _add_generate,
        _add_bench,
        _add_tune,
        _add_multidraft,
        add_train_sorted,
        add_calibrate_parser,
        add_train_eagle,
        add_serve_parsers,
        _add_models,
    ):
        add(sub)
    return parser


def _add_generate(sub) -> None:
    g = sub.add_parser("generate", help="generate one completion and print the speculation statistics")
    source = g.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="a raw text prompt (no chat template)")
    source.add_argument("--chat", help="a user message, sent through the target's chat template")
    source.add_argument(
        "--prompt-ids", type=_int_list, help="the prompt as token ids, e.g. 1,2,3 (models without a tokenizer)"
    )
    model_options(g)
    speculative_options(g)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument(
        "--n",
        type=int,
        default=1,
        help=f"independent completions of the prompt, 1..{MAX_N} (default 1); with --seed, completion 0 uses it "
        "and completion i a seed derived from it, as the server's choice i",
    )
    g.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help=f"in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}]: the logits of tokens already in the "
        "prompt or output are divided by it where positive, multiplied where negative (1 = none, default)",
    )
    g.add_argument(
        "--presence-penalty",
        type=float,
        default=0.0,
        help=f"in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]: subtracted from the logit of every token already in the "
        "output (0 = none, default)",
    )
    g.add_argument(
        "--frequency-penalty",
        type=float,
        default=0.0,
        help=f"in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]: subtracted from a token's logit once per time it occurs "
        "in the output (0 = none, default)",
    )
    g.add_argument(
        "--logprobs",
        type=int,
        default=None,
        metavar="K",
        help=f"print each generated token's log-probability under the target and the K most likely tokens at its "
        f"position with theirs, 0..{MAX_LOGPROBS} (the target's raw log-softmax, before penalties and temperature)",
    )
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--max-model-len", type=int, default=4096)
    g.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object instead of text and statistics: choice 0's text, token_ids, finish_reason and "
        "logprobs, every choice under 'choices', and the statistics",
    )
    g.set_defaults(func=cmd_generate)


def _add_bench(sub) -> None:
    from specgrove.bench.spec_bench import DEFAULT_METHODS

    b = sub.add_parser("bench", help="run Spec-Bench prompts through several methods and compare them")
    b.add_argument(
        "--data",
        default=None,
        help="Spec-Bench question.jsonl (default: $SPECGROVE_SPEC_BENCH, else "
        "shared/data/spec_bench/question.jsonl in a parent directory)",
    )
    b.add_argument("--limit", type=int, default=20, help="number of prompts, mixed categories round-robin (default 20)")
    b.add_argument("--categories", type=_name_list, default=None, help="comma list of categories to keep")
    b.add_argument(
        "--methods",
        type=_method_list,
        default=list(DEFAULT_METHODS),
        help=f"comma list (default {','.join(DEFAULT_METHODS)}); also llama_cpp and any speculative "
        f"method but none: {grammar().removeprefix('none, ')}",
    )
    model_options(b)
    b.add_argument("-k", "--num-speculative-tokens", type=int, default=4)
    b.add_argument(
        "--tree-acceptance",
        default=None,
        metavar="TREE_JSON",
        help="a `specgrove tune` file: its acceptance vector gives each tree method's predicted tau",
    )
    b.add_argument("--prompt-lookup-min", type=int, default=1)
    b.add_argument("--prompt-lookup-max", type=int, default=3)
    b.add_argument("--max-new-tokens", type=int, default=128)
    b.add_argument("--temperature", type=float, default=0.0)
    b.add_argument("--seed", type=int, default=None)
    b.add_argument(
        "--warmup", type=int, default=1, help="warm-up prompts per method, excluded from figures (default 1)"
    )
    b.add_argument(
        "--interleave",
        action="store_true",
        help="the engine methods take turns prompt by prompt, so a machine whose speed drifts slows them "
        "alike (default: one method over every prompt, then the next)",
    )
    b.add_argument(
        "--sorted-draft",
        default=None,
        metavar="DIR",
        help="the sorted draft (S2D) of the methods sorted, sorted@L, sorted@L:TREE and sorted@L1+L2 "
        "(made by `specgrove train-sorted`)",
    )
    eagle_head_option(b)
    b.add_argument(
        "--targets",
        type=_name_list,
        default=None,
        help="several targets, one after the other in this process, sharing one loaded sorted draft "
        "(S2D's multi-target report); overrides --target",
    )
    b.add_argument("--no-bandwidth", action="store_true", help="skip the memory-bandwidth measurement")
    b.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write the full results as JSON")
    b.set_defaults(func=cmd_bench)


def _add_tune(sub) -> None:
    t = sub.add_parser("tune", help="Sequoia: measure the acceptance vector, profile this machine, choose the tree")
    model_options(t)
    t.add_argument(
        "--method",
        default="tree:auto",
        help="the tree method to tune, with its tree 'auto': tree:auto (default), rrs:auto, rrs_wo:auto, "
        "spechub:auto, or eagle:auto (a draft head's tree; --eagle-head); other strings are refused",
    )
    eagle_head_option(t)
    t.add_argument("--temperature", type=float, default=0.0, help="the sampling setting to tune for (0 = greedy)")
    t.add_argument("--top-p", type=float, default=1.0)
    t.add_argument("--top-k", type=int, default=0)
    t.add_argument("--seed", type=int, default=0, help="seed of the generated tuning text (default 0)")
    t.add_argument(
        "--prompts",
        type=int,
        default=8,
        help="Spec-Bench prompts to generate tuning text from (questions 21.., disjoint from bench's first 20)",
    )
    t.add_argument("--data", default=None, help="Spec-Bench question.jsonl (default: as bench)")
    t.add_argument("--max-new-tokens", type=int, default=96)
    t.add_argument("--width", type=int, default=16, help="siblings measured per position (acceptance vector length)")
    t.add_argument(
        "--budgets", type=_budget_list, default=[1, 2, 4, 8, 16, 32, 64], help="node budgets (default 1,2,...,64)"
    )
    t.add_argument("--max-depth", type=int, default=10)
    t.add_argument("--repeats", type=int, default=5, help="timed repeats per profiled forward (median)")
    t.add_argument(
        "--acceptance",
        default=None,
        metavar="TREE_JSON",
        help="reuse the acceptance vector of an earlier tune file (same sampling setting) instead of measuring",
    )
    t.add_argument(
        "--profile",
        default=None,
        metavar="TREE_JSON",
        help="reuse the machine profile of an earlier tune file (same machine, models and dtype) instead "
        "of timing forwards; with --acceptance too, no model is loaded",
    )
    t.add_argument(
        "--out",
        default=None,
        help="write the best tree here (JSON; default: the cache file that the method's tree 'auto' reads "
        "for this target, draft, dtype and sampling setting, so it needs no tuning on first use)",
    )
    t.add_argument(
        "--budget-trees",
        action="store_true",
        help="also write the best tree of every budget next to --out (NAME_bN.json)",
    )
    t.set_defaults(func=cmd_tune)


def _add_multidraft(sub) -> None:
    from specgrove.models import defaults

    md = sub.add_parser(
        "multidraft",
        help="SpecHub vs RRS vs RRS without replacement: one-step acceptance on real "
        "(p, q) pairs next to the OTM bound; binary-tree tau by depth",
    )
    md.add_argument("--target", default=defaults.DEFAULT_TARGET)
    md.add_argument("--draft", default=None)
    md.add_argument("--dtype", default="auto")
    md.add_argument("--device", default="cpu")
    md.add_argument("--temperatures", type=_float_list, default=[0.6, 1.0], help="default 0.6,1.0")
    md.add_argument(
        "--prompts", type=int, default=4, help="prompts whose target text gives the (p, q) pairs (default 4)"
    )
    md.add_argument("--max-new-tokens", type=int, default=64, help="tokens of target text per prompt (default 64)")
    md.add_argument("--top", type=int, default=50, help="tokens kept per pair for the OTM linear program (default 50)")
    md.add_argument(
        "--depths",
        type=_budget_list,
        default=[],
        help="binary tree depths to decode with each method, e.g. 2,3,4,5 (default: none; this is the slow part)",
    )
    md.add_argument("--limit", type=int, default=20, help="Spec-Bench prompts for the depth table (default 20)")
    md.add_argument("--bench-max-new-tokens", type=int, default=64)
    md.add_argument("--seed", type=int, default=0)
    md.add_argument("--data", default=None, help="Spec-Bench question.jsonl (default: as bench)")
    md.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write the report as JSON")
    md.add_argument("--plot", default=None, metavar="PNG", help="write a plot of the report")
    md.set_defaults(func=cmd_multidraft)


def _add_models(sub) -> None:
    m = sub.add_parser("models", help="list, fetch or verify the built-in models")
    msub = m.add_subparsers(dest="models_command", required=True, metavar="{list,fetch,verify}")
    msub.add_parser("list", help="the built-in models and their cache state").set_defaults(func=cmd_models_list)
    f = msub.add_parser("fetch", help="download, verify and convert (default: the default target and draft)")
    f.add_argument("names", nargs="*")
    f.set_defaults(func=cmd_models_fetch)
    v = msub.add_parser("verify", help="re-hash cached GGUF files against their pins")
    v.add_argument("names", nargs="*")
    v.set_defaults(func=cmd_models_verify)


# ---- generate --------------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    from specgrove.sampling import SamplingParams

    # Validate the request before loading any model, so bad input fails in milliseconds.
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
        max_tokens=args.max_new_tokens,
        stop=args.stop,
        n=args.n,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        logprobs=args.logprobs,
    )
    llm, spec = build_llm(args)
    if args.prompt_ids is not None:
        out = llm.generate(args.prompt_ids, params)[0]
    elif args.prompt is not None:
        out = llm.generate(args.prompt, params)[0]
    else:
        out = llm.chat([{"role": "user", "content": args.chat if args.chat is not None else EXAMPLE_CHAT}], params)
    k = llm.engine.num_speculative_tokens
    method = method_name(spec)  # canonical: "spechub:kary:2x2", not "tree"
    choices = [
        {
            "index": c.index,
            "text": c.text,
            "token_ids": c.token_ids,
            "finish_reason": c.finish_reason,
            "logprobs": None if c.logprobs is None else logprobs_json(llm.tokenizer, c.logprobs),
        }
        for c in out.outputs
    ]
    if args.json:
        first = choices[0]
        print(
            json.dumps(
                {
                    "text": first["text"],
                    "token_ids": first["token_ids"],
                    "finish_reason": first["finish_reason"],
                    "logprobs": first["logprobs"],
                    "choices": choices,
                    "prompt_tokens": len(out.prompt_token_ids),
                    "metrics": out.metrics.to_dict(),
                    "method": method,
                    "k": k,
                }
            )
        )
        return 0
    for choice, completion in zip(choices, out.outputs):
        if len(choices) > 1:
            print(f"=== choice {choice['index']} (finish: {choice['finish_reason']})")
        print(completion.text)
        if choice["logprobs"] is not None:
            print(format_logprobs(choice["logprobs"], args.logprobs))
    finish = ", ".join(str(c["finish_reason"]) for c in choices)
    print(format_stats(out.metrics, method, k, finish))
    return 0


def logprobs_json(tokenizer, entries) -> list[dict]:
    """A choice's `TokenLogprob`s as JSON: per generated token its id, text (None without a tokenizer) and
    log-probability, and the top tokens at its position with theirs, most likely first."""

    def item(token_id: int, logprob: float) -> dict:
        text = tokenizer.decode([token_id]) if tokenizer is not None else None
        return {"token_id": token_id, "token": text, "logprob": logprob}

    return [{**item(e.token_id, e.logprob), "top": [item(t, lp) for t, lp in e.top]} for e in entries]


def format_logprobs(entries: list[dict], top: int) -> str:
    """One line per generated token: position, token, its log-probability, then the top tokens with theirs."""

    def name(entry: dict) -> str:
        return repr(entry["token"]) if entry["token"] is not None else f"#{entry['token_id']}"

    lines = ["--- logprobs (the target's" + (f", top {top})" if top else ")")]
    for i, e in enumerate(entries):
        line = f"{i:>5}  {name(e):<16} {e['logprob']:9.4f}"
        if e["top"]:
            line += "   top: " + "  ".join(f"{name(t)} {t['logprob']:.4f}" for t in e["top"])
        lines.append(line)
    return "\n".join(lines)


def format_stats(metrics, method: str, k: int, finish_reason: str | None) -> str:
    per_position = " ".join(f"{a:.2f}" for a in metrics.per_position_acceptance) or "—"
    speculative = method != "none" and k > 0
    lines = [
        "",
        f"--- {method}" + (f", k={k}" if speculative else ""),
        f"tokens generated      {metrics.generated_tokens} (finish: {finish_reason})",
        f"tokens/s              {metrics.tokens_per_s:.2f} "
        f"({metrics.total_time_s:.2f} s, prefill {metrics.prefill_time_s:.2f} s)",
        f"target forwards       {metrics.target_forwards}",
    ]
    if speculative:
        lines += [
            f"mean accept length τ  {metrics.mean_accept_length:.2f}",
            f"acceptance rate       {metrics.acceptance_rate:.1%}",
            f"per-position accept   {per_position}",
        ]
    lines.append(
        f"time                  draft {metrics.draft_time_s:.2f} s, target {metrics.target_time_s:.2f} s, "
        f"verify {metrics.verify_time_s:.2f} s"
    )
    return "\n".join(lines)


# ---- bench -----------------------------------------------------------------------------------------
def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from specgrove.bench.spec_bench import (
        BenchConfig,
        needs_draft,
        print_report,
        run_bench,
    )
    from specgrove.models import defaults

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    sorted_draft = args.sorted_draft
    if args.targets and sorted_draft is not None:
        from specgrove.models.loader import load_model

        sorted_draft = load_model(
            sorted_draft,
            dtype=args.dtype,
            device=args.device,
            quantization=args.draft_quantization,
            cuda_graphs=False if args.enforce_eager else None,
        )  # loaded once, for every target
    results = {}
    for target in args.targets or [args.target]:
        methods = list(args.methods)
        if args.targets and args.draft is None and target == defaults.DEFAULT_DRAFT:
            skipped = [m for m in methods if needs_draft(m)]
            methods = [m for m in methods if m not in skipped]
            if skipped:
                print(
                    f"[specgrove] target {target} is the default draft itself: skipping {', '.join(skipped)}",
                    file=sys.stderr,
                )
        config = BenchConfig(
            target,
            args.draft,
            methods=methods,
            data=args.data,
            limit=args.limit,
            categories=args.categories,
            num_speculative_tokens=args.num_speculative_tokens,
            prompt_lookup_min=args.prompt_lookup_min,
            prompt_lookup_max=args.prompt_lookup_max,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            seed=args.seed,
            dtype=args.dtype,
            device=args.device,
            warmup=args.warmup,
            measure_bandwidth=not args.no_bandwidth,
            tree_acceptance=args.tree_acceptance,
            quantization=args.quantization,
            draft_quantization=args.draft_quantization,
            sorted_draft=sorted_draft,
            enforce_eager=args.enforce_eager,
            interleave=args.interleave,
            draft_vocab=args.draft_vocab,
            eagle_head=args.eagle_head,
        )
        results[target] = run_bench(config)
        print_report(results[target])
    result = {"targets": results} if args.targets else results[args.target]
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json_path}")
    return 0


# ---- tune ------------------------------------------------------------------------------------------
def cmd_tune(args: argparse.Namespace) -> int:
    from pathlib import Path

    from specgrove.sampling import SamplingParams
    from specgrove.tuning import auto_tree_path, budget_tree, tune, write_tree_file

    config = tuned_method(args.method)
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed, max_tokens=args.max_new_tokens
    )
    if args.width < 1 or args.max_depth < 1 or args.prompts < 1 or args.repeats < 1:
        raise ValueError("--width, --max-depth, --prompts and --repeats must be >= 1")
    acceptance, profile = _tune_reused(args)
    target, draft = _tune_models(args, reuse_only=acceptance is not None and profile is not None, config=config)
    result = tune(
        target,
        draft,
        params,
        num_prompts=args.prompts,
        max_new_tokens=args.max_new_tokens,
        width=args.width,
        budgets=args.budgets,
        max_depth=args.max_depth,
        repeats=args.repeats,
        data=args.data,
        acceptance=acceptance,
        profile=profile,
    )
    out = write_tree_file(result, args.out or auto_tree_path(target, draft, params))
    console = _print_tune(result, out)
    if args.budget_trees:
        for budget in args.budgets:
            path = write_tree_file(budget_tree(result, budget), Path(out).with_name(f"{Path(out).stem}_b{budget}.json"))
            console.print(f"wrote {path}")
    return 0


def tuned_method(text: str):
    """The config of a method `tune` can tune: a tree method over a draft model whose tree is 'auto'."""
    from specgrove.config import parse_method

    config = parse_method(text)
    if config.method not in ("tree", "eagle") or config.tree != "auto":
        raise ValueError(
            f"tune chooses the tree of a tree method with tree 'auto' (tree:auto, rrs:auto, rrs_wo:auto, "
            f"spechub:auto, eagle:auto), not {text!r}: its tree is fixed, or it drafts no tree"
        )
    return config


def _tune_reused(args: argparse.Namespace):
    """The acceptance vector and machine profile given by --acceptance / --profile (None for each not given)."""
    from specgrove.trees.sequoia import AcceptanceVector, HardwareProfile, load_tree_file

    acceptance = profile = None
    if args.acceptance:
        data = load_tree_file(args.acceptance)[1]
        if data.get("acceptance") is None:
            raise ValueError(f"{args.acceptance} has no acceptance vector to reuse")
        acceptance = AcceptanceVector.from_dict(data["acceptance"])
    if args.profile:
        data = load_tree_file(args.profile)[1]
        if data.get("profile") is None:
            raise ValueError(f"{args.profile} has no machine profile to reuse")
        profile = HardwareProfile.from_dict(data["profile"])
        if args.dtype == "auto":
            args.dtype = profile.dtype  # the profile's own dtype (it was measured on this machine)
        elif profile.dtype != args.dtype:
            raise ValueError(f"{args.profile} was profiled in {profile.dtype}, not {args.dtype}; profile again")
    return acceptance, profile


def _tune_models(args: argparse.Namespace, reuse_only: bool, config=None):
    """The target and draft (a draft model, or method eagle's head) to measure; with nothing to measure, their
    names, dtype and device only."""
    from types import SimpleNamespace

    import torch

    from specgrove.models import defaults
    from specgrove.models.loader import check_compatible, load_model, resolve_model_dir

    if not reuse_only:
        resolve_model_dir(args.target)
    eagle = config is not None and config.method == "eagle"
    if args.draft is None and args.target != defaults.DEFAULT_TARGET and not eagle:
        raise ValueError(f"tune needs --draft when the target is not the default ({defaults.DEFAULT_TARGET})")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    draft_name = args.draft or defaults.DEFAULT_DRAFT
    if eagle:
        from pathlib import Path

        from specgrove.models.eagle import default_head_dir

        draft_name = str(Path(args.eagle_head or default_head_dir(args.target)).expanduser().resolve())
    if reuse_only:
        device = torch.device(args.device)
        return (
            SimpleNamespace(name=args.target, dtype=args.dtype, device=device),
            SimpleNamespace(name=draft_name, device=device),
        )
    graphs = False if args.enforce_eager else None
    target = load_model(
        args.target, dtype=args.dtype, device=args.device, quantization=args.quantization, cuda_graphs=graphs
    )
    if eagle:
        from dataclasses import replace

        from specgrove.tuning import eagle_head_of

        return target, eagle_head_of(replace(config, eagle_head=args.eagle_head), target)
    draft = load_model(
        draft_name,
        dtype=args.dtype,
        device=args.device,
        quantization=args.draft_quantization,
        cuda_graphs=graphs,
        head_vocab=args.draft_vocab,
    )
    check_compatible(target, draft)
    return target, draft


def _print_tune(result: dict, out):
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print("acceptance vector P[rank]: " + " ".join(f"{v:.3f}" for v in result["acceptance"]["values"]))
    profile = result["profile"]
    for label, key in (
        ("target forward ms by new tokens: ", "target_ms"),
        ("draft forward ms by tokens:      ", "draft_ms"),
    ):
        console.print(label + ", ".join(f"{n}: {ms:.0f}" for n, ms in profile[key].items()))
    table = Table(title="best tree per node budget (predicted)", title_justify="left")
    for name in ("budget", "nodes", "depth", "level sizes", "tau", "step ms", "speedup"):
        table.add_column(name, justify="right")
    for c in result["choices"]:
        table.add_row(
            str(c["budget"]),
            str(c["num_nodes"]),
            str(c["depth"]),
            ",".join(map(str, c["level_sizes"])),
            f"{c['predicted_accept_length']:.2f}",
            f"{c['step_time_ms']:.0f}",
            f"{c['predicted_speedup']:.2f}x",
        )
    console.print(table)
    console.print(
        f"best: budget {result['budget']}, {result['num_nodes']} nodes, depth {result['depth']}, predicted "
        f"tau {result['predicted_accept_length']:.2f}, predicted speedup {result['predicted_speedup']:.2f}x; "
        f"wrote {out}"
    )
    return console


def cmd_multidraft(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from specgrove.bench.multidraft import plot_report, run_report
    from specgrove.models.loader import resolve_model_dir

    resolve_model_dir(args.target)
    if args.prompts < 1 or args.max_new_tokens < 1 or args.limit < 1:
        raise ValueError("--prompts, --max-new-tokens and --limit must be >= 1")
    report = run_report(
        args.target,
        args.draft,
        temperatures=args.temperatures,
        num_prompts=args.prompts,
        max_new_tokens=args.max_new_tokens,
        top=args.top,
        depths=args.depths,
        bench_limit=args.limit,
        bench_max_new_tokens=args.bench_max_new_tokens,
        seed=args.seed,
        dtype=args.dtype,
        device=args.device,
        data=args.data,
    )
    console = Console(width=None if sys.stdout.isatty() else 160)
    table = Table(title=f"one step, 2 drafts, real (p, q) pairs on the top {args.top} tokens", title_justify="left")
    for name in ("T", "pairs", "1 draft", "method", "P(accept)", "OTM bound", "mean gap", "max gap"):
        table.add_column(name, justify="right")
    for t, figures in report["one_step"].items():
        for m, f in figures["methods"].items():
            table.add_row(
                t,
                str(figures["num_pairs"]),
                f"{figures['single_draft_acceptance']:.4f}",
                m,
                f"{f['acceptance']:.4f}",
                f"{f['otm_bound']:.4f}",
                f"{f['mean_gap_to_bound']:.4f}",
                f"{f['max_gap_to_bound']:.4f}",
            )
    console.print(table)
    for t, figures in report["one_step"].items():
        console.print(
            f"T = {t}: "
            + "; ".join(
                f"{pair} on {w['fraction']:.0%} of pairs (mean {w['mean_difference']:+.4f})"
                for pair, w in figures["wins"].items()
                if pair.startswith("spechub")
            )
        )
        dom = figures["dominance_condition"]
        console.print(
            f"T = {t}: TV(p, q) <= q(hub) on {dom['fraction']:.0%} of pairs; there SpecHub >= both RRS "
            f"on {dom['spechub_at_least_both_rrs']} of {dom['pairs']}"
        )
    if report["depth_table"]:
        table = Table(title="mean tokens per step (tau), binary trees", title_justify="left")
        table.add_column("T", justify="right")
        table.add_column("method")
        for d in args.depths:
            table.add_column(f"depth {d}", justify="right")
        for t, rows in report["depth_table"].items():
            stderr = report["depth_spread"][t]["stderr"]
            for m, row in rows.items():
                table.add_row(t, m, *(f"{row[str(d)]:.2f} ± {stderr[m][str(d)]:.2f}" for d in args.depths))
            for pair, diffs in report["depth_spread"][t]["paired_difference"].items():
                table.add_row(
                    t, pair, *(f"{diffs[str(d)]['mean']:+.2f} ± {diffs[str(d)]['stderr']:.2f}" for d in args.depths)
                )
        console.print(table)
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json_path}")
    if args.plot:
        print(f"wrote {plot_report(report, args.plot)}")
    return 0


# ---- models ----------------------------------------------------------------------------------------
def cmd_models_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from specgrove.models import defaults

    table = Table(title=f"built-in models (cache: {defaults.cache_root()})", title_justify="left")
    for name in ("name", "description", "fetched", "converted", "path"):
        table.add_column(name)
    for name, model in defaults.BUILTIN_MODELS.items():
        fetched = (defaults.cache_root() / "gguf" / model.gguf_filename()).exists()
        converted = defaults.is_converted(name)
        table.add_row(
            name,
            model.description,
            "yes" if fetched else "no",
            "yes" if converted else "no",
            str(defaults.converted_dir(name)),
        )
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    return 0


def _names(names: list[str]) -> list[str]:
    from specgrove.models import defaults

    return names or [defaults.DEFAULT_TARGET, defaults.DEFAULT_DRAFT]


def cmd_models_fetch(args: argparse.Namespace) -> int:
    from specgrove.models import defaults

    for name in _names(args.names):
        print(f"{name}: ready at {defaults.ensure_builtin(name)}")
    return 0


def cmd_models_verify(args: argparse.Namespace) -> int:
    from specgrove.errors import SpecgroveError
    from specgrove.models import defaults

    failed = 0
    for name in _names(args.names):
        try:
            digest = defaults.verify_builtin(name)
            print(f"{name}: OK (sha256 {digest})")
        except SpecgroveError as e:
            failed += 1
            print(f"{name}: FAILED: {e}")
    return 1 if failed else 0


# ---- entry point -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    from specgrove.errors import SpecgroveError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, SpecgroveError) as e:
        message = " ".join(str(e).split())  # one line
        print(f"error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
