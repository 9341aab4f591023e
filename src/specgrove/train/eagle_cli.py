"""`specgrove train-eagle`: the target's own answers with its features, then a feature-level draft head trained on
them (specgrove.train.eagle).

  specgrove train-eagle                      # the default target, every trainable Spec-Bench prompt
  specgrove train-eagle --target MODEL --out DIR --num-prompts 100 --max-new-tokens 128 --epochs 1

The head goes to OUT (default: where `--method eagle` looks for this target's head); the samples, features,
checkpoint and log to WORK (default: OUT-work). Running the same command again resumes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from specgrove.errors import SpecgroveError
from specgrove.train.cli import _name_list, _positive_int
from specgrove.train.data import SPEC_BENCH

DEFAULT_MAX_NEW_TOKENS = 192
DEFAULT_HEAD_TOKENS = 16384
DEFAULT_SELF_PROMPTS = 128
REQUEST_MAX_TOKENS = 96
REQUESTS_FILE = "requests.jsonl"


def _say(msg: str) -> None:
    print(f"[specgrove] {msg}", file=sys.stderr, flush=True)


def add_parser(subparsers) -> argparse.ArgumentParser:
    from specgrove.models import defaults
    from specgrove.models.eagle import TRAIN_TIME
    from specgrove.train.eagle import EagleSettings

    d = EagleSettings()
    p = subparsers.add_parser(
        "train-eagle",
        help="train a feature-level draft head (EAGLE family) for a target",
        description="Generate the target's answers to training prompts with its hidden states, then train a "
        f"one-layer draft head on them with training-time test ({TRAIN_TIME}). Re-running resumes.",
    )
    p.add_argument("--target", default=defaults.DEFAULT_TARGET, help=f"the target (default {defaults.DEFAULT_TARGET})")
    p.add_argument("--out", default=None, help="the head directory (default: where --method eagle looks for it)")
    p.add_argument("--work", default=None, help="samples, features, checkpoint and log (default: OUT-work)")
    p.add_argument(
        "--data",
        default=SPEC_BENCH,
        help=f"'{SPEC_BENCH}' (default: Spec-Bench questions past the benchmark's first 20, translation, "
        'summarization, qa and rag only), a JSONL of prompts ({"prompt"}, {"turns"} or {"prompt_ids"} lines), '
        "or a JSONL of finished samples (prompt_ids + output_ids)",
    )
    p.add_argument("--num-prompts", type=_positive_int, default=None, help="prompts to use (default: all)")
    p.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=DEFAULT_MAX_NEW_TOKENS,
        help=f"answer length limit (default {DEFAULT_MAX_NEW_TOKENS})",
    )
    p.add_argument("--gen-batch", type=_positive_int, default=8, help="prompts generated together (default 8)")
    p.add_argument(
        "--head-tokens",
        type=_positive_int,
        default=DEFAULT_HEAD_TOKENS,
        help=f"the output layer cut to the N most frequent tokens of the data (default {DEFAULT_HEAD_TOKENS})",
    )
    p.add_argument(
        "--intermediate-size",
        type=_positive_int,
        default=None,
        help="the head's MLP width (default 2048, at most the target's)",
    )
    p.add_argument(
        "--feature-layers",
        type=lambda t: [int(x) for x in _name_list(t)],
        default=None,
        help="target layers the head reads, ending with -1 (default: 2, the middle one, -1)",
    )
    p.add_argument(
        "--ttt-steps", type=_positive_int, default=d.ttt_steps, help=f"draft depths trained (default {d.ttt_steps})"
    )
    p.add_argument(
        "--step-decay", type=float, default=d.step_decay, help=f"loss weight ratio per depth (default {d.step_decay})"
    )
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--epochs", type=_positive_int, default=d.epochs, help=f"passes over the data (default {d.epochs})")
    p.add_argument("--max-steps", type=_positive_int, default=None, help="number of steps (overrides --epochs)")
    p.add_argument(
        "--batch-size", type=_positive_int, default=d.batch_size, help=f"samples per step (default {d.batch_size})"
    )
    p.add_argument(
        "--self-prompts",
        type=int,
        default=DEFAULT_SELF_PROMPTS,
        help=f"requests the target writes itself and then answers, with the Spec-Bench prompts (default "
        f"{DEFAULT_SELF_PROMPTS}; 0: none)",
    )
    p.add_argument(
        "--max-len",
        type=_positive_int,
        default=d.max_len,
        help=f"tokens per training sequence, the end of each sample (default {d.max_len})",
    )
    p.add_argument(
        "--no-prompt-loss",
        dest="prompt_loss",
        action="store_false",
        help="train on the answers only (default: the prompts' tokens too, the target's distribution over them)",
    )
    p.add_argument(
        "--holdout", type=float, default=d.holdout, help=f"fraction of samples held out (default {d.holdout})"
    )
    p.add_argument("--save-every", type=_positive_int, default=50, help="checkpoint every N steps (default 50)")
    p.add_argument(
        "--stop-after", type=_positive_int, default=None, help="stop (checkpointed) after N steps of this run"
    )
    p.add_argument("--data-only", action="store_true", help="only generate the samples and features")
    p.add_argument("--seed", type=int, default=d.seed, help="data order and initialisation seed (default 0)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=cmd_train_eagle)
    return p


def _settings(args):
    from specgrove.train.eagle import EagleSettings

    return EagleSettings(
        ttt_steps=args.ttt_steps,
        step_decay=args.step_decay,
        lr=args.lr,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        max_len=args.max_len,
        prompt_loss=args.prompt_loss,
        holdout=args.holdout,
        seed=args.seed,
    )


def _samples(args, target, work: Path, layers: list[int]) -> tuple[list, dict]:
    """The training samples (generated with their features, or read), and where they came from."""
    from specgrove.train import data
    from specgrove.train.eagle import SAMPLES_FILE, eagle_prompts, ensure_features, feature_path, save_features
    from specgrove.train.self_instruct import chat_prompts, instruction_texts

    if args.data != SPEC_BENCH and data.is_sample_file(args.data):
        samples = data.read_samples(args.data)
        info = {"samples_file": str(args.data), "source": "samples file"}
    else:
        if args.data == SPEC_BENCH or data.is_spec_bench_file(args.data):
            prompts = eagle_prompts(target.tokenizer, args.num_prompts, None if args.data == SPEC_BENCH else args.data)
        else:
            records = data.read_prompt_records(args.data, args.num_prompts)
            if not records:
                raise ValueError(f"{args.data} holds no prompts")
            prompts = data.encode_prompt_records(records, target.tokenizer)

        def generate(prompts, path, max_new_tokens):
            return data.distill(
                target,
                prompts,
                path,
                max_new_tokens=max_new_tokens,
                batch_size=args.gen_batch,
                seed=args.seed,
                progress=args.progress,
                features=layers,
                on_features=lambda s, f: save_features(feature_path(work, s), f, layers),
            )

        samples = generate(prompts, work / SAMPLES_FILE, args.max_new_tokens)
        info = {"prompts": args.data, "num_prompts": len(prompts), "samples_file": str(work / SAMPLES_FILE)}
        if args.self_prompts > 0 and args.data == SPEC_BENCH:
            requests = generate(
                chat_prompts(target.tokenizer, instruction_texts(args.self_prompts)),
                work / REQUESTS_FILE,
                REQUEST_MAX_TOKENS,
            )
            texts = [target.tokenizer.decode(s.output_ids, skip_special_tokens=True).strip() for s in requests]
            asked = chat_prompts(target.tokenizer, [t for t in texts if t])
            answered = generate(asked, work / SAMPLES_FILE, args.max_new_tokens)
            samples = samples + requests + answered
            info["self_prompts"] = len(answered)
    if not samples:
        raise SpecgroveError(f"no samples to train on from {args.data}")
    ensure_features(samples, work, layers, lambda: target, progress=args.progress)
    info.update(
        samples=len(samples),
        prompt_tokens=sum(len(s.prompt_ids) for s in samples),
        answer_tokens=sum(len(s.output_ids) for s in samples),
        max_new_tokens=args.max_new_tokens,
    )
    return samples, info


def cmd_train_eagle(args: argparse.Namespace) -> int:
    import hashlib
    import json

    import torch

    from specgrove.models.eagle import check_feature_layers, default_feature_layers, default_head_dir, save_head
    from specgrove.models.loader import load_model
    from specgrove.train.data import eos_ids_of
    from specgrove.train.eagle import build_examples, settings_record, split_holdout, train_head
    from specgrove.train.eagle_model import head_config, new_train_head
    from specgrove.train.soft import choose_head_tokens
    from specgrove.train.teacher import sample_key

    t0 = time.perf_counter()
    settings = _settings(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    target = load_model(args.target)
    if not target.is_fast:
        raise SpecgroveError(
            f"{args.target} is not a Llama-family model: a draft head reads the fast runtime's features"
        )
    out = Path(args.out).expanduser() if args.out else default_head_dir(target)
    work = Path(args.work).expanduser() if args.work else out.with_name(out.name + "-work")
    num_layers = target.model.config.num_layers
    layers = check_feature_layers(args.feature_layers or default_feature_layers(num_layers), num_layers)
    samples, info = _samples(args, target, work, layers)
    data_seconds = time.perf_counter() - t0
    if args.data_only:
        print(f"{info['samples']} samples ({info['answer_tokens']} answer tokens) with features in {work}")
        return 0
    vocab = target.model.config.vocab_size
    head_tokens = min(args.head_tokens, vocab)
    eos = {t for t in eos_ids_of(target.hf_config, target.tokenizer) if t < vocab}
    token_ids = torch.tensor(choose_head_tokens(samples, head_tokens, eos, vocab))
    config = head_config(target, args.intermediate_size, layers)
    module = new_train_head(target, config, token_ids, settings.init_std, settings.seed)
    examples = build_examples(samples, work, layers, settings.max_len, settings.prompt_loss)
    train, held_out = split_holdout(examples, settings.holdout, settings.seed)
    digest = hashlib.sha256(json.dumps(sorted(sample_key(s) for s in samples)).encode()).hexdigest()[:16]
    fingerprint = {
        "settings": settings_record(settings),
        "head": {k: v for k, v in vars(config).items() if k != "training"},
        "head_tokens": hashlib.sha256(token_ids.numpy().tobytes()).hexdigest()[:16],
        "samples": digest,
        "threads": torch.get_num_threads(),
    }
    _say(
        f"training a head on {len(train)} samples ({len(held_out)} held out): {config.intermediate_size}-wide MLP, "
        f"{head_tokens} head tokens, features of layers {layers}, {settings.ttt_steps} draft depths"
    )
    summary = train_head(
        module,
        train,
        held_out,
        work,
        settings,
        fingerprint,
        save_every=args.save_every,
        stop_after=args.stop_after,
        progress=args.progress,
    )
    if summary["status"] != "completed":
        print(f"stopped at step {summary['step']} of {summary['total_steps']}; run the same command to continue")
        return 0
    config.training = {
        **settings_record(settings),
        **info,
        **summary,
        "head_tokens": head_tokens,
        "data_seconds_this_run": round(data_seconds, 1),
        "wall_seconds_this_run": round(time.perf_counter() - t0, 1),
    }
    save_head(out, config, module.export_weights())
    agree = summary.get("held_out_agreement")
    print(f"draft head: {out}")
    print(f"  {summary['steps']} steps, final loss {summary['final_loss']}, {summary['train_seconds']} s training")
    if agree:
        print(
            "  held-out agreement with the target's top token by draft depth: " + ", ".join(f"{a:.3f}" for a in agree)
        )
    print(f"  use it: specgrove generate --method eagle --eagle-head {out}")
    return 0
