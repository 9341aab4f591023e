"""`specgrove train-sorted`: distil the targets' text, then sorted fine-tuning (SoFT) of a sorted draft.

  specgrove train-sorted --init qwen2.5-coder-0.5b-instruct --exits 2,4,6,8 \\
      --targets qwen2.5-coder-1.5b-instruct --data spec-bench --num-prompts 200 --max-new-tokens 256 \\
      --out drafts/s2d-0.5b --head-tokens 32768 --lr 1e-4 --epochs 2 --batch-size 8

  1. data: each target's continuation of each prompt (specgrove.train.data; greedy unless
     --temperature), appended to OUT/samples.jsonl (or --samples) as it finishes; `--data` may also be
     a JSONL of finished samples ({"prompt_ids", "output_ids"} lines), which skips generation;
  2. training: specgrove.train.soft, checkpointed every --save-every steps;
  3. OUT is a sorted draft directory (`--draft OUT`), with train_log.jsonl and train_config.json.

Running the same command again resumes: prompts already in the samples file are not generated again,
and training continues from OUT/checkpoint to the result an uninterrupted run gives.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from specgrove.cli_options import _float_list
from specgrove.errors import IncompatibleModelsError, SpecgroveError
from specgrove.train.data import SPEC_BENCH

if TYPE_CHECKING:
    from collections.abc import Sequence

    from specgrove.train.calibrate import ExitStatistics
    from specgrove.train.soft import SoftSettings

DEFAULT_MAX_NEW_TOKENS = 256
SAMPLES_FILE = "samples.jsonl"
TEACHER_FILE = "teacher.jsonl"


def _say(msg: str) -> None:
    print(f"[specgrove] {msg}", file=sys.stderr, flush=True)


def _name_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `train-sorted` to the `specgrove` subcommands; its func is cmd_train_sorted."""
    p = subparsers.add_parser(
        "train-sorted",
        help="sorted fine-tuning (SoFT) of a sorted draft on the targets' own text",
        description="Generate distillation text with the target(s), then train every exit of a sorted draft "
        "(S2D) on it. Re-running the same command resumes.",
    )
    p.add_argument(
        "--init",
        required=True,
        help="a sorted draft directory (sorted.json), or a model (built-in name, "
        "HF directory, .gguf) to cut to its first max(exits) layers",
    )
    p.add_argument("--exits", default=None, help="exit layer counts, e.g. 2,4,6,8 (default: the init draft's)")
    _add_distillation_arguments(p)
    p.add_argument("--out", required=True, help="output directory: the trained sorted draft, logs and checkpoint")
    _add_training_arguments(p)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=cmd_train_sorted)
    return p


def _add_distillation_arguments(p: argparse.ArgumentParser) -> None:
    """Step 1: the prompts, the targets that continue them, and the samples file."""
    from specgrove.models import defaults

    p.add_argument(
        "--targets",
        type=_name_list,
        default=[],
        help=f"comma list of target models whose text the draft learns (built-in names like "
        f"{defaults.DEFAULT_TARGET}, or directories); not needed when --data holds samples",
    )
    p.add_argument(
        "--data",
        default=SPEC_BENCH,
        help=f"prompts: '{SPEC_BENCH}' (Spec-Bench questions 21.., disjoint from the benchmark's "
        'first 20; default), a JSONL of {"prompt": text} (raw), {"turns": [...]} (chat template) '
        'or {"prompt_ids": [...]} lines, or a JSONL of finished samples (prompt_ids + output_ids)',
    )
    p.add_argument("--num-prompts", type=_positive_int, default=None, help="prompts to use (default: all)")
    p.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=DEFAULT_MAX_NEW_TOKENS,
        help=f"continuation length limit per prompt (default {DEFAULT_MAX_NEW_TOKENS}; EOS stops earlier)",
    )
    p.add_argument(
        "--temperature", type=float, default=0.0, help="distillation sampling temperature (0 = greedy, default)"
    )
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--gen-batch", type=_positive_int, default=8, help="prompts decoded together (default 8)")
    p.add_argument("--target-dtype", default="bfloat16", help="dtype the targets generate in (default bfloat16)")
    p.add_argument("--samples", default=None, help=f"the distillation samples file (default OUT/{SAMPLES_FILE})")


def _add_training_arguments(p: argparse.ArgumentParser) -> None:
    """Step 2: SoftSettings, the teacher distributions, and when to stop."""
    p.add_argument(
        "--head-tokens",
        type=_positive_int,
        default=None,
        help="shrink the output layer to the N most frequent tokens of the data plus the targets' EOS",
    )
    p.add_argument(
        "--kl-weight",
        type=float,
        default=0.0,
        help="mix in KL to the targets' own distributions: loss = (1 - w) CE + w KL(target top-k || exit); "
        "w > 0 first computes each sample's target top-k by teacher forcing (default 0: CE only)",
    )
    p.add_argument(
        "--exit-weights",
        type=_float_list,
        default=None,
        help="weights of the exits' losses, one per exit, e.g. 1,1,4 to favour the deepest exit (default: equal)",
    )
    p.add_argument(
        "--freeze-head",
        action="store_true",
        help="keep the final norm and output layer fixed: the shallow exits learn to feed the head the "
        "deepest exit was trained for",
    )
    p.add_argument(
        "--teacher-top-k",
        type=_positive_int,
        default=None,
        help="tokens kept per position of the target's distribution (default 16)",
    )
    p.add_argument(
        "--teacher",
        default=None,
        help="the teacher distributions file (default OUT/teacher.jsonl; resumable, reused across runs)",
    )
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    p.add_argument("--epochs", type=_positive_int, default=1, help="passes over the data (default 1)")
    p.add_argument("--max-steps", type=_positive_int, default=None, help="number of steps (overrides --epochs)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="sequences per step (default 8)")
    p.add_argument("--max-len", type=_positive_int, default=1024, help="tokens per sequence (default 1024)")
    p.add_argument("--warmup", type=float, default=0.04, help="linear warm-up, a fraction of the steps (default 0.04)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--save-every", type=_positive_int, default=50, help="checkpoint every N steps (default 50)")
    p.add_argument(
        "--stop-after",
        type=_positive_int,
        default=None,
        help="stop (checkpointed) after N steps of this run; run the same command again to continue",
    )
    p.add_argument(
        "--data-only", action="store_true", help="only generate the distillation samples (resumable), no training"
    )
    p.add_argument(
        "--keep-checkpoint",
        action="store_true",
        help="keep the last checkpoint's weights and optimizer state after training",
    )
    p.add_argument("--seed", type=int, default=0, help="data order (and sampling) seed (default 0)")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="training compute dtype: float32 (default) or bfloat16 autocast; weights stay fp32",
    )
    p.add_argument(
        "--save-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="dtype of the output draft's weights (default float32)",
    )
    p.add_argument(
        "--no-group-by-length",
        dest="group_by_length",
        action="store_false",
        help="batches drawn without grouping similar lengths (more padding)",
    )
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")


def _check_vocab(init, name: str, hf_config, tokenizer) -> None:
    if int(hf_config.vocab_size) != init.vocab_size:
        raise IncompatibleModelsError(
            f"target {name} has a vocabulary of {hf_config.vocab_size} tokens but the draft {init.name} has "
            f"{init.vocab_size}; the draft must share its targets' tokenizer: use a draft from the target's family"
        )
    if tokenizer is not None and init.tokenizer is not None and tokenizer.get_vocab() != init.tokenizer.get_vocab():
        raise IncompatibleModelsError(
            f"target {name}'s tokenizer maps tokens differently from the draft "
            f"{init.name}'s; the draft must share its targets' tokenizer"
        )


def collect_samples(args, init) -> tuple[list, dict, set[int]]:
    """The training samples, a description of where they came from, and the targets' EOS ids."""
    from specgrove.train import data

    if args.data != SPEC_BENCH and data.is_sample_file(args.data):
        if args.targets:
            _say(f"--data {args.data} holds finished samples; --targets is not used")
        samples = data.read_samples(args.data)
        return samples, {"samples_file": str(args.data), "source": "samples file"}, set()

    if not args.targets:
        raise ValueError(
            f"--data {args.data} holds prompts: pass --targets to generate the text the draft learns, "
            f"or pass a JSONL of finished samples as --data"
        )
    records = None
    if args.data != SPEC_BENCH and not data.is_spec_bench_file(args.data):
        records = data.read_prompt_records(args.data, args.num_prompts)
        if not records:
            raise ValueError(f"{args.data} holds no prompts")
    targets = _target_prompts(args, init, records)
    samples_path = Path(args.samples) if args.samples else Path(args.out) / SAMPLES_FILE
    samples, eos = [], set()
    for name, directory, prompts, eos_ids in targets:
        samples += data.distill(
            lambda directory=directory, name=name: load_target(args, name, directory),
            prompts,
            samples_path,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.gen_batch,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            name=name,
            eos_ids=eos_ids,
            progress=args.progress,
        )
        eos |= set(eos_ids)
    info = {
        "prompts": args.data,
        "num_prompts": args.num_prompts,
        "targets": list(args.targets),
        "samples_file": str(samples_path),
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "target_dtype": args.target_dtype,
    }
    return samples, info, eos


def _target_prompts(args, init, records: list[dict] | None) -> list[tuple[str, Path, list[list[int]], set[int]]]:
    """(name, directory, prompt ids, EOS ids) of each target: everything about the targets that can be
    checked without their weights, before any generation. records None: the Spec-Bench prompts."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    from specgrove.models.loader import load_tokenizer, resolve_model_dir
    from specgrove.train import data

    targets = []
    for name in args.targets:
        directory = resolve_model_dir(name)
        hf_config = AutoConfig.from_pretrained(str(directory))
        tokenizer = load_tokenizer(directory)
        _check_vocab(init, name, hf_config, tokenizer)
        if records is None:
            prompts = data.spec_bench_prompts(SimpleNamespace(tokenizer=tokenizer), args.num_prompts)
        else:
            prompts = data.encode_prompt_records(records, tokenizer)
        if not prompts:
            raise ValueError(f"no prompts for {name} in {args.data}")
        targets.append((name, directory, prompts, data.eos_ids_of(hf_config, tokenizer)))
    return targets


def load_target(args, name: str, directory=None):
    """A target for distillation or the teacher pass (both run on the fast runtime), named `name`."""
    from specgrove.models.loader import load_model

    _say(f"loading target {name}")
    loaded = load_model(directory or name, dtype=args.target_dtype, device=args.device)
    if not loaded.is_fast:
        raise SpecgroveError(f"target {name} is not a Llama-family model; distillation runs on the fast runtime")
    loaded.name = name
    return loaded


def teacher_distributions(args, samples) -> tuple[dict, dict]:
    """Every sample's target top-k (specgrove.train.teacher), computed where the teacher file lacks it;
    and a description for train_config.json."""
    from specgrove.train.teacher import DEFAULT_TOP_K, compute_teachers

    path = Path(args.teacher) if args.teacher else Path(args.out) / TEACHER_FILE
    k = args.teacher_top_k or DEFAULT_TOP_K
    teachers = compute_teachers(samples, path, lambda name: load_target(args, name), k, progress=args.progress)
    return teachers, {"file": str(path), "top_k": k, "target_dtype": args.target_dtype}


def soft_settings(args: argparse.Namespace) -> SoftSettings:
    """The SoftSettings the arguments give (validated there)."""
    from specgrove.train.soft import SoftSettings

    return SoftSettings(
        lr=args.lr,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        max_len=args.max_len,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        seed=args.seed,
        dtype=args.dtype,
        group_by_length=args.group_by_length,
        head_tokens=args.head_tokens,
        kl_weight=args.kl_weight,
        exit_weights=args.exit_weights,
        freeze_head=args.freeze_head,
        save_every=args.save_every,
        save_dtype=args.save_dtype,
        keep_checkpoint=args.keep_checkpoint,
        threads=args.threads,
        device=args.device,
    )


def cmd_train_sorted(args: argparse.Namespace) -> int:
    from specgrove.train import data
    from specgrove.train.soft import load_init, train_soft

    settings = soft_settings(args)
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ValueError("--temperature must be >= 0 and --top-p in (0, 1]")
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    init = load_init(args.init, args.exits)
    _say(f"init {args.init}: exits {init.spec.exits} of a {init.config.num_hidden_layers}-layer draft")
    samples, info, eos = collect_samples(args, init)
    if args.data_only:
        print(
            f"{len(samples)} samples ({sum(len(s.output_ids) for s in samples)} continuation tokens) in "
            f"{info.get('samples_file')}"
        )
        return 0
    eos |= data.eos_ids_of(init.config, init.tokenizer)
    teachers = None
    if settings.kl_weight > 0:
        teachers, info["teacher"] = teacher_distributions(args, samples)
    result = train_soft(
        init,
        samples,
        args.out,
        settings,
        eos_ids=eos,
        data_info=info,
        progress=args.progress,
        stop_after=args.stop_after,
        teachers=teachers,
    )
    print_training_result(result, args.out)
    return 0


def print_training_result(result: dict, out) -> None:
    """train_soft's summary as a table, and where the draft (or the checkpoint to continue from) is."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    table = Table(title=f"train-sorted: {result['status']}", title_justify="left")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("steps", f"{result.get('steps')} / {result.get('total_steps')}")
    if result.get("final_loss") is not None:
        table.add_row("final loss (mean of exits)", f"{result['final_loss']:.4f}")
        for exit_, loss in (result.get("final_loss_exits") or {}).items():
            table.add_row(f"  exit {exit_}", f"{loss:.4f}")
    table.add_row("loss tokens", str(result.get("tokens")))
    if result.get("wall_s") is not None:
        table.add_row("wall time", f"{result['wall_s']:.1f} s ({(result.get('s_per_step') or 0):.3f} s/step)")
    console.print(table)
    if result["status"] == "stopped":
        console.print(f"stopped early; run the same command again to continue ({out}/checkpoint)")
    else:
        console.print(f"sorted draft: {out}")


# ---- calibrate-sorted -----------------------------------------------------------------------------------
def add_calibrate_parser(subparsers) -> argparse.ArgumentParser:
    """Add `calibrate-sorted`: measure each exit's confidence vs agreement on target text, choose thresholds."""
    p = subparsers.add_parser(
        "calibrate-sorted",
        help="choose a sorted draft's exit thresholds by measurement on target text",
        description="Teacher-forced over distillation samples (the targets' own text), choose for each exit the "
        "smallest confidence threshold at which it agrees with the target as often as the deepest "
        "exit does (specgrove.train.calibrate); --write stores them in the draft's sorted.json.",
    )
    p.add_argument("--draft", required=True, help="the sorted draft directory")
    p.add_argument("--samples", required=True, help="a samples JSONL (train-sorted's OUT/samples.jsonl)")
    p.add_argument(
        "--limit", type=_positive_int, default=64, help="samples to use (default 64, from the end of the file)"
    )
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument(
        "--top-n",
        type=_positive_int,
        default=4,
        help="also report how often the target's token is among an exit's top N (default 4: the first "
        "level of a tree with N children at the root)",
    )
    p.add_argument("--write", action="store_true", help="write the chosen thresholds into sorted.json")
    p.set_defaults(func=cmd_calibrate_sorted)
    return p


def cmd_calibrate_sorted(args: argparse.Namespace) -> int:
    from specgrove.drafting.sorted import sorted_spec
    from specgrove.models.loader import load_model
    from specgrove.models.sorted import SortedSpec
    from specgrove.train.calibrate import choose_target_thresholds, choose_thresholds, exit_statistics
    from specgrove.train.data import read_samples

    samples = read_samples(args.samples)
    if not samples:
        raise ValueError(f"{args.samples} holds no samples")
    draft = load_model(args.draft, dtype=args.dtype)
    spec = sorted_spec(draft)
    if SortedSpec.load(draft.path) is None and args.write:
        raise ValueError(f"{args.draft} has no sorted.json to write thresholds into; make it with train-sorted")
    stats = exit_statistics(draft, samples[-args.limit :], spec.exits, top_n=args.top_n)
    thresholds = choose_thresholds(stats)
    num_samples = min(args.limit, len(samples))
    print_calibration(stats, thresholds, spec.thresholds, num_samples, args.top_n)
    per_target = choose_target_thresholds(stats)
    for name, values in per_target.items():
        print(f"thresholds for target {name}: {values}")
    if args.write:
        spec.thresholds = thresholds
        spec.target_thresholds = per_target
        spec.extra["calibration"] = calibration_record(stats, args.samples, num_samples, args.top_n)
        spec.save(draft.path)
        print(f"wrote thresholds {thresholds} (and {len(per_target)} targets' own) to {draft.path / 'sorted.json'}")
    return 0


def print_calibration(
    stats: Sequence[ExitStatistics], thresholds: list[float], old_thresholds: list[float], num_samples: int, top_n: int
) -> None:
    """Each exit's agreement, top-n rate and chosen threshold; per target when the samples have several."""
    from rich.console import Console
    from rich.table import Table

    top = f"in top-{top_n}"
    table = Table(title=f"{len(stats[0].agrees)} positions of {num_samples} samples", title_justify="left")
    for name in ("exit", "agreement", top, "threshold", "agreement above it", "share above it", "was"):
        table.add_column(name, justify="right")
    for s, t, old in zip(stats, thresholds, old_thresholds):
        precision, share = s.precision_at(t)
        table.add_row(
            str(s.exit_layer),
            f"{s.agreement:.3f}",
            f"{s.in_top_rate():.3f}",
            f"{t:.2f}",
            f"{precision:.3f}",
            f"{share:.1%}",
            f"{old:.2f}",
        )
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    if len(stats[0].target_names) > 1:
        per_target = {str(s.exit_layer): s.by_target() for s in stats}
        table = Table(title="per target", title_justify="left")
        for name in ("target", "positions", *(f"exit {s.exit_layer}: agreement / {top}" for s in stats)):
            table.add_column(name, justify="right")
        for name in stats[0].target_names:
            cells = [per_target[str(s.exit_layer)][name] for s in stats]
            table.add_row(name or "(unnamed)", str(cells[0][2]), *(f"{a:.3f} / {t:.3f}" for a, t, _ in cells))
        console.print(table)


def calibration_record(stats: Sequence[ExitStatistics], samples_file, num_samples: int, top_n: int) -> dict:
    """sorted.json's extra["calibration"]: what the thresholds were chosen on, and each exit's rates."""
    per_target = {str(s.exit_layer): s.by_target() for s in stats}
    return {
        "samples": str(samples_file),
        "num_samples": num_samples,
        "positions": len(stats[0].agrees),
        "agreement": {str(s.exit_layer): s.agreement for s in stats},
        f"in_top_{top_n}": {str(s.exit_layer): s.in_top_rate() for s in stats},
        "per_target": {
            e: {t: {"agreement": a, f"in_top_{top_n}": r, "positions": n} for t, (a, r, n) in v.items()}
            for e, v in per_target.items()
        },
    }
