"""The command-line options shared by several `specgrove` commands (generate, bench, serve, loadtest, profile,
train-sorted, ...), their value types, and the LLM they describe. The command modules (`cli.py`,
`serve/cli.py`, `train/cli.py`) import this; it imports only the library.
"""

from __future__ import annotations

import argparse

from specgrove.config import TREE_SAMPLING, grammar
from specgrove.models import defaults


def _int_list(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids like 1,2,3, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("give at least one token id")
    return ids


def _name_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _method_list(text: str) -> list[str]:
    """Comma-separated methods, where a tree spec's own list stays whole: 'plain,tree:widths:4,2,sorted@6'
    is plain, tree:widths:4,2 and sorted@6 (a piece that is only a number continues the method before it)."""
    methods: list[str] = []
    for piece in _name_list(text):
        if piece.isdigit() and methods:
            methods[-1] += "," + piece
        else:
            methods.append(piece)
    return methods


def _budget_list(text: str) -> list[int]:
    try:
        budgets = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated node budgets like 8,16,32, got {text!r}") from None
    if not budgets or budgets[0] < 1:
        raise argparse.ArgumentTypeError("node budgets must be integers >= 1")
    return budgets


def _float_list(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.6,1.0, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one value")
    return values


# ---- option groups ----------------------------------------------------------------------------------
def model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target",
        default=defaults.DEFAULT_TARGET,
        help=f"built-in name, HF directory or .gguf file (default: {defaults.DEFAULT_TARGET})",
    )
    p.add_argument(
        "--draft", default=None, help=f"draft model (default with the default target: {defaults.DEFAULT_DRAFT})"
    )
    p.add_argument(
        "--dtype",
        default="auto",
        help="auto (default: bfloat16 on a GPU or a CPU with AVX-512 BF16 / AMX, else float32), "
        "bfloat16, float32 or float16",
    )
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, or auto")
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--quantization",
        choices=("auto", "gguf", "none", "int8", "int4", "w8a8"),
        default="auto",
        help="target weights: auto (default: the GGUF file's own quantized blocks where the model "
        "comes from one and a kernel exists, else none), gguf, none (dense), int8 or int4 "
        "weight-only, or w8a8 (int8 weights and activations, CPUs with AVX-512 VNNI); the output "
        "is exactly the target's as loaded",
    )
    p.add_argument(
        "--draft-quantization",
        choices=("auto", "gguf", "none", "int8", "int4", "w8a8"),
        default="auto",
        help="draft weights: auto (default, as --quantization), gguf, none, int8, int4 or w8a8 "
        "(output unchanged, drafting cheaper)",
    )
    p.add_argument(
        "--draft-vocab",
        type=int,
        default=None,
        metavar="N",
        help="the draft's output layer keeps only token ids below N and the special tokens (the "
        "draft never proposes others; output unchanged, drafting cheaper). Default: all",
    )
    p.add_argument(
        "--enforce-eager",
        action="store_true",
        help="CUDA: never replay small forwards as CUDA graphs (default: graphs on a GPU)",
    )


def speculative_options(p: argparse.ArgumentParser, default_method: str = "draft_model") -> None:
    p.add_argument(
        "--method",
        default=default_method,
        metavar="METHOD",
        help=f"speculative method (default {default_method}): {grammar()}",
    )
    p.add_argument("-k", "--num-speculative-tokens", type=int, default=4, help="draft tokens per step (default 4)")
    p.add_argument(
        "--tree",
        default=None,
        help="method tree: chain:N, kary:BxD, widths:W1,W2,..., a tree .json "
        "from `specgrove tune`, or auto; method sorted with --sorted-exit: "
        "that exit drafts this tree",
    )
    p.add_argument(
        "--tree-sampling",
        choices=TREE_SAMPLING,
        default=None,
        help="how a node's children are drawn and verified: without_replacement (default; Sequoia, "
        "RRS without replacement), iid (SpecInfer's RRS) or hub (SpecHub's pairs); the methods "
        "rrs:SHAPE and spechub:SHAPE set it",
    )
    p.add_argument(
        "--sorted-exit",
        type=int,
        default=None,
        help="method sorted (S2D; --draft is a sorted draft): draft with this exit alone (default: adaptive)",
    )
    p.add_argument(
        "--sorted-thresholds",
        type=_float_list,
        default=None,
        help="method sorted, adaptive: confidence threshold per exit, e.g. 0.6,0.6,0 (default: the draft's)",
    )
    p.add_argument("--prompt-lookup-min", type=int, default=1)
    p.add_argument("--prompt-lookup-max", type=int, default=3)
    eagle_head_option(p)


def eagle_head_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--eagle-head",
        default=None,
        metavar="DIR",
        help="method eagle: the draft head directory (default: where `specgrove train-eagle` puts this target's head)",
    )


# ---- the LLM they describe ---------------------------------------------------------------------------
def speculative_config(args: argparse.Namespace):
    """The SpeculativeConfig of the speculative options: --method (any method string of
    `specgrove.config`) with -k, --tree, --tree-sampling, --sorted-exit, ... (ValueError on a conflict)."""
    from specgrove.config import parse_method

    return parse_method(
        args.method,
        num_speculative_tokens=args.num_speculative_tokens,
        prompt_lookup_min=args.prompt_lookup_min,
        prompt_lookup_max=args.prompt_lookup_max,
        tree=args.tree,
        tree_sampling=args.tree_sampling,
        sorted_exit=args.sorted_exit,
        sorted_thresholds=args.sorted_thresholds,
        eagle_head=args.eagle_head,
    )


def build_llm(args: argparse.Namespace, max_num_seqs: int | None = None):
    """The LLM of the model and speculative options (generate, serve, loadtest)."""
    from specgrove.api import LLM
    from specgrove.config import uses_draft
    from specgrove.models import defaults
    from specgrove.models.loader import resolve_model_dir

    spec = speculative_config(args)
    # A missing target is the more basic mistake: report it before the draft-model requirement.
    resolve_model_dir(args.target)
    if uses_draft(spec) and args.draft is None and args.target != defaults.DEFAULT_TARGET:
        raise ValueError(
            f"--method {args.method} needs --draft when the target is not the default "
            f"({defaults.DEFAULT_TARGET}); or use --method prompt_lookup or --method none"
        )
    llm = LLM(
        target=args.target,
        draft=args.draft,
        speculative=spec,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        num_threads=args.num_threads,
        quantization=args.quantization,
        draft_quantization=args.draft_quantization,
        draft_vocab=args.draft_vocab,
        max_num_seqs=max_num_seqs,
        enforce_eager=args.enforce_eager,
    )
    return llm, spec
