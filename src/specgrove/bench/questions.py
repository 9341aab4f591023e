"""Spec-Bench's questions: the file (`find_spec_bench`), the mixed-category choice of the benchmark
(`load_questions`) and the chat-templated prompts (`encode_questions`). Data only: the benchmark, tuning,
training and the load test all read their prompts through here."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from specgrove.errors import SpecgroveError

SPEC_BENCH_ENV = "SPECGROVE_SPEC_BENCH"
SPEC_BENCH_RELATIVE = Path("shared/data/spec_bench/question.jsonl")


@dataclass
class BenchPrompt:
    question_id: int | str
    category: str
    token_ids: list[int]
    text: str | None = None


def find_spec_bench(path: str | os.PathLike | None = None) -> Path:
    """The Spec-Bench question file: `path`, else $SPECGROVE_SPEC_BENCH, else the first
    shared/data/spec_bench/question.jsonl found walking up from the current directory or this package."""
    explicit = path if path is not None else os.environ.get(SPEC_BENCH_ENV)
    if explicit:
        found = Path(explicit).expanduser()
        if not found.is_file():
            source = "--data" if path is not None else f"${SPEC_BENCH_ENV}"
            raise SpecgroveError(
                f"Spec-Bench question file {found} ({source}) does not exist; pass the path of question.jsonl"
            )
        return found
    starts = [Path.cwd().resolve(), Path(__file__).resolve().parent]
    for start in starts:
        for directory in (start, *start.parents):
            candidate = directory / SPEC_BENCH_RELATIVE
            if candidate.is_file():
                return candidate
    raise SpecgroveError(
        f"could not find {SPEC_BENCH_RELATIVE} in any parent of {starts[0]} or {starts[1]}; pass --data PATH "
        f"or set {SPEC_BENCH_ENV} to Spec-Bench's question.jsonl"
    )


def load_questions(
    path: str | os.PathLike, limit: int | None = 20, categories: Sequence[str] | None = None
) -> list[dict]:
    """Read question.jsonl and choose `limit` questions of mixed categories: round-robin over the
    categories in file order (so 20 prompts cover all 13), each category's questions in file order."""
    questions = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
            except json.JSONDecodeError as e:
                raise SpecgroveError(f"{path}:{line_no} is not JSON ({e})") from None
            if not (
                isinstance(q, dict)
                and isinstance(q.get("category"), str)
                and isinstance(q.get("turns"), list)
                and q["turns"]
                and isinstance(q["turns"][0], str)
            ):
                raise SpecgroveError(
                    f"{path}:{line_no} is not a Spec-Bench question; expected "
                    f'{{"question_id", "category", "turns": ["...", ...]}}'
                )
            questions.append(q)
    by_category: dict[str, list[dict]] = {}
    for q in questions:
        by_category.setdefault(q["category"], []).append(q)
    if categories:
        unknown = [c for c in categories if c not in by_category]
        if unknown:
            raise ValueError(
                f"unknown categor{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)}; "
                f"{path} has: {', '.join(by_category)}"
            )
        by_category = {c: by_category[c] for c in by_category if c in categories}
    total = sum(len(v) for v in by_category.values())
    limit = total if limit is None else min(limit, total)
    chosen: list[dict] = []
    round_index = 0
    while len(chosen) < limit:
        for qs in by_category.values():
            if round_index < len(qs) and len(chosen) < limit:
                chosen.append(qs[round_index])
        round_index += 1
    return chosen


def encode_questions(questions: list[dict], tokenizer) -> list[BenchPrompt]:
    """First turn of each question through the target's chat template."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "Spec-Bench prompts go through the target's chat template, and this target has none; "
            "pass prompts as token ids instead"
        )
    prompts = []
    for q in questions:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": q["turns"][0]}], add_generation_prompt=True, tokenize=False
        )
        prompts.append(
            BenchPrompt(
                q.get("question_id", len(prompts)),
                q["category"],
                tokenizer.encode(text, add_special_tokens=False),
                q["turns"][0],
            )
        )
    return prompts
