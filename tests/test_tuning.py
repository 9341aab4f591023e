"""`specgrove tune` and the tree methods in the API, CLI and benchmark, on tiny models: the offline
(teacher-forced) acceptance vector agrees with the one counted in live tree decoding; tune writes a
tree file that the API reads back; "auto" tunes once per sampling setting and caches."""

import json

import pytest

from specgrove import LLM, SamplingParams, tuning
from specgrove.bench.spec_bench import BenchConfig, BenchPrompt, run_bench
from specgrove.cli import main
from specgrove.drafting.draft_model import DraftModelProposer
from specgrove.engine.engine import SpecEngine
from specgrove.trees import sequoia
from specgrove.trees.shape import TreeShape

from conftest import DEVICE

PROMPTS = [[1, 2, 3, 4, 1, 2, 3], [5, 6, 7, 5, 6], [0, 1, 0, 1, 0, 1], [7, 3, 2, 7, 3]]


def test_offline_acceptance_matches_online_counts(tiny_target, tiny_draft):
    """Teacher-forced P over the target's own text vs P counted while decoding with a one-level tree of
    width 4 (the same events; ~600 positions each, so a 0.07 tolerance is over 3 standard errors)."""
    params = SamplingParams(temperature=1.0, max_tokens=150)
    engine = SpecEngine(tiny_target, DraftModelProposer(tiny_draft, 256, TreeShape.parse("widths:4")), 4, 256)
    online_counts = None
    samples = []
    for seed, prompt in enumerate(PROMPTS):
        seq = engine.generate(engine.new_sequence(prompt, SamplingParams(temperature=1.0, max_tokens=150, seed=seed)))
        online_counts = seq.metrics if online_counts is None else online_counts.merge(seq.metrics)
        samples.append(tuning.TextSample(prompt, list(seq.output_ids)))
    online = sequoia.acceptance_from_counts(online_counts.rank_accepted, online_counts.rank_trials, params)
    offline = tuning.measure_acceptance(tiny_target, tiny_draft, samples, params, width=4)
    assert offline.num_positions == 600 and online.num_positions > 100
    assert sum(offline.values) > 0.3  # the tiny draft is useful enough for the comparison to mean something
    for k in range(4):
        assert abs(offline.values[k] - online.values[k]) < 0.07, (offline.values, online.values)


def test_tune_writes_a_tree_the_api_reads(tiny_target, tiny_draft, tiny_dirs, tmp_path):
    params = SamplingParams(temperature=1.0, seed=0)
    result = tuning.tune(
        tiny_target,
        tiny_draft,
        params,
        prompts=PROMPTS[:2],
        max_new_tokens=24,
        width=4,
        budgets=(1, 2, 4, 8),
        max_depth=4,
        repeats=1,
        log=lambda m: None,
    )
    path = tuning.write_tree_file(result, tmp_path / "tree.json")
    shape, data = sequoia.load_tree_file(path)
    acceptance = sequoia.AcceptanceVector.from_dict(data["acceptance"])
    assert acceptance.temperature == 1.0 and acceptance.num_positions == 48
    assert len(shape) <= 8 and shape.depth <= 4
    assert data["predicted_accept_length"] == pytest.approx(shape.expected_accept_length(acceptance.values))
    assert [c["budget"] for c in data["choices"]] == [1, 2, 4, 8]
    assert set(data["profile"]["target_ms"]) >= {"1", "2", "4", "8", "9"}
    fixed = tuning.budget_tree(result, 2)
    assert fixed["budget"] == 2 and fixed["num_nodes"] <= 2

    llm = LLM(
        target=tiny_dirs["target"],
        draft=tiny_dirs["draft"],
        dtype="float32",
        max_model_len=128,
        speculative={"method": "tree", "tree": str(path)},
    )
    assert llm.engine.num_speculative_tokens == len(shape)
    greedy = SamplingParams(temperature=0, max_tokens=12)
    plain = LLM(target=tiny_dirs["target"], dtype="float32", max_model_len=128)
    assert llm.generate(PROMPTS[0], greedy)[0].token_ids == plain.generate(PROMPTS[0], greedy)[0].token_ids


def test_auto_tree_tunes_once_per_setting(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECGROVE_CACHE", str(tmp_path))
    monkeypatch.setattr(
        tuning, "tune_prompts", lambda target, n, data=None: PROMPTS[:2]
    )  # tiny models: no chat template
    calls = []
    real_tune = tuning.tune

    def counting_tune(*args, **kwargs):
        calls.append(args[2].temperature)
        return real_tune(*args, **{**kwargs, "max_new_tokens": 16, "repeats": 1, "width": 4, "log": lambda m: None})

    monkeypatch.setattr(tuning, "tune", counting_tune)
    llm = LLM(
        target=tiny_dirs["target"],
        draft=tiny_dirs["draft"],
        dtype="float32",
        max_model_len=256,
        speculative={"method": "tree", "tree": "auto"},
    )
    for temperature in (0.0, 0.0, 1.0):
        out = llm.generate(PROMPTS[1], SamplingParams(temperature=temperature, seed=1, max_tokens=8))[0]
        assert len(out.token_ids) == 8
    assert calls == [0.0, 1.0]
    assert len(list((tmp_path / "trees").glob("*.json"))) == 2
    again = LLM(
        target=tiny_dirs["target"],
        draft=tiny_dirs["draft"],
        dtype="float32",
        max_model_len=256,
        speculative={"method": "tree", "tree": "auto"},
    )
    again.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=4))
    assert calls == [0.0, 1.0]  # read from the cache


def test_tune_cli(tiny_dirs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tuning, "tune_prompts", lambda target, n, data=None: PROMPTS[:n])
    out = tmp_path / "tree.json"
    code = main(
        [
            "tune",
            "--target",
            str(tiny_dirs["target"]),
            "--draft",
            str(tiny_dirs["draft"]),
            "--dtype",
            "float32",
            "--device",
            DEVICE,
            "--prompts",
            "2",
            "--max-new-tokens",
            "12",
            "--width",
            "3",
            "--budgets",
            "2,4",
            "--max-depth",
            "3",
            "--repeats",
            "1",
            "--out",
            str(out),
            "--budget-trees",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "acceptance vector" in printed and "best tree per node budget" in printed
    assert json.loads(out.read_text())["tune"]["budgets"] == [2, 4]
    assert sequoia.parse_tree(str(tmp_path / "tree_b2.json")) is not None and (tmp_path / "tree_b4.json").is_file()
    # reusing the measured acceptance vector and profile: no model is loaded, the same choice comes out
    again = tmp_path / "again.json"
    reuse = [
        "tune",
        "--target",
        "/no/such/model",
        "--draft",
        "/no/such/draft",
        "--dtype",
        "float32",
        "--budgets",
        "2,4",
        "--max-depth",
        "3",
        "--acceptance",
        str(out),
        "--profile",
        str(out),
        "--out",
        str(again),
    ]
    capsys.readouterr()
    assert main(reuse) == 0
    first, second = json.loads(out.read_text()), json.loads(again.read_text())
    assert second["parents"] == first["parents"] and second["choices"] == first["choices"]
    assert second["profile"] == first["profile"] and second["tune"]["num_prompts"] == 0
    assert main(reuse + ["--temperature", "1.0"]) == 2  # the vector was measured greedy
    assert "measured at temperature 0" in capsys.readouterr().err
    assert main(reuse[:-2] + ["--dtype", "bfloat16", "--out", str(again)]) == 2
    assert "profiled in float32" in capsys.readouterr().err
    code = main(
        [
            "tune",
            "--target",
            str(tiny_dirs["target"]),
            "--draft",
            str(tiny_dirs["draft"]),
            "--out",
            str(out),
            "--temperature",
            "-1",
        ]
    )
    assert code == 2 and "temperature" in capsys.readouterr().err


def test_tune_cli_fills_the_cache_that_auto_reads(tiny_dirs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPECGROVE_CACHE", str(tmp_path))
    monkeypatch.setattr(tuning, "tune_prompts", lambda target, n, data=None: PROMPTS[:n])
    base = [
        "tune",
        "--target",
        str(tiny_dirs["target"]),
        "--draft",
        str(tiny_dirs["draft"]),
        "--dtype",
        "float32",
        "--device",
        DEVICE,
        "--prompts",
        "1",
        "--max-new-tokens",
        "8",
        "--width",
        "3",
        "--budgets",
        "2,4",
        "--max-depth",
        "3",
        "--repeats",
        "1",
    ]
    assert main(base + ["--method", "spechub:auto"]) == 0
    written = list((tmp_path / "trees").glob("*.json"))
    assert len(written) == 1 and str(written[0]) in capsys.readouterr().out.replace("\n", "")

    def no_tuning(*args, **kwargs):
        raise AssertionError("the tree should come from the cache `tune` filled")

    monkeypatch.setattr(tuning, "tune", no_tuning)
    llm = LLM(
        target=tiny_dirs["target"],
        draft=tiny_dirs["draft"],
        dtype="float32",
        max_model_len=128,
        speculative="tree:auto",
    )
    assert len(llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=4))[0].token_ids) == 4
    for method in ("draft_model", "tree:kary:2x2", "prompt_lookup", "sorted@1:chain:2", "none"):
        assert main(base + ["--method", method]) == 2
        assert "tune chooses the tree of a tree method with tree 'auto'" in capsys.readouterr().err
    assert main(base + ["--method", "tree:nonsense"]) == 2
    assert "bad tree spec" in capsys.readouterr().err


def test_generate_cli_tree(tiny_dirs, capsys):
    base = [
        "generate",
        "--target",
        str(tiny_dirs["target"]),
        "--draft",
        str(tiny_dirs["draft"]),
        "--dtype",
        "float32",
        "--device",
        DEVICE,
        "--prompt-ids",
        "1,2,3,4,1,2,3",
        "--max-new-tokens",
        "10",
        "--json",
    ]
    assert main(base + ["--method", "none"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(base + ["--method", "tree", "--tree", "kary:2x2"]) == 0
    tree = json.loads(capsys.readouterr().out)
    assert tree["token_ids"] == plain["token_ids"] and tree["k"] == 6
    assert main(base + ["--method", "tree", "--tree", "kary:2"]) == 2
    assert "bad tree spec" in capsys.readouterr().err


def test_bench_tree_methods(tiny_dirs, tmp_path):
    acceptance = sequoia.AcceptanceVector([0.5, 0.2, 0.1], temperature=0.0)
    choice = sequoia.choice_for_budget(acceptance.values, 6, 3)
    tree_file = tuning.write_tree_file(sequoia.tree_file_dict(choice, acceptance, None), tmp_path / "t.json")
    prompts = [BenchPrompt(i, "c", p) for i, p in enumerate(PROMPTS[:2])]
    config = BenchConfig(
        tiny_dirs["target"],
        tiny_dirs["draft"],
        prompts=prompts,
        methods=["draft_model", "tree:kary:2x2", f"tree:{tree_file}"],
        num_speculative_tokens=3,
        max_new_tokens=12,
        dtype="float32",
        device=DEVICE,
        measure_bandwidth=False,
        tree_acceptance=tree_file,
    )
    result = run_bench(config, progress=False, log=lambda m: None)
    methods = result["methods"]
    assert list(methods) == ["plain", "draft_model", "tree:kary:2x2", f"tree:{tree_file}"]
    for name in ("draft_model", "tree:kary:2x2", f"tree:{tree_file}"):
        assert methods[name]["identical_to_baseline"] is True and methods[name]["baseline"] == "plain"
    assert methods["tree:kary:2x2"]["predicted_accept_length"] == pytest.approx(1 + 0.7 + 0.7 * 0.7)
    assert methods["draft_model"]["predicted_accept_length"] == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert methods[f"tree:{tree_file}"]["predicted_accept_length"] == pytest.approx(choice.predicted_accept_length)
    with pytest.raises(ValueError, match="bad tree spec"):
        run_bench(BenchConfig(tiny_dirs["target"], prompts=[[1, 2]], methods=["tree:kary:9"]))
