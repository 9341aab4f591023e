"""`specgrove train-eagle` on tiny models: the features come from the generation itself, training lowers the loss,
a stopped run resumes to the same weights, the head drafts, and bad input gets a clear message."""

import json

import pytest
import torch
from safetensors.torch import load_file

from specgrove.engine.engine import SpecEngine
from specgrove.models.eagle import read_head
from specgrove.sampling import SamplingParams
from specgrove.train.data import batched_generate
from specgrove.train.eagle import TRAINABLE_CATEGORIES, eagle_questions, teacher_features

from test_cli import run_cli

PROMPTS = ["abcab", "cdcdc", "hgfe", "aabbaa", "bcdbcd", "efgh", "fedcba", "gaga", "hhab", "dcba", "abab", "cece"]


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


def train_args(tiny_dirs, prompts_file, out, *extra):
    return [
        "train-eagle",
        "--target",
        tiny_dirs["target"],
        "--out",
        out,
        "--data",
        prompts_file,
        "--max-new-tokens",
        "10",
        "--gen-batch",
        "3",
        "--feature-layers",
        "0,-1",
        "--intermediate-size",
        "24",
        "--batch-size",
        "2",
        "--epochs",
        "3",
        "--lr",
        "3e-3",
        "--holdout",
        "0.2",
        "--save-every",
        "4",
        "--no-progress",
        *extra,
    ]


def test_generation_gives_the_features_of_teacher_forcing(tiny_target):
    prompts = [[1, 2, 3, 1], [4, 5], [7, 6, 5, 4, 3, 2, 1]]
    got = {}
    outputs = batched_generate(
        tiny_target.model, prompts, 6, batch_size=2, features=[0, -1], on_features=got.__setitem__
    )
    for i, (p, out) in enumerate(zip(prompts, outputs)):
        expected = teacher_features(tiny_target.model, p + out, [0, -1])
        assert got[i].shape == (len(p) + len(out) - 1, 2 * tiny_target.model.config.hidden_size)
        torch.testing.assert_close(got[i].float(), expected.float(), atol=2e-2, rtol=2e-2)


def test_train_eagle_trains_resumes_and_drafts(tiny_dirs, tiny_target, prompts_file, tmp_path, capsys):
    out = tmp_path / "head"
    code, stdout, err = run_cli(train_args(tiny_dirs, prompts_file, out), capsys)
    assert code == 0, err
    assert "draft head:" in stdout
    log = [json.loads(line) for line in (tmp_path / "head-work" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 15  # 10 training samples, 2 per step, 3 epochs
    first, last = sum(r["loss"] for r in log[:3]) / 3, sum(r["loss"] for r in log[-3:]) / 3
    assert last < first * 0.9, (first, last)
    config, weights = read_head(out)
    assert config.feature_layers == [0, 1] and config.training["held_out_examples"] == 2
    assert len(config.training["held_out_agreement"]) == 3
    # stopped after 4 steps, then the same command again: the weights of the uninterrupted run, bit for bit
    resumed = tmp_path / "resumed"
    code, stdout, err = run_cli(train_args(tiny_dirs, prompts_file, resumed, "--stop-after", "5"), capsys)
    assert code == 0 and "run the same command" in stdout, err
    code, _, err = run_cli(train_args(tiny_dirs, prompts_file, resumed), capsys)
    assert code == 0, err
    a, b = load_file(str(out / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the head drafts through the engine, and greedy output stays the target's
    code, stdout, err = run_cli(
        [
            "generate",
            "--target",
            tiny_dirs["target"],
            "--dtype",
            "float32",
            "--method",
            "eagle:dynamic:4,2,2",
            "--eagle-head",
            out,
            "--prompt-ids",
            "1,2,3,1,2",
            "--max-new-tokens",
            "12",
            "--max-model-len",
            "64",
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    record = json.loads(stdout)
    plain = SpecEngine(tiny_target, None, 0, 64)
    expected = plain.generate(plain.new_sequence([1, 2, 3, 1, 2], SamplingParams(temperature=0, max_tokens=12)))
    assert record["token_ids"] == expected.output_ids
    assert record["metrics"]["draft_forwards"] > 0


def test_train_eagle_refuses_bad_input(tiny_dirs, prompts_file, tmp_path, capsys):
    out = tmp_path / "head"
    code, _, err = run_cli(train_args(tiny_dirs, prompts_file, out, "--feature-layers", "1,0"), capsys)
    assert code == 2 and "feature layers must increase and end with the target's last layer" in err
    code, _, err = run_cli(train_args(tiny_dirs, prompts_file, out, "--holdout", "1.5"), capsys)
    assert code == 2 and "held-out fraction" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, _, err = run_cli(train_args(tiny_dirs, empty, out), capsys)
    assert code == 2 and "no prompts" in err
    code, _, err = run_cli(train_args(tiny_dirs, prompts_file, out, "--ttt-steps", "0"), capsys)
    assert code == 2 and "integer >= 1" in err


def test_training_prompts_leave_out_public_evaluation_sets():
    """Spec-Bench's MT-bench questions and GSM8K's never become training prompts, nor the bench's own 20."""
    from specgrove.bench.questions import find_spec_bench, load_questions
    from specgrove.errors import SpecgroveError

    try:
        path = find_spec_bench()
    except SpecgroveError:
        pytest.skip("no Spec-Bench file on this machine")
    questions = load_questions(path, None)
    bench = {q["question_id"] for q in load_questions(path, 20)}
    got = eagle_questions()
    assert got and {q["category"] for q in got} <= set(TRAINABLE_CATEGORIES)
    assert not bench & {q["question_id"] for q in got}
    assert len(got) == sum(q["category"] in TRAINABLE_CATEGORIES for q in questions) - sum(
        q["category"] in TRAINABLE_CATEGORIES for q in questions[:20]
    )


def test_self_instruct_asks_for_distinct_requests():
    from specgrove.train.self_instruct import STYLES, TOPICS, instruction_texts

    texts = instruction_texts(128)
    assert len(set(texts)) == 128 and all(t for t in texts)
    with pytest.raises(ValueError, match="at most"):
        instruction_texts(len(TOPICS) * len(STYLES) + 1)


def test_train_eagle_takes_finished_samples_and_computes_their_features(tiny_dirs, prompts_file, tmp_path, capsys):
    first = tmp_path / "first"
    code, _, err = run_cli(train_args(tiny_dirs, prompts_file, first, "--data-only"), capsys)
    assert code == 0, err
    samples = tmp_path / "first-work" / "samples.jsonl"
    out = tmp_path / "from-samples"
    code, stdout, err = run_cli(train_args(tiny_dirs, samples, out, "--max-steps", "2"), capsys)
    assert code == 0, err
    features = sorted((tmp_path / "from-samples-work" / "features").glob("*.safetensors"))
    assert len(features) == len(PROMPTS)  # teacher-forced, one file per sample
    theirs = {p.name: load_file(str(p))["features"] for p in (tmp_path / "first-work" / "features").glob("*")}
    for p in features:  # the same features as the generation's own (bf16, up to batch rounding)
        torch.testing.assert_close(load_file(str(p))["features"].float(), theirs[p.name].float(), atol=2e-2, rtol=2e-2)
    assert read_head(out)[0].training["steps"] == 2
