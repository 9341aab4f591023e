"""SoFT, sorted fine-tuning (Kavehzadeh et al. 2024, S2D): train every sub-model of a sorted draft at once.

A sorted draft (specgrove.models.sorted) is one model whose first-l-layer sub-models, for each exit l,
predict the next token through the shared final RMSNorm and output layer. Cut from a pretrained model,
only the deepest exit was ever trained to feed the norm and head; SoFT fine-tunes all of them together:

  loss = sum over exits l of w_l CE_l / sum of w_l   (w_l = 1 by default: the mean over the exits),
  CE_l = mean over the continuation tokens t of -log softmax(head(norm(h_l[t - 1])))[x_t],

h_l = the hidden state after decoder layer l, before the final norm, captured with a forward hook on
layer l (transformers' output_hidden_states is no substitute: its last entry already has the final
norm applied, so the deepest exit would be normed twice), x = prompt + continuation
of a distillation sample (specgrove.train.data), and only continuation tokens count (the draft has to
predict the target's answers, not its prompts). Every parameter is trained, shared ones included.

KL to the targets (`kl_weight` w > 0): CE_l above becomes (1 - w) CE_l + w KL_l, KL_l = mean over the
same tokens of KL(p_t || softmax(exit l's logits)), p_t = the sample's target's top-k distribution at
that position (specgrove.train.teacher, teacher-forced), renormalised over the tokens the head holds.
The target's whole distribution, not only its argmax, is what speculative acceptance depends on
(acceptance = sum_x min(p, q)); a sample of the 0.5B target also anchors the deepest exit (cut from that
same model) where it already is.

Exit weights (`exit_weights`, `--exit-weights 1,1,4`): the exits share their first layers, and with
equal weights the shallow exits' large losses pull those layers their way, which costs the deepest
exit accuracy (measured: draft C's exit 24 fell from 88% to 78% top-1 agreement with the targets).
A larger weight on the deepest exit limits that, a little (1,1,4: 79.7%). `freeze_head` (`--freeze-head`)
keeps the shared final norm and output layer as they are, so the shallow exits have to learn to feed
the head the deepest exit was trained for (measured on top of 1,1,4: no change, 79.4%: the deepest
exit's loss comes from the shared layers, not the head).

With a shrunk head (`lm_head.token_ids`, `--head-tokens N`), head row i scores token token_ids[i];
targets outside the head are left out of the loss: the draft gives them probability 0 anyway (which
keeps speculative verification exact, see specgrove.models.sorted). `choose_head_tokens` picks the N
most frequent tokens of the training text (prompts + continuations; ties by id, unseen ids fill up)
plus every target EOS token.

Optimisation: AdamW, lr warmed up linearly over the first `warmup` fraction of the steps then cosine to
0 (`lr_at`, computed from the step number, so there is no scheduler state), gradients clipped to norm
1.0, a step = `batch_size` sequences right-padded to the longest (causal attention: padding after a
sequence never reaches its tokens). The batches of epoch e are a permutation of the examples drawn
from seed and e (length-grouped in windows to cut padding), so step s's batch is a function of
(seed, s) alone.

Checkpoints and resume (no pickles anywhere): every `save_every` steps `OUT/checkpoint/` is written
to a temporary directory and renamed into place:
  model.safetensors      the fp32 trainable weights (on-disk names, with lm_head.token_ids)
  optimizer.safetensors  AdamW's exp_avg / exp_avg_sq per parameter name, and torch's RNG state(s)
  state.json             step, AdamW step counts, schedule, data position, loss history, token counts,
                         elapsed time, and the fingerprint of every setting that changes the result
Running the same command again restores all of it and continues at the next step; as the batch of a
step depends only on (seed, step) and the lr only on the step, the result is the one an uninterrupted
run reaches (bitwise in fp32 on the same machine and thread count). A checkpoint made with other
settings or data is refused, not silently mixed in.

Output: OUT is a sorted draft directory (`write_sorted`) that `load_model` reads; sorted.json's extra
records the settings, data, token counts and wall time. Next to it: train_log.jsonl (one line per
step), train_config.json, and checkpoint/ (only state.json is kept after the last step unless
keep_checkpoint).

`train_soft` is a loop over named steps: `plan_training` (examples, number of steps, fingerprint),
`resumable_checkpoint`, `build_model` and `build_optimizer` (then `restore_run` when resuming) into a
`SoftRun`; each step `batch_at`, `train_step` (the update), `record_step` and `log_step`, `save_run` every
save_every steps; at the end `write_trained_draft` and the finished run's `save_run`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

import torch
import torch.nn.functional as F

from specgrove.errors import SpecgroveError
from specgrove.models.sorted import (
    HEAD_TOKEN_IDS,
    SortedSpec,
    parse_exits,
    truncated_weights,
    write_sorted,
)

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
TRAIN_LOG = "train_log.jsonl"
TRAIN_CONFIG = "train_config.json"
CE_CHUNK = 2048  # loss tokens whose logits exist at once (recomputed in backward): a 150k-token head stays cheap
GROUP_WINDOW = 32  # batches per length-grouping window
HEAD_PARAMETERS = ("model.norm.weight", "lm_head.weight")  # what --freeze-head keeps fixed
TRAIN_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class SoftSettings:
    """Training settings. Everything but save_every, threads, device and keep_checkpoint changes the result
    and is part of the checkpoint's fingerprint."""

    lr: float = 1e-4
    epochs: int = 1
    max_steps: int | None = None  # when set, the number of steps (epochs then only says nothing)
    batch_size: int = 8
    max_len: int = 1024
    warmup: float = 0.04  # fraction of the steps
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    dtype: str = "float32"  # compute dtype: float32, or bfloat16 autocast (fp32 master weights either way)
    group_by_length: bool = True
    head_tokens: int | None = None
    kl_weight: float = 0.0  # loss = (1 - w) * CE on the target's tokens + w * KL(teacher top-k || exit)
    exit_weights: tuple[float, ...] | None = None  # one per exit, the weights of the exits' losses (None: equal)
    freeze_head: bool = False  # keep the final norm and the output layer as the init model has them
    save_every: int = 50
    save_dtype: str = "float32"  # dtype of the output draft's weights
    keep_checkpoint: bool = False
    threads: int | None = None
    device: str = "cpu"

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {self.max_steps}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.max_len < 2:
            raise ValueError(f"--max-len must be >= 2 (a prompt token and a continuation token), got {self.max_len}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if self.save_every < 1:
            raise ValueError(f"--save-every must be >= 1, got {self.save_every}")
        if not 0.0 <= self.kl_weight <= 1.0:
            raise ValueError(f"--kl-weight is a mixing weight in [0, 1], got {self.kl_weight}")
        if self.exit_weights is not None:
            self.exit_weights = tuple(float(w) for w in self.exit_weights)
            if any(not w >= 0 for w in self.exit_weights) or not sum(self.exit_weights) > 0:
                raise ValueError(f"--exit-weights must be >= 0 and not all 0, got {list(self.exit_weights)}")
        if self.head_tokens is not None and self.head_tokens < 1:
            raise ValueError(f"--head-tokens must be >= 1, got {self.head_tokens}")
        for name in ("dtype", "save_dtype"):
            if getattr(self, name).lower() not in TRAIN_DTYPES:
                raise ValueError(f"{name} must be float32 or bfloat16, got {getattr(self, name)!r}")

    def fingerprint(self) -> dict:
        d = asdict(self)
        for name in ("save_every", "keep_checkpoint", "threads", "device"):
            d.pop(name)
        d["betas"] = list(d["betas"])
        # Left at their defaults, the newer options stay out: checkpoints written before them still resume.
        if d["exit_weights"] is None:
            d.pop("exit_weights")
        else:
            d["exit_weights"] = list(d["exit_weights"])
        if not d["freeze_head"]:
            d.pop("freeze_head")
        d["dtype"] = str(TRAIN_DTYPES[self.dtype.lower()]).removeprefix("torch.")
        d["save_dtype"] = str(TRAIN_DTYPES[self.save_dtype.lower()]).removeprefix("torch.")
        return d


# ---- the init model --------------------------------------------------------------------------------
@dataclass
class InitModel:
    """A sorted draft to start from, in memory: HF config (depth = the last exit, untied head), weights in
    on-disk names (lm_head.token_ids for a shrunk head), exits and thresholds."""

    name: str
    directory: Path
    config: object
    weights: dict[str, torch.Tensor]
    spec: SortedSpec
    tokenizer: object | None = None

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    @property
    def head_token_ids(self) -> list[int] | None:
        ids = self.weights.get(HEAD_TOKEN_IDS)
        return None if ids is None else ids.tolist()


def sorted_config(config, depth: int):
    """The config of a sorted draft of `depth` layers (as write_sorted saves it)."""
    config = config.__class__.from_dict(config.to_dict())
    config.num_hidden_layers = depth
    config.tie_word_embeddings = False
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    for attr in ("layer_types", "max_window_layers"):
        value = getattr(config, attr, None)
        if isinstance(value, list):
            setattr(config, attr, value[:depth])
    return config


def load_init(init: str | os.PathLike, exits: Sequence[int] | str | None = None) -> InitModel:
    """A sorted draft directory (its exits unless `exits` is given) or any Llama-family model cut to its
    first max(exits) layers (built-in name, HF directory or GGUF; then `exits` is required)."""
    from transformers import AutoConfig

    from specgrove.models.llama import SUPPORTED_MODEL_TYPES
    from specgrove.models.loader import (
        load_tokenizer,
        read_safetensors,
        resolve_model_dir,
    )

    directory = resolve_model_dir(init)
    config = AutoConfig.from_pretrained(str(directory))
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"a sorted draft needs a Llama-family model ({', '.join(SUPPORTED_MODEL_TYPES)}); "
            f"{init} is {config.model_type!r}"
        )
    existing = SortedSpec.load(directory)
    if exits is None or (isinstance(exits, str) and not exits.strip()):
        if existing is None:
            raise ValueError(f"{init} is not a sorted draft (no sorted.json): pass --exits, e.g. --exits 2,4,6,8")
        exits = list(existing.exits)
    exits = parse_exits(exits)
    spec = SortedSpec(exits, [])  # validates: increasing, >= 1
    if exits[-1] > config.num_hidden_layers:
        raise ValueError(
            f"exit {exits[-1]} is deeper than {init}'s {config.num_hidden_layers} layers; "
            f"pass exits of at most {config.num_hidden_layers} layers"
        )
    weights = read_safetensors(directory)
    ids = weights.get(HEAD_TOKEN_IDS)
    weights = truncated_weights(weights, exits[-1])
    if ids is not None:  # keep the shrunk head as it is
        weights[HEAD_TOKEN_IDS] = ids.to(torch.int64)
    thresholds = existing.thresholds if existing is not None and existing.exits == exits else []
    spec = SortedSpec(exits, thresholds, source=str(init), head_tokens=None if ids is None else len(ids))
    return InitModel(str(init), directory, sorted_config(config, exits[-1]), weights, spec, load_tokenizer(directory))


# ---- the trainable model ---------------------------------------------------------------------------
class SortedTrainModel(torch.nn.Module):
    """A transformers causal LM of the draft's depth whose hidden states after each exit's layer go
    through the shared final norm and head. `lm` holds the parameters under their on-disk names."""

    def __init__(self, config, weights: dict[str, torch.Tensor], exits: Sequence[int]):
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.exits = [int(e) for e in exits]
        config = sorted_config(config, self.exits[-1])
        weights = dict(weights)
        token_ids = weights.pop(HEAD_TOKEN_IDS, None)
        self.vocab_size = int(config.vocab_size)
        self.lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        if token_ids is not None:
            self.lm.lm_head = torch.nn.Linear(config.hidden_size, len(token_ids), bias=False)
        missing, unexpected = self.lm.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"the draft's weights do not fit its config: missing {missing[:4]}, unexpected {unexpected[:4]}"
            )
        self.head_token_ids = None if token_ids is None else token_ids.to(torch.int64).clone()
        self.label_map = None  # vocabulary id -> head row, -100 outside the head
        if token_ids is not None:
            self.label_map = torch.full((self.vocab_size,), -100, dtype=torch.int64)
            self.label_map[self.head_token_ids] = torch.arange(len(token_ids))
        self._captured: dict[int, torch.Tensor] = {}
        for exit_ in self.exits:
            self.lm.model.layers[exit_ - 1].register_forward_hook(self._capture_hook(exit_))

    def _capture_hook(self, exit_: int):
        def hook(module, args, output):
            self._captured[exit_] = output[0] if isinstance(output, tuple) else output

        return hook

    def to(self, *args, **kwargs):
        out = super().to(*args, **kwargs)
        device = next(self.parameters()).device
        if self.label_map is not None:
            self.label_map = self.label_map.to(device)
            self.head_token_ids = self.head_token_ids.to(device)
        return out

    # ---- forward ---------------------------------------------------------------------------------
    def exit_hidden(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Hidden states [B, T, H] after each exit's last layer (no final norm), in exit order."""
        self._captured = {}
        self.lm.model(input_ids=input_ids, use_cache=False)
        hidden = [self._captured[e] for e in self.exits]
        self._captured = {}
        return hidden

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Shared final norm + head: [..., H] -> [..., rows of the head]."""
        return self.lm.lm_head(self.lm.model.norm(h))

    @torch.no_grad()
    def exit_logits(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """fp32 logits [B, T, V] of every exit over the whole vocabulary (-inf outside a shrunk head), as
        LlamaModel.truncated(l).logits gives them."""
        out = []
        for h in self.exit_hidden(input_ids):
            logits = self.head_logits(h).float()
            if self.head_token_ids is not None:
                full = torch.full((*logits.shape[:-1], self.vocab_size), float("-inf"), device=logits.device)
                full[..., self.head_token_ids] = logits
                logits = full
            out.append(logits)
        return out

    def _to_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Vocabulary ids -> head rows (-100 stays -100, and so does a token outside a shrunk head)."""
        if self.label_map is None:
            return ids
        return torch.where(ids >= 0, self.label_map[ids.clamp(min=0)], ids)

    def _loss_sum(
        self,
        h: torch.Tensor,
        rows: torch.Tensor,
        soft_rows: torch.Tensor | None = None,
        soft_p: torch.Tensor | None = None,
        kl_weight: float = 0.0,
    ) -> torch.Tensor:
        """Summed loss of hidden states h [N, H]: (1 - w) CE against `rows` [N] + w KL(soft_p || q) over the
        teacher's top-k head rows soft_rows [N, k] (-100 = not in the head; soft_p is 0 there)."""
        logits = self.head_logits(h).float()
        if soft_rows is None or kl_weight == 0.0:
            return F.cross_entropy(logits, rows, reduction="sum")
        logq = torch.log_softmax(logits, -1)
        kl = (torch.xlogy(soft_p, soft_p) - soft_p * logq.gather(1, soft_rows.clamp(min=0))).sum()
        if kl_weight == 1.0:
            return kl
        return (1.0 - kl_weight) * F.nll_loss(logq, rows, reduction="sum") + kl_weight * kl

    def loss(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        soft: tuple[torch.Tensor, torch.Tensor] | None = None,
        kl_weight: float = 0.0,
        exit_weights: Sequence[float] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(the exit_weights-weighted mean (default: the mean) over exits of the token-mean loss, per-exit loss
        [E], number of loss tokens). labels [B, T] are
        vocabulary ids, -100 where no loss is taken; position t predicts labels[t + 1]. soft: the teacher's
        top-k (vocabulary ids [B, T, k], -100 where none; log-probabilities [B, T, k]) aligned with labels;
        with kl_weight w > 0 the loss is (1 - w) CE + w KL(teacher || exit), the teacher's top-k
        renormalised over the tokens the head holds."""
        from torch.utils.checkpoint import checkpoint

        hidden = self.exit_hidden(input_ids)
        targets = self._to_rows(labels[:, 1:])
        mask = targets != -100
        rows = targets[mask]
        count = int(rows.numel())
        soft_rows = soft_p = None
        if soft is not None and kl_weight > 0.0:
            soft_rows = self._to_rows(soft[0][:, 1:][mask])
            soft_p = torch.where(soft_rows >= 0, soft[1][:, 1:][mask].float().exp(), 0.0)
            soft_p = soft_p / soft_p.sum(-1, keepdim=True).clamp(min=1e-12)
        per_exit = []
        for h in hidden:
            selected = h[:, :-1][mask]
            if count == 0:
                per_exit.append(selected.sum() * 0.0)
                continue
            total = None
            for start in range(0, count, CE_CHUNK):
                piece = slice(start, start + CE_CHUNK)
                args = (
                    selected[piece],
                    rows[piece],
                    None if soft_rows is None else soft_rows[piece],
                    None if soft_p is None else soft_p[piece],
                    kl_weight,
                )
                if torch.is_grad_enabled() and count > CE_CHUNK:
                    part = checkpoint(self._loss_sum, *args, use_reentrant=False)
                else:
                    part = self._loss_sum(*args)
                total = part if total is None else total + part
            per_exit.append(total / count)
        per_exit_t = torch.stack(per_exit)
        if exit_weights is None:
            return per_exit_t.mean(), per_exit_t.detach(), count
        if len(exit_weights) != len(per_exit):
            raise ValueError(f"{len(exit_weights)} exit weights for {len(per_exit)} exits")
        w = torch.tensor([float(x) for x in exit_weights], dtype=per_exit_t.dtype, device=per_exit_t.device)
        return (per_exit_t * w).sum() / w.sum(), per_exit_t.detach(), count

    def export_weights(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The weights under their on-disk names (lm_head.token_ids for a shrunk head), on the CPU."""
        out = {name: p.detach().to("cpu", dtype).contiguous() for name, p in self.lm.named_parameters()}
        if self.head_token_ids is not None:
            out[HEAD_TOKEN_IDS] = self.head_token_ids.to("cpu").clone()
        return out


# ---- data ------------------------------------------------------------------------------------------
@dataclass
class Example:
    """One training sequence: ids = prompt + continuation (cut to max_len); the loss covers ids[first:]."""

    ids: list[int]
    first: int
    teacher: tuple[torch.Tensor, torch.Tensor] | None = None  # top-k ids, log-probs [len(ids) - first, k]


def build_examples(
    samples: Iterable, max_len: int, teachers: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
) -> list[Example]:
    """Samples -> examples. A sequence longer than max_len keeps the end of its prompt (at least
    max_len // 2 tokens of it, or all of it) and the start of its continuation; samples with an empty
    continuation give no example. teachers: sample key (specgrove.train.teacher) -> its teacher top-k,
    required for every sample when given."""
    from specgrove.train.teacher import sample_key

    out = []
    for s in samples:
        prompt, output = list(s.prompt_ids), list(s.output_ids)
        if not output or not prompt:
            continue
        if len(prompt) + len(output) > max_len:
            keep = min(len(prompt), max(max_len // 2, max_len - len(output)))
            prompt = prompt[len(prompt) - keep :]
        ids = (prompt + output)[:max_len]
        teacher = None
        if teachers is not None:
            top_ids, top_lp = teachers[sample_key(s)]
            n = len(ids) - len(prompt)
            teacher = (top_ids[:n], top_lp[:n])
        out.append(Example(ids, len(prompt), teacher))
    return out


def examples_digest(examples: Sequence[Example]) -> str:
    import hashlib

    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.first, e.ids]).encode())
        if e.teacher is not None:
            h.update(e.teacher[0].numpy().tobytes())
            h.update(e.teacher[1].numpy().tobytes())
    return h.hexdigest()[:16]


def collate(
    examples: Sequence[Example], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Right-padded input ids [B, L] (pad id 0), labels [B, L] (-100 on prompt and padding) and, when the
    examples have teachers, their top-k aligned with the labels (ids [B, L, k], -100 where no label;
    log-probabilities [B, L, k])."""
    length = max(len(e.ids) for e in examples)
    ids = torch.zeros(len(examples), length, dtype=torch.int64)
    labels = torch.full((len(examples), length), -100, dtype=torch.int64)
    with_teacher = examples[0].teacher is not None
    if with_teacher:
        k = examples[0].teacher[0].shape[1]
        soft_ids = torch.full((len(examples), length, k), -100, dtype=torch.int64)
        soft_lp = torch.zeros(len(examples), length, k)
    for b, e in enumerate(examples):
        ids[b, : len(e.ids)] = torch.tensor(e.ids)
        labels[b, e.first : len(e.ids)] = torch.tensor(e.ids[e.first :])
        if with_teacher:
            soft_ids[b, e.first : len(e.ids)] = e.teacher[0]
            soft_lp[b, e.first : len(e.ids)] = e.teacher[1]
    soft = (soft_ids.to(device), soft_lp.to(device)) if with_teacher else None
    return ids.to(device), labels.to(device), soft


def epoch_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group_by_length: bool = True
) -> list[list[int]]:
    """Example indices of each batch of epoch `epoch`: a permutation drawn from (seed, epoch); with
    grouping, each window of GROUP_WINDOW batches is sorted by length before it is cut into batches and
    the batches are shuffled. Always ceil(n / batch_size) batches."""
    n = len(lengths)
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    perm = torch.randperm(n, generator=generator).tolist()
    if not group_by_length:
        return [perm[i : i + batch_size] for i in range(0, n, batch_size)]
    window = batch_size * GROUP_WINDOW
    batches = []
    for start in range(0, n, window):
        chunk = sorted(perm[start : start + window], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in order]


def choose_head_tokens(
    samples: Iterable, num_tokens: int, eos_ids: Iterable[int], vocab_size: int, allowed: Sequence[int] | None = None
) -> list[int]:
    """The `num_tokens` head tokens (ascending ids): every EOS id, then the most frequent tokens of the
    samples' prompts and continuations (ties: smaller id first), then unseen ids in order. `allowed`
    restricts the choice (an init whose head is already shrunk)."""
    eos = sorted(set(int(t) for t in eos_ids))
    pool = list(range(vocab_size)) if allowed is None else sorted(set(int(t) for t in allowed))
    pool_set = set(pool)
    if num_tokens > len(pool):
        raise ValueError(f"--head-tokens {num_tokens} is more than the {len(pool)} tokens the head can hold")
    missing = [t for t in eos if t not in pool_set]
    if missing:
        raise ValueError(
            f"EOS token(s) {missing} are not in the init draft's head; start from a draft with the full head"
        )
    if len(eos) > num_tokens:
        raise ValueError(f"--head-tokens {num_tokens} cannot hold the targets' {len(eos)} EOS tokens; raise it")
    counts = Counter()
    for s in samples:
        counts.update(s.prompt_ids)
        counts.update(s.output_ids)
    chosen = set(eos)
    ranked = sorted((t for t in pool if t not in chosen), key=lambda t: (-counts.get(t, 0), t))
    chosen.update(ranked[: num_tokens - len(chosen)])
    return sorted(chosen)


def shrink_head(weights: dict[str, torch.Tensor], token_ids: Sequence[int]) -> dict[str, torch.Tensor]:
    """The weights with the head cut to `token_ids` (rows taken from the current head, full or shrunk)."""
    weights = dict(weights)
    head = weights["lm_head.weight"]
    current = weights.pop(HEAD_TOKEN_IDS, None)
    if current is None:
        rows = torch.as_tensor(list(token_ids), dtype=torch.int64)
    else:
        where = {int(t): i for i, t in enumerate(current.tolist())}
        rows = torch.tensor([where[int(t)] for t in token_ids], dtype=torch.int64)
    weights["lm_head.weight"] = head[rows].clone()
    weights[HEAD_TOKEN_IDS] = torch.as_tensor(list(token_ids), dtype=torch.int64)
    return weights


# ---- schedule --------------------------------------------------------------------------------------
def warmup_steps(total: int, warmup: float) -> int:
    return min(total, math.ceil(warmup * total)) if warmup > 0 else 0


def lr_at(step: int, total: int, lr: float, warmup: float) -> float:
    """lr of update `step` (0-based): linear warm-up to lr over the warm-up steps, then cosine to 0."""
    warm = warmup_steps(total, warmup)
    if step < warm:
        return lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---- checkpoints -----------------------------------------------------------------------------------
def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = state
    return out


def _restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    """Set torch's RNG state(s) to those _rng_tensors saved."""
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.split(".")[-1]))
        if cuda:
            torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


def save_checkpoint(
    out: Path,
    params: dict[str, torch.nn.Parameter],
    export: Callable[[], dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    names: list[str],
    state: dict,
    weights: bool = True,
) -> Path:
    """Write OUT/checkpoint atomically (a temporary directory renamed into place): the weights `export()` returns,
    AdamW's moments of `params` (name -> parameter, `names` in the optimizer's order), the RNG states, `state`."""
    from safetensors.torch import save_file

    final = out / CHECKPOINT_DIR
    tmp = out / f"{CHECKPOINT_DIR}.tmp"
    old = out / f"{CHECKPOINT_DIR}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    steps = {}
    if weights:
        save_file(export(), str(tmp / MODEL_FILE), metadata={"format": "pt"})
        tensors = {}
        for name in names:
            st = optimizer.state.get(params[name], {})
            if st:
                tensors[f"{name}.exp_avg"] = st["exp_avg"].detach().to("cpu").contiguous()
                tensors[f"{name}.exp_avg_sq"] = st["exp_avg_sq"].detach().to("cpu").contiguous()
                steps[name] = float(st["step"])
        tensors.update(_rng_tensors())
        save_file(tensors, str(tmp / OPTIMIZER_FILE), metadata={"format": "pt"})
    state = {**state, "optimizer_steps": steps}
    (tmp / STATE_FILE).write_text(json.dumps(state) + "\n", encoding="utf-8")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(out: Path) -> Path | None:
    """OUT/checkpoint, or checkpoint.old when a crash fell between the two renames of a save."""
    for name in (CHECKPOINT_DIR, f"{CHECKPOINT_DIR}.old"):
        if (out / name / STATE_FILE).exists():
            return out / name
    return None


def restore_optimizer(
    optimizer: torch.optim.Optimizer, names: list[str], tensors: dict[str, torch.Tensor], steps: dict[str, float]
) -> None:
    state_dict = optimizer.state_dict()
    state_dict["state"] = {}
    for index, name in enumerate(names):
        if name in steps:
            state_dict["state"][index] = {
                "step": torch.tensor(float(steps[name]), dtype=torch.float32),
                "exp_avg": tensors[f"{name}.exp_avg"],
                "exp_avg_sq": tensors[f"{name}.exp_avg_sq"],
            }
    optimizer.load_state_dict(state_dict)


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log lines of steps 1..step (a run that died after its last checkpoint logged more)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            break
    path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")


# ---- training: the plan, the run, and its steps ----------------------------------------------------
def _say(log, msg: str) -> None:
    (log or (lambda m: print(f"[specgrove] {m}", file=sys.stderr, flush=True)))(msg)


@dataclass
class TrainPlan:
    """What the samples and settings fix before the first step: the examples, the number of steps, and the
    fingerprint a checkpoint has to match to be resumed."""

    samples: list
    examples: list[Example]
    exits: list[int]
    eos: list[int]  # the targets' EOS tokens, sorted (a shrunk head keeps them)
    batches_per_epoch: int
    total_steps: int
    fingerprint: dict

    @property
    def lengths(self) -> list[int]:
        return [len(e.ids) for e in self.examples]

    @property
    def loss_tokens(self) -> int:
        return sum(len(e.ids) - e.first for e in self.examples)

    @property
    def sequence_tokens(self) -> int:
        return sum(len(e.ids) for e in self.examples)


def _check_samples(samples: Sequence, vocab_size: int) -> None:
    for s in samples:
        ids = list(s.prompt_ids) + list(s.output_ids)
        if ids and (min(ids) < 0 or max(ids) >= vocab_size):
            raise ValueError(
                f"a sample of {s.target or 'the data'} has token ids outside the draft's vocabulary "
                f"[0, {vocab_size}); the targets must share the draft's tokenizer"
            )


def plan_training(
    init: InitModel,
    samples: Sequence,
    settings: SoftSettings,
    eos_ids: Iterable[int],
    teachers: dict[str, tuple[torch.Tensor, torch.Tensor]] | None,
) -> TrainPlan:
    """Check the settings against the draft and the data, and turn the samples into examples."""
    exits = list(init.spec.exits)
    if settings.exit_weights is not None and len(settings.exit_weights) != len(exits):
        raise ValueError(
            f"--exit-weights gives {len(settings.exit_weights)} weights for the {len(exits)} exits "
            f"{exits}: give one per exit, e.g. {','.join(['1'] * (len(exits) - 1) + ['4'])}"
        )
    samples = list(samples)
    _check_samples(samples, init.vocab_size)
    if settings.kl_weight > 0 and teachers is None:
        raise ValueError("--kl-weight > 0 needs the targets' distributions (specgrove.train.teacher.compute_teachers)")
    examples = build_examples(samples, settings.max_len, teachers if settings.kl_weight > 0 else None)
    if not examples:
        raise ValueError(
            "the data has no continuation tokens to train on (no samples, or every output is empty); "
            "check --data / --targets and raise --max-new-tokens"
        )
    batches_per_epoch = math.ceil(len(examples) / settings.batch_size)
    total = settings.max_steps if settings.max_steps is not None else settings.epochs * batches_per_epoch
    eos = sorted(set(int(t) for t in eos_ids))
    fingerprint = {
        "settings": settings.fingerprint(),
        "init": init.name,
        "exits": exits,
        "data": examples_digest(examples),
        "examples": len(examples),
        "total_steps": total,
    }
    if settings.head_tokens is not None:
        fingerprint["eos_ids"] = eos
    return TrainPlan(samples, examples, exits, eos, batches_per_epoch, total, fingerprint)


def resumable_checkpoint(out: Path, fingerprint: dict) -> tuple[Path | None, dict | None]:
    """This run's checkpoint in OUT and its state, or (None, None); a checkpoint of another run is refused."""
    checkpoint_dir = find_checkpoint(out)
    if checkpoint_dir is None:
        return None, None
    state = json.loads((checkpoint_dir / STATE_FILE).read_text(encoding="utf-8"))
    if state.get("fingerprint") != fingerprint:
        raise SpecgroveError(
            f"{checkpoint_dir} belongs to a run with other settings or data; to resume, run the same command "
            f"again; to start over, delete {checkpoint_dir} or pass another --out "
            f"(checkpoint: {json.dumps(state.get('fingerprint'))}; now: {json.dumps(fingerprint)})"
        )
    return checkpoint_dir, state


def _already_trained(out: Path, checkpoint_dir: Path, state: dict, log) -> dict:
    from specgrove.models.sorted import SORTED_FILE

    if not (out / SORTED_FILE).exists():
        raise SpecgroveError(
            f"{out} holds a finished run's checkpoint but no trained draft; delete {checkpoint_dir} to train again"
        )
    _say(log, f"{out} is already trained ({state['step']} steps); delete {checkpoint_dir} to train again")
    return {**state.get("summary", {}), "status": "already-completed", "out": str(out)}


def build_model(
    init: InitModel, plan: TrainPlan, settings: SoftSettings, device: torch.device, checkpoint_dir: Path | None
) -> SortedTrainModel:
    """The trainable draft on `device`: the checkpoint's weights, or (seeded with settings.seed) init's with
    the head cut to settings.head_tokens."""
    if checkpoint_dir is not None:
        from safetensors.torch import load_file

        weights = load_file(str(checkpoint_dir / MODEL_FILE))
    else:
        torch.manual_seed(settings.seed)
        weights = init.weights
        if settings.head_tokens is not None:
            head_ids = choose_head_tokens(
                plan.samples, settings.head_tokens, plan.eos, init.vocab_size, allowed=init.head_token_ids
            )
            weights = shrink_head(weights, head_ids)
    model = SortedTrainModel(init.config, weights, plan.exits).to(device)
    model.train()
    return model


def build_optimizer(model: SortedTrainModel, settings: SoftSettings) -> tuple[torch.optim.Optimizer, list[str]]:
    """AdamW over every parameter (but the final norm and head with freeze_head), and their names in order."""
    named = []
    for name, param in model.lm.named_parameters():
        if settings.freeze_head and name in HEAD_PARAMETERS:
            param.requires_grad_(False)
        else:
            named.append((name, param))
    optimizer = torch.optim.AdamW(
        [p for _, p in named],
        lr=settings.lr,
        betas=settings.betas,
        eps=settings.eps,
        weight_decay=settings.weight_decay,
    )
    return optimizer, [n for n, _ in named]


@dataclass
class SoftRun:
    """A training run in progress: what it trains and with what, and the counters a checkpoint keeps."""

    out: Path
    settings: SoftSettings
    init: InitModel
    plan: TrainPlan
    model: SortedTrainModel
    optimizer: torch.optim.Optimizer
    names: list[str]  # the trained parameters, in the optimizer's order
    device: torch.device
    resumed: bool = False
    start_step: int = 0  # the first step of this call: 0, or the resumed checkpoint's step
    tokens: int = 0  # loss tokens trained on
    sequence_tokens: int = 0  # tokens of the sequences trained on (padding not counted)
    elapsed_before: float = 0.0  # wall time of the calls before a resume
    losses: list[float] = field(default_factory=list)  # the loss of every step so far
    exit_losses: list[float] = field(default_factory=list)  # the last step's loss of each exit
    started: float = field(default_factory=time.perf_counter)
    epoch_order: dict[int, list[list[int]]] = field(default_factory=dict)  # the current epoch's batches

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started


def restore_run(run: SoftRun, checkpoint_dir: Path, state: dict) -> None:
    """Continue from a checkpoint: AdamW's moments and step counts, torch's RNG state(s), the counters."""
    from safetensors.torch import load_file

    tensors = load_file(str(checkpoint_dir / OPTIMIZER_FILE))
    restore_optimizer(run.optimizer, run.names, tensors, state["optimizer_steps"])
    _restore_rng(tensors)
    run.resumed = True
    run.start_step = int(state["step"])
    run.tokens, run.sequence_tokens = int(state["tokens"]), int(state["sequence_tokens"])
    run.elapsed_before, run.losses = float(state["elapsed_s"]), list(state["loss_history"])


def write_train_config(run: SoftRun, data_info: dict | None) -> dict:
    """train_config.json: the settings, the init, the data and the versions this run trains with."""
    settings, plan, init = run.settings, run.plan, run.init
    head_ids = run.model.head_token_ids
    record = {
        "settings": asdict(settings) | {"betas": list(settings.betas)},
        "init": init.name,
        "init_dir": str(init.directory),
        "exits": plan.exits,
        "thresholds": init.spec.thresholds,
        "head_tokens": None if head_ids is None else len(head_ids),
        "eos_ids": plan.eos,
        "data": {
            **(data_info or {}),
            "samples": len(plan.samples),
            "examples": len(plan.examples),
            "loss_tokens": plan.loss_tokens,
            "sequence_tokens": plan.sequence_tokens,
            "digest": plan.fingerprint["data"],
        },
        "total_steps": plan.total_steps,
        "batches_per_epoch": plan.batches_per_epoch,
        "warmup_steps": warmup_steps(plan.total_steps, settings.warmup),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "resumed_from_step": run.start_step if run.resumed else None,
    }
    (run.out / TRAIN_CONFIG).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def open_train_log(run: SoftRun) -> TextIO:
    """train_log.jsonl, to append to: a fresh run starts it over, a resumed one keeps the lines of the steps
    up to its checkpoint."""
    path = run.out / TRAIN_LOG
    if run.resumed:
        _truncate_log(path, run.start_step)
    else:
        path.unlink(missing_ok=True)
    return open(path, "a", encoding="utf-8")


def progress_bar(run: SoftRun, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=run.plan.total_steps,
        initial=run.start_step,
        desc="train-sorted",
        unit="step",
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
    )


def batch_at(run: SoftRun, step: int) -> list[Example]:
    """Step `step`'s batch, a function of (seed, step) alone; each epoch's order is drawn once."""
    settings = run.settings
    epoch, position = divmod(step, run.plan.batches_per_epoch)
    if epoch not in run.epoch_order:
        run.epoch_order = {
            epoch: epoch_batches(run.plan.lengths, settings.batch_size, settings.seed, epoch, settings.group_by_length)
        }
    return [run.plan.examples[i] for i in run.epoch_order[epoch][position]]


@dataclass
class StepResult:
    """What one update measured."""

    loss: torch.Tensor  # the weighted mean over the exits (the one backpropagated)
    exit_losses: torch.Tensor  # [E]
    loss_tokens: int
    lr: float
    grad_norm: float  # before clipping


def train_step(run: SoftRun, step: int, batch: Sequence[Example]) -> StepResult:
    """One update: the schedule's lr, every exit's forward and the SoFT loss over them (SortedTrainModel.loss),
    backward, gradient clipping, AdamW."""
    settings, model, optimizer = run.settings, run.model, run.optimizer
    input_ids, labels, soft = collate(batch, run.device)
    lr = lr_at(step, run.plan.total_steps, settings.lr, settings.warmup)
    for group in optimizer.param_groups:
        group["lr"] = lr
    bf16 = TRAIN_DTYPES[settings.dtype.lower()] == torch.bfloat16
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss, per_exit, count = model.loss(input_ids, labels, soft, settings.kl_weight, settings.exit_weights)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip))
    optimizer.step()
    return StepResult(loss, per_exit, count, lr, grad_norm)


def record_step(run: SoftRun, step: int, batch: Sequence[Example], result: StepResult) -> dict:
    """Count the step into the run; its line of train_log.jsonl."""
    run.tokens += result.loss_tokens
    run.sequence_tokens += int(sum(len(e.ids) for e in batch))
    mean = float(result.loss.detach())
    run.exit_losses = [float(x) for x in result.exit_losses]
    run.losses.append(mean)
    return {
        "step": step + 1,
        "loss": mean,
        "loss_exits": {str(e): v for e, v in zip(run.plan.exits, run.exit_losses)},
        "lr": result.lr,
        "grad_norm": result.grad_norm,
        "tokens": run.tokens,
        "sequence_tokens": run.sequence_tokens,
        "epoch": step // run.plan.batches_per_epoch,
        "elapsed_s": round(run.elapsed(), 3),
    }


def log_step(log_file: TextIO, bar, record: dict) -> None:
    log_file.write(json.dumps(record) + "\n")
    log_file.flush()
    bar.set_postfix(loss=f"{record['loss']:.3f}", **{f"l{e}": f"{v:.2f}" for e, v in record["loss_exits"].items()})
    bar.update()


def checkpoint_state(run: SoftRun, step: int, completed: bool = False, summary: dict | None = None) -> dict:
    """state.json of a checkpoint after `step` steps (save_checkpoint adds AdamW's step counts)."""
    settings, plan = run.settings, run.plan
    total = plan.total_steps
    epoch, position = divmod(step, plan.batches_per_epoch)
    return {
        "step": step,
        "total_steps": total,
        "completed": completed,
        "fingerprint": plan.fingerprint,
        "schedule": {
            "kind": "linear warm-up + cosine",
            "step": step,
            "lr": settings.lr,
            "warmup_steps": warmup_steps(total, settings.warmup),
            "total_steps": total,
        },
        "data": {
            "seed": settings.seed,
            "epoch": epoch,
            "position": position,
            "batches_per_epoch": plan.batches_per_epoch,
        },
        "tokens": run.tokens,
        "sequence_tokens": run.sequence_tokens,
        "elapsed_s": run.elapsed(),
        "loss_history": run.losses,
        "summary": summary or {},
    }


def save_run(run: SoftRun, step: int, summary: dict | None = None) -> None:
    """Checkpoint after `step` steps; with a summary, the finished run's (weights only with keep_checkpoint)."""
    completed = summary is not None
    save_checkpoint(
        run.out,
        dict(run.model.lm.named_parameters()),
        lambda: run.model.export_weights(torch.float32),
        run.optimizer,
        run.names,
        checkpoint_state(run, step, completed, summary),
        weights=run.settings.keep_checkpoint if completed else True,
    )


def run_summary(run: SoftRun) -> dict:
    wall, steps = run.elapsed(), len(run.losses)
    return {
        "out": str(run.out),
        "steps": steps,
        "total_steps": run.plan.total_steps,
        "final_loss": run.losses[-1] if run.losses else None,
        "final_loss_exits": dict(zip(map(str, run.plan.exits), run.exit_losses)),
        "tokens": run.tokens,
        "sequence_tokens": run.sequence_tokens,
        "wall_s": wall,
        "s_per_step": wall / steps if steps else None,
    }


def write_trained_draft(run: SoftRun, config_record: dict, summary: dict) -> None:
    """OUT as a sorted draft directory; sorted.json's extra records how it was trained."""
    init, head_ids = run.init, run.model.head_token_ids
    spec = SortedSpec(
        run.plan.exits,
        init.spec.thresholds,
        source=init.name,
        head_tokens=None if head_ids is None else len(head_ids),
        extra={
            "soft": {
                "settings": config_record["settings"],
                "data": config_record["data"],
                "eos_ids": run.plan.eos,
                "steps": run.plan.total_steps,
                "tokens": run.tokens,
                "sequence_tokens": run.sequence_tokens,
                "wall_s": summary["wall_s"],
                "final_loss": summary["final_loss"],
                "final_loss_exits": summary["final_loss_exits"],
                "torch": torch.__version__,
            }
        },
    )
    save_dtype = TRAIN_DTYPES[run.settings.save_dtype.lower()]
    write_sorted(run.out, init.config, run.model.export_weights(save_dtype), spec, tokenizer_from=init.directory)


def train_soft(
    init: InitModel | str | os.PathLike,
    samples: Sequence,
    out: str | os.PathLike,
    settings: SoftSettings | None = None,
    exits: Sequence[int] | str | None = None,
    eos_ids: Iterable[int] = (),
    data_info: dict | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    stop_after: int | None = None,
    teachers: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict:
    """Sorted fine-tuning of `init` on distillation `samples` (specgrove.train.data.Sample), writing the
    trained sorted draft to `out`, resuming from out/checkpoint when there is one.

    init: an InitModel (`load_init`) or what load_init takes, with `exits`. eos_ids: the targets' EOS
    tokens, kept in a shrunk head. data_info: provenance for train_config.json. stop_after: stop (with a
    checkpoint) after that many steps of this call, as an interruption would (for tests). teachers: every
    sample's teacher top-k (specgrove.train.teacher.compute_teachers), needed when settings.kl_weight > 0.
    Returns a summary: status ("completed", "stopped" or "already-completed"), steps, losses, tokens, wall time."""
    settings = settings or SoftSettings()
    if not isinstance(init, InitModel):
        init = load_init(init, exits)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = torch.device(settings.device)
    plan = plan_training(init, samples, settings, eos_ids, teachers)
    total = plan.total_steps
    checkpoint_dir, state = resumable_checkpoint(out, plan.fingerprint)
    if state is not None and state.get("completed"):
        return _already_trained(out, checkpoint_dir, state, log)

    model = build_model(init, plan, settings, device, checkpoint_dir)
    optimizer, names = build_optimizer(model, settings)
    run = SoftRun(out, settings, init, plan, model, optimizer, names, device)
    if state is not None:
        restore_run(run, checkpoint_dir, state)
        _say(log, f"resuming {out} from step {run.start_step} of {total}")
    config_record = write_train_config(run, data_info)

    stopped = False
    with open_train_log(run) as log_file, progress_bar(run, progress) as bar:
        for step in range(run.start_step, total):
            batch = batch_at(run, step)
            log_step(log_file, bar, record_step(run, step, batch, train_step(run, step, batch)))
            done = step + 1
            stopped = stop_after is not None and done - run.start_step >= stop_after and done < total
            if stopped or (done % settings.save_every == 0 and done < total):
                save_run(run, done)
            if stopped:
                break

    summary = run_summary(run)
    if stopped:
        _say(log, f"stopped after step {len(run.losses)} of {total}; run the same command again to resume")
        return {**summary, "status": "stopped"}
    write_trained_draft(run, config_record, summary)
    save_run(run, total, summary)
    _say(
        log, f"trained {total} steps in {summary['wall_s']:.1f} s; final loss {summary['final_loss']:.4f}; wrote {out}"
    )
    return {**summary, "status": "completed"}
