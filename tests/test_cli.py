"""The `specgrove` command and the benchmark runner, on tiny random models only (no real model loads)."""

import json
import subprocess
import sys

import pytest

from specgrove import SamplingParams
from specgrove.bench.bandwidth import measure_memory_bandwidth
from specgrove.bench.spec_bench import (
    BenchConfig,
    BenchPrompt,
    find_spec_bench,
    load_questions,
    print_report,
    run_bench,
)
from specgrove.cli import main
from specgrove.errors import SpecgroveError
from specgrove.models import defaults
from specgrove.sampling import choice_seed

from conftest import DEVICE, tiny_llm


def run_cli(argv, capsys):
    """main(argv) -> (exit code, stdout, stderr); argparse's own errors arrive as SystemExit."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def tiny_generate_args(tiny_dirs, *extra):
    return [
        "generate",
        "--target",
        tiny_dirs["target"],
        "--draft",
        tiny_dirs["draft"],
        "--dtype",
        "float32",
        "--device",
        DEVICE,
        "--prompt-ids",
        "1,2,3,4,1,2,3",
        "--max-new-tokens",
        "12",
        *extra,
    ]


# ---- generate --------------------------------------------------------------------------------------
def test_generate_json_on_tiny_model(tiny_dirs, capsys):
    code, out, err = run_cli(tiny_generate_args(tiny_dirs, "--json"), capsys)
    assert code == 0, err
    result = json.loads(out)
    assert set(result) >= {"text", "token_ids", "finish_reason", "metrics", "method", "k"}
    assert result["method"] == "draft_model" and result["k"] == 4
    assert len(result["token_ids"]) == 12 and result["finish_reason"] == "length"
    metrics = result["metrics"]
    assert metrics["generated_tokens"] == 12
    assert 1 <= metrics["target_forwards"] <= 12
    assert 1.0 <= metrics["mean_accept_length"] <= 5.0

    # Greedy speculation is lossless: the same tokens as plain decoding and as prompt lookup.
    for method in ("none", "prompt_lookup"):
        code, out, err = run_cli(tiny_generate_args(tiny_dirs, "--json", "--method", method), capsys)
        assert code == 0, err
        other = json.loads(out)
        assert other["token_ids"] == result["token_ids"], method
        assert other["method"] == method and other["k"] == (0 if method == "none" else 4)


def test_generate_text_prints_stats(tiny_dirs, capsys):
    code, out, err = run_cli(tiny_generate_args(tiny_dirs, "-k", "3"), capsys)
    assert code == 0, err
    for line in (
        "tokens generated",
        "tokens/s",
        "target forwards",
        "mean accept length",
        "acceptance rate",
        "per-position accept",
        "draft",
        "target",
    ):
        assert line in out


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--temperature", "-1"], "temperature"),
        (["-k", "-1"], "num_speculative_tokens"),
        (["--top-p", "0"], "top_p"),
        (["--prompt-lookup-min", "3", "--prompt-lookup-max", "2", "--method", "prompt_lookup"], "prompt_lookup_min"),
        (["--n", "0"], "n (independent choices per prompt) must be an integer in [1, 16]"),
        (["--n", "17"], "n (independent choices per prompt)"),
        (["--logprobs", "21"], "logprobs must be None or an integer in [0, 20]"),
        (["--logprobs", "-1"], "logprobs"),
        (["--presence-penalty", "2.5"], "presence_penalty must be a number in [-2.0, 2.0]"),
        (["--frequency-penalty", "-3"], "frequency_penalty"),
        (["--repetition-penalty", "0"], "repetition_penalty must be a number in [0.01, 100]"),
    ],
)
def test_generate_bad_settings_exit_2(tiny_dirs, capsys, extra, needle):
    code, out, err = run_cli(tiny_generate_args(tiny_dirs, *extra), capsys)
    assert code == 2
    assert err.startswith("error: ") and needle in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_generate_n_penalties_and_logprobs_flags(tiny_dirs, capsys):
    """--n, the penalties and --logprobs reach the request: the CLI's choices are the API's for the same
    SamplingParams (choice i seeded by choice_seed), and each token's logprobs are the target's."""
    llm = tiny_llm(tiny_dirs, k=4)
    prompt = [1, 2, 3, 4, 1, 2, 3]

    def cli_json(*extra):
        code, out, err = run_cli(tiny_generate_args(tiny_dirs, "--json", *extra), capsys)
        assert code == 0, err
        return json.loads(out)

    greedy = cli_json()
    result = cli_json("--n", "3")
    assert [c["index"] for c in result["choices"]] == [0, 1, 2]
    assert [c["token_ids"] for c in result["choices"]] == [greedy["token_ids"]] * 3
    assert result["token_ids"] == greedy["token_ids"] and result["metrics"]["generated_tokens"] == 36

    sampled = cli_json("--n", "2", "--temperature", "1", "--seed", "4")
    lone = [cli_json("--temperature", "1", "--seed", choice_seed(4, i))["token_ids"] for i in range(2)]
    assert [c["token_ids"] for c in sampled["choices"]] == lone and lone[0] != lone[1]

    penalties = ["--repetition-penalty", "3", "--presence-penalty", "1.5", "--frequency-penalty", "0.5"]
    penalised = cli_json(*penalties)
    params = SamplingParams(
        temperature=0, max_tokens=12, repetition_penalty=3, presence_penalty=1.5, frequency_penalty=0.5
    )
    assert penalised["token_ids"] == llm.generate(prompt, params)[0].token_ids
    assert penalised["token_ids"] != greedy["token_ids"], "these penalties change the greedy output"

    top = cli_json("--logprobs", "2")
    expected = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, logprobs=2))[0].outputs[0].logprobs
    assert top["logprobs"] == top["choices"][0]["logprobs"] and len(top["logprobs"]) == 12
    for entry, want, token in zip(top["logprobs"], expected, top["token_ids"]):
        assert entry["token_id"] == token == want.token_id and entry["token"] == llm.tokenizer.decode([token])
        assert entry["logprob"] == pytest.approx(want.logprob, abs=1e-5)
        assert [t["token_id"] for t in entry["top"]] == [t for t, _ in want.top]
        assert [t["logprob"] for t in entry["top"]] == pytest.approx([lp for _, lp in want.top], abs=1e-5)
    assert greedy["logprobs"] is None

    # the text form: a header per choice and one line per token with its top tokens
    code, out, err = run_cli(tiny_generate_args(tiny_dirs, "--n", "2", "--logprobs", "1"), capsys)
    assert code == 0, err
    assert out.count("=== choice") == 2 and out.count("--- logprobs (the target's, top 1)") == 2
    lines = [line for line in out.splitlines() if "   top: " in line]
    assert len(lines) == 24 and lines[0].split()[:3] == [
        "0",
        repr(top["logprobs"][0]["token"]),
        f"{expected[0].logprob:.4f}",
    ]
    assert "finish: length, length" in out


def test_generate_missing_model_exit_2(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    code, _, err = run_cli(["generate", "--target", missing, "--prompt-ids", "1,2"], capsys)
    assert code == 2 and err.startswith("error: ") and "not found" in err and str(missing) in err
    code, _, err = run_cli(["generate", "--target", missing, "--method", "none", "--prompt-ids", "1,2"], capsys)
    assert code == 2 and "not found" in err


def test_generate_draft_model_needs_a_draft_and_chat_needs_a_template(tiny_dirs, capsys):
    code, _, err = run_cli(["generate", "--target", tiny_dirs["target"], "--prompt-ids", "1,2"], capsys)
    assert code == 2 and "--draft" in err
    # The tiny target has a tokenizer but no chat template, so the default chat message cannot be encoded.
    code, _, err = run_cli(
        ["generate", "--target", tiny_dirs["target"], "--method", "none", "--dtype", "float32"], capsys
    )
    assert code == 2 and "chat template" in err


def test_cli_module_exits_2_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "specgrove.cli", "generate", "--temperature", "-1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in proc.stderr


# ---- models ----------------------------------------------------------------------------------------
def test_models_list_verify_fetch(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPECGROVE_CACHE", str(tmp_path))
    code, out, err = run_cli(["models", "list"], capsys)
    assert code == 0, err
    for name in defaults.BUILTIN_MODELS:
        assert name in out
    code, out, _ = run_cli(["models", "verify", defaults.DEFAULT_DRAFT], capsys)
    assert code == 1 and "FAILED" in out and "not fetched" in out
    code, _, err = run_cli(["models", "fetch", "no-such-model"], capsys)  # rejected before any download
    assert code == 2 and "not a built-in model" in err


# ---- bench -----------------------------------------------------------------------------------------
PROMPTS = [
    BenchPrompt(1, "alpha", [1, 2, 3, 4, 1, 2, 3]),
    BenchPrompt(2, "beta", [5, 6, 7, 5, 6]),
    BenchPrompt(3, "alpha", [0, 1, 0, 1, 0, 1]),
]


@pytest.fixture(scope="module")
def tiny_bench(tiny_dirs):
    methods = ["plain", "draft_model", "prompt_lookup", "hf_plain", "hf_assisted", "hf_prompt_lookup"]
    config = BenchConfig(
        tiny_dirs["target"],
        tiny_dirs["draft"],
        prompts=PROMPTS,
        methods=methods,
        num_speculative_tokens=3,
        max_new_tokens=16,
        dtype="float32",
        device=DEVICE,
        bandwidth_num_floats=1 << 20,
    )
    return run_bench(config, progress=False, log=lambda msg: None)


def test_run_bench_on_tiny_models(tiny_bench):
    result = json.loads(json.dumps(tiny_bench))  # JSON-serialisable as written by --json
    assert set(result) >= {"config", "machine", "methods", "baseline_weight_bandwidth_gbs"}
    assert result["machine"]["memory_bandwidth_gbs"] > 0 and result["machine"]["read_bandwidth_gbs"] > 0
    assert [r["when"] for r in result["machine"]["bandwidth_runs"]] == ["start", "end"]
    assert result["baseline_weight_bandwidth_gbs"] > 0
    for name in ("plain", "draft_model", "prompt_lookup"):  # every engine method: time and bandwidth per forward
        entry = result["methods"][name]
        assert entry["target_ms_per_forward"] > 0
        assert entry["target_weight_gbs"] == pytest.approx(
            result["config"]["target_weight_bytes"] / entry["target_ms_per_forward"] / 1e6
        )
    assert result["config"]["draft_weight_bytes"] > 0
    draft = result["methods"]["draft_model"]
    assert draft["draft_ms_per_forward"] > 0
    assert draft["draft_weight_gbs"] == pytest.approx(
        result["config"]["draft_weight_bytes"] / draft["draft_ms_per_forward"] / 1e6
    )
    assert "draft_ms_per_forward" not in result["methods"]["prompt_lookup"]
    assert result["config"]["categories"] == ["alpha", "beta"]
    methods = result["methods"]
    assert list(methods) == ["plain", "draft_model", "prompt_lookup", "hf_plain", "hf_assisted", "hf_prompt_lookup"]
    keys = {
        "tokens_per_s",
        "speedup",
        "mean_accept_length",
        "acceptance_rate",
        "identical_to_baseline",
        "identical_count",
        "num_prompts",
    }
    for name, entry in methods.items():
        assert keys <= set(entry), name
        assert set(entry["per_category"]) == {"alpha", "beta"}
        for figures in entry["per_category"].values():
            assert keys <= set(figures)
        assert entry["per_category"]["alpha"]["num_prompts"] == 2
        assert entry["tokens_per_s"] > 0 and entry["num_prompts"] == 3
        # greedy fp32: every lossless method reproduces its baseline token for token
        assert entry["identical_to_baseline"] is True and entry["identical_count"] == 3, name
    assert methods["plain"]["speedup"] == 1.0 and methods["plain"]["mean_accept_length"] is None
    for name in ("draft_model", "prompt_lookup"):
        assert 1.0 <= methods[name]["mean_accept_length"] <= 4.0
        assert 0.0 <= methods[name]["acceptance_rate"] <= 1.0
    for name in ("hf_plain", "hf_assisted", "hf_prompt_lookup"):
        assert methods[name]["baseline"] == "hf_plain" and methods[name]["mean_accept_length"] is None
        assert methods[name]["speedup_vs_plain"] > 0
        assert methods[name]["identical_to_plain"] is True  # transformers and the engine agree in fp32


def test_run_bench_adds_the_baseline_and_rejects_bad_input(tiny_dirs):
    config = BenchConfig(
        tiny_dirs["target"],
        prompts=[[1, 2, 3]],
        methods=["prompt_lookup"],
        max_new_tokens=4,
        dtype="float32",
        device=DEVICE,
        warmup=0,
        measure_bandwidth=False,
    )
    result = run_bench(config, progress=False, log=lambda msg: None)
    assert list(result["methods"]) == ["plain", "prompt_lookup"]
    assert result["machine"]["memory_bandwidth_gbs"] is None
    with pytest.raises(ValueError, match="unknown method"):
        run_bench(BenchConfig(tiny_dirs["target"], prompts=[[1, 2]], methods=["nope"]))
    with pytest.raises(ValueError, match="temperature"):
        run_bench(BenchConfig(tiny_dirs["target"], prompts=[[1, 2]], methods=["plain"], temperature=-1))
    with pytest.raises(ValueError, match="draft"):
        run_bench(BenchConfig(tiny_dirs["target"], prompts=[[1, 2]], methods=["draft_model"], measure_bandwidth=False))


def test_interleaved_bench_runs_every_method_on_every_prompt(tiny_dirs, tiny_bench, monkeypatch):
    """Methods taking turns prompt by prompt give the same outputs and counts as one method at a time, and
    the prompts really alternate between the methods."""
    import specgrove.bench.spec_bench as spec_bench

    order = []
    timed = spec_bench._timed_prompt

    def recording(engine, prompt, params, run):
        order.append((engine.proposer is None, tuple(prompt.token_ids)))
        return timed(engine, prompt, params, run)

    monkeypatch.setattr(spec_bench, "_timed_prompt", recording)
    config = BenchConfig(
        tiny_dirs["target"],
        tiny_dirs["draft"],
        prompts=PROMPTS,
        methods=["plain", "draft_model", "prompt_lookup"],
        num_speculative_tokens=3,
        max_new_tokens=16,
        dtype="float32",
        device=DEVICE,
        measure_bandwidth=False,
        interleave=True,
    )
    result = run_bench(config, progress=False, log=lambda msg: None)
    assert result["config"]["interleave"] is True and tiny_bench["config"]["interleave"] is False
    assert [p for _, p in order] == [tuple(p.token_ids) for p in PROMPTS for _ in range(3)]
    assert [plain for plain, _ in order[:3]] == [True, False, False]
    for name in ("plain", "draft_model", "prompt_lookup"):
        entry, alone = result["methods"][name], tiny_bench["methods"][name]
        assert entry["num_prompts"] == alone["num_prompts"] == len(PROMPTS)
        assert entry["generated_tokens"] == alone["generated_tokens"] and entry["identical_to_baseline"] is not False


def test_llama_cpp_peer_needs_its_package_and_a_gguf_target(tiny_dirs, tmp_path, monkeypatch):
    """llama_cpp runs the target's own GGUF file: a plain HF directory has none, and without
    llama-cpp-python the method says how to get it. Both fail before any method runs."""
    from specgrove.bench import llamacpp_peer
    from specgrove.errors import SpecgroveError

    with pytest.raises(SpecgroveError, match="GGUF|llama-cpp-python"):
        config = BenchConfig(
            tiny_dirs["target"],
            prompts=[[1, 2, 3]],
            methods=["plain", "llama_cpp"],
            max_new_tokens=4,
            dtype="float32",
            device=DEVICE,
            warmup=0,
            measure_bandwidth=False,
        )
        run_bench(config, progress=False, log=lambda msg: None)
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", None)  # as if not installed
    with pytest.raises(SpecgroveError, match="pip install llama-cpp-python"):
        llamacpp_peer.require_llama_cpp()
    # The GGUF a converted directory records: an absolute path, or a built-in file in the cache.
    monkeypatch.setenv("SPECGROVE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "cache" / "gguf" / "m.gguf"
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"GGUF")
    model_dir = tmp_path / "converted"
    model_dir.mkdir()
    (model_dir / defaults.MARKER).write_text(json.dumps({"gguf": "m.gguf"}))
    assert llamacpp_peer.gguf_of(model_dir) == gguf
    (model_dir / defaults.MARKER).write_text(json.dumps({"gguf": str(gguf)}))
    assert llamacpp_peer.gguf_of(model_dir) == gguf
    with pytest.raises(SpecgroveError, match="GGUF"):
        llamacpp_peer.gguf_of(tiny_dirs["target"])


def test_bench_cli_prints_table_and_writes_json(tiny_bench, tmp_path, monkeypatch, capsys):
    import specgrove.bench.spec_bench as spec_bench

    seen = {}

    def fake_run_bench(config, **kwargs):
        seen.update(vars(config))
        return tiny_bench

    monkeypatch.setattr(spec_bench, "run_bench", fake_run_bench)
    path = tmp_path / "bench.json"
    code, out, err = run_cli(
        ["bench", "--limit", "3", "--methods", "plain,draft_model", "-k", "3", "--json", path], capsys
    )
    assert code == 0, err
    assert seen["methods"] == ["plain", "draft_model"] and seen["limit"] == 3 and seen["num_speculative_tokens"] == 3
    assert json.loads(path.read_text())["methods"].keys() == tiny_bench["methods"].keys()
    for word in ("plain", "draft_model", "hf_assisted", "tokens/s", "speedup", "alpha", "beta", "GB/s"):
        assert word in out
    # a tree spec's own comma list stays with its method
    code, _, err = run_cli(["bench", "--methods", "plain,tree:widths:4,2,1,sorted@6:widths:3,2,sorted@6+12"], capsys)
    assert code == 0, err
    assert seen["methods"] == ["plain", "tree:widths:4,2,1", "sorted@6:widths:3,2", "sorted@6+12"]


def test_bench_cli_bad_input_exit_2(tiny_dirs, tmp_path, capsys):
    code, _, err = run_cli(["bench", "--methods", "plain,warp_drive", "--data", tmp_path / "q.jsonl"], capsys)
    assert code == 2 and "warp_drive" in err
    code, _, err = run_cli(["bench", "--data", tmp_path / "missing.jsonl"], capsys)
    assert code == 2 and "missing.jsonl" in err


# ---- prompts and bandwidth -------------------------------------------------------------------------
def test_load_questions_round_robin_over_categories(tmp_path):
    path = tmp_path / "question.jsonl"
    rows = [("a", 1), ("a", 2), ("a", 3), ("b", 4), ("b", 5), ("c", 6)]
    path.write_text("\n".join(json.dumps({"question_id": i, "category": c, "turns": [f"q{i}", "t2"]}) for c, i in rows))
    assert [q["question_id"] for q in load_questions(path, limit=5)] == [1, 4, 6, 2, 5]
    assert [q["question_id"] for q in load_questions(path, limit=None)] == [1, 4, 6, 2, 5, 3]
    assert [q["question_id"] for q in load_questions(path, limit=10, categories=["a", "c"])] == [1, 6, 2, 3]
    with pytest.raises(ValueError, match="unknown category"):
        load_questions(path, categories=["zzz"])


def test_find_spec_bench(tmp_path, monkeypatch):
    path = tmp_path / "q.jsonl"
    path.write_text("")
    assert find_spec_bench(path) == path
    monkeypatch.setenv("SPECGROVE_SPEC_BENCH", str(path))
    assert find_spec_bench() == path
    monkeypatch.setenv("SPECGROVE_SPEC_BENCH", str(tmp_path / "nope.jsonl"))
    with pytest.raises(SpecgroveError, match="nope.jsonl"):
        find_spec_bench()
    monkeypatch.delenv("SPECGROVE_SPEC_BENCH")
    # Walking up from a nested directory finds shared/data/spec_bench/question.jsonl beside the repo.
    shared = tmp_path / "shared" / "data" / "spec_bench" / "question.jsonl"
    shared.parent.mkdir(parents=True)
    shared.write_text("")
    nested = tmp_path / "main" / "sub"
    nested.mkdir(parents=True)
    monkeypatch.chdir(nested)
    assert find_spec_bench() == shared


def test_real_spec_bench_file_mixes_all_categories(monkeypatch):
    monkeypatch.delenv("SPECGROVE_SPEC_BENCH", raising=False)
    try:
        path = find_spec_bench()
    except SpecgroveError:
        pytest.skip("Spec-Bench's question.jsonl is not beside this checkout")
    questions = load_questions(path, limit=20)
    assert len(questions) == 20 and len({q["category"] for q in questions}) == 13


def test_measure_memory_bandwidth_small():
    result = measure_memory_bandwidth(1 << 20, repeats=2)
    assert result.memory_bandwidth_gbs > 0 and result.bytes_per_copy == 2 * 4 * (1 << 20)
    assert result.read_bandwidth_gbs > 0 and 0 < result.best_read_s
    with pytest.raises(ValueError):
        measure_memory_bandwidth(0)


def test_print_report_handles_sampling_results(tiny_bench, capsys):
    from rich.console import Console

    sampled = json.loads(json.dumps(tiny_bench))
    for entry in sampled["methods"].values():  # at temperature > 0 identity is not defined
        entry["identical_to_baseline"] = entry["identical_count"] = None
        for figures in entry["per_category"].values():
            figures["identical_to_baseline"] = None
    print_report(sampled, Console(width=200))
    assert "—" in capsys.readouterr().out
