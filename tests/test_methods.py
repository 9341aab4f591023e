"""The one method language (`specgrove.config`) and the one proposer factory: every grammar case
gives the same config, and the same proposer, through each entry point (LLM, generate, serve,
loadtest, bench); bad strings and conflicting options are refused with the grammar named."""

import json

import pytest

from specgrove import LLM, SamplingParams
from specgrove.bench.spec_bench import BenchConfig, engine_config, engine_fields, run_bench
from specgrove.cli import build_parser
from specgrove.cli_options import speculative_config
from specgrove.config import METHODS, SpeculativeConfig, grammar, method_fields, method_name, parse_method
from specgrove.drafting.base import Proposer
from specgrove.drafting.draft_model import DraftModelProposer
from specgrove.drafting.factory import BUILDERS, build_proposer, register
from specgrove.drafting.prompt_lookup import PromptLookupProposer
from specgrove.drafting.sorted import SortedDraftProposer
from specgrove.trees.tree import TokenTree

from conftest import DEVICE
from test_cli import run_cli
from test_sorted import sorted_dir  # noqa: F401 (a fixture)

# string -> the fields it sets (others keep their defaults)
CASES = {
    "none": {"method": None},
    "plain": {"method": None},
    "draft_model": {"method": "draft_model"},
    "prompt_lookup": {"method": "prompt_lookup"},
    "tree:kary:2x2": {"method": "tree", "tree": "kary:2x2", "tree_sampling": "without_replacement"},
    "rrs_wo:widths:2,1": {"method": "tree", "tree": "widths:2,1", "tree_sampling": "without_replacement"},
    "rrs:widths:2,1": {"method": "tree", "tree": "widths:2,1", "tree_sampling": "iid"},
    "spechub:kary:2x2": {"method": "tree", "tree": "kary:2x2", "tree_sampling": "hub"},
    "sorted": {"method": "sorted"},
    "sorted@2": {"method": "sorted", "sorted_exit": 2},
    "sorted@1:widths:3,1": {"method": "sorted", "sorted_exit": 1, "tree": "widths:3,1"},
    "sorted@1+2": {"method": "sorted", "sorted_exits": [1, 2]},
}
TREE_SIZES = {"kary:2x2": 6, "widths:2,1": 4, "widths:3,1": 6}
PROMPT = [1, 2, 3, 4, 1, 2, 3]


def expected_config(text: str, k: int = 4) -> SpeculativeConfig:
    fields = dict(CASES[text])
    if "tree" in fields:
        k = TREE_SIZES[fields["tree"]]
    return SpeculativeConfig(**{**fields, "num_speculative_tokens": k})


@pytest.mark.parametrize("text", list(CASES))
def test_each_grammar_case_parses_and_round_trips(text):
    config = parse_method(text)
    assert config == expected_config(text)
    assert method_fields(text) == CASES[text]
    again = parse_method(method_name(config))
    assert again == config
    assert SpeculativeConfig.from_any(text) == config
    assert SpeculativeConfig.from_any({"method": text}) == config
    if config.method is not None:
        assert config.method in BUILDERS


def test_method_names_are_canonical():
    assert method_name(parse_method("rrs_wo:kary:2x2")) == "tree:kary:2x2"
    assert method_name(parse_method("plain")) == "none"
    assert method_name(parse_method("tree", tree="chain:3", tree_sampling="hub")) == "spechub:chain:3"
    assert method_name(parse_method("sorted", sorted_exit=4)) == "sorted@4"


@pytest.mark.parametrize(
    "text, message",
    [
        ("tree:", "needs a tree shape"),
        ("spechub:", "needs a tree shape"),
        ("sorted@", "exit layer counts"),
        ("sorted@x", "exit layer counts"),
        ("sorted@0", "exit layer counts"),
        ("sorted@1+2:widths:2", "makes chains"),
        ("rrs", "unknown speculative method"),
        ("medusa", "unknown speculative method"),
        ("tree:kary:x", "bad tree spec"),
        ("sorted@1:auto", "'auto' is tuned for a draft model"),
        ("tree", "needs a tree"),
    ],
)
def test_bad_method_strings_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_method(text)


def test_unknown_names_list_the_grammar():
    with pytest.raises(ValueError, match=r"spechub:SHAPE.*sorted@A\+B"):
        parse_method("medusa")
    with pytest.raises(TypeError, match="a method is a string"):
        parse_method(3)


def test_an_option_the_string_sets_must_agree():
    with pytest.raises(ValueError, match="give it once"):
        parse_method("tree:kary:2x3", tree="chain:4")
    with pytest.raises(ValueError, match="give it once"):
        parse_method("rrs:chain:2", tree_sampling="hub")
    with pytest.raises(ValueError, match="give it once"):
        parse_method("sorted@2", sorted_exit=3)
    assert parse_method("rrs:chain:2", tree_sampling="iid").tree_sampling == "iid"
    assert parse_method("tree", tree="chain:2", num_speculative_tokens=9).num_speculative_tokens == 2
    assert parse_method("draft_model", num_speculative_tokens=3).num_speculative_tokens == 3
    with pytest.raises(ValueError, match="unknown speculative option"):
        parse_method("draft_model", lookahead=3)
    with pytest.raises(ValueError, match="not both"):
        SpeculativeConfig.of_fields({"method": "sorted", "sorted_exit": 1, "sorted_exits": [1, 2]})
    with pytest.raises(ValueError, match="two or more"):
        SpeculativeConfig.of_fields({"method": "sorted", "sorted_exits": [2]})
    with pytest.raises(ValueError, match="options of method 'sorted'"):
        SpeculativeConfig.of_fields({"method": "draft_model", "sorted_exits": [1, 2]})


# ---- every entry point reads the same strings ------------------------------------------------------
def _draft_for(text, tiny_dirs, sorted_path):
    return sorted_path if text.startswith("sorted") else tiny_dirs["draft"]


def _check_proposer(proposer, config):
    if config.method is None:
        assert proposer is None
    elif config.method == "prompt_lookup":
        assert isinstance(proposer, PromptLookupProposer)
    elif config.method == "sorted" and config.sorted_exit is None:  # adaptive
        assert isinstance(proposer, SortedDraftProposer)
        if config.sorted_exits is not None:
            assert proposer.exits == config.sorted_exits
    elif config.method == "sorted":  # one exit: the draft model cut at that exit
        assert isinstance(proposer, DraftModelProposer) and proposer.name == f"sorted@{config.sorted_exit}"
        assert (proposer.shape is None) == (config.tree is None)
    else:
        assert isinstance(proposer, DraftModelProposer) and proposer.sampling == config.tree_sampling
        assert (proposer.shape is None) == (config.tree is None)


@pytest.mark.parametrize("text", list(CASES))
def test_llm_api_takes_every_method_string(text, tiny_dirs, sorted_dir):  # noqa: F811
    plain = LLM(target=tiny_dirs["target"], dtype="float32", device=DEVICE)
    reference = plain.generate([PROMPT], SamplingParams(temperature=0, max_tokens=10))[0].token_ids
    draft = _draft_for(text, tiny_dirs, sorted_dir)
    for speculative in (text, {"method": text, "num_speculative_tokens": 4}):
        llm = LLM(target=tiny_dirs["target"], draft=draft, dtype="float32", device=DEVICE, speculative=speculative)
        assert llm.speculative == expected_config(text)
        _check_proposer(llm.engine.proposer, llm.speculative)
        assert llm.engine.num_speculative_tokens == (
            0 if llm.speculative.method is None else llm.speculative.num_speculative_tokens
        )
        out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=10))[0]
        assert out.token_ids == reference, text  # greedy speculation is lossless


@pytest.mark.parametrize("text", list(CASES))
def test_generate_cli_takes_every_method_string(text, tiny_dirs, sorted_dir, capsys):  # noqa: F811
    argv = [
        "generate",
        "--target",
        tiny_dirs["target"],
        "--dtype",
        "float32",
        "--device",
        DEVICE,
        "--prompt-ids",
        ",".join(map(str, PROMPT)),
        "--max-new-tokens",
        "8",
        "--json",
        "--method",
        text,
    ]
    code, out, err = run_cli(argv + ["--draft", _draft_for(text, tiny_dirs, sorted_dir)], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["method"] == method_name(expected_config(text))
    assert result["k"] == (0 if CASES[text]["method"] is None else expected_config(text).num_speculative_tokens)
    code, out, err = run_cli(argv[:-1] + ["none"], capsys)
    assert json.loads(out)["token_ids"] == result["token_ids"]


@pytest.mark.parametrize("command", ["generate", "serve", "loadtest"])
@pytest.mark.parametrize("text", list(CASES))
def test_serve_and_loadtest_parse_method_strings_as_generate(command, text):
    required = ["--out", "lt.json"] if command == "loadtest" else []
    args = build_parser().parse_args([command, "--method", text, *required])
    assert speculative_config(args) == expected_config(text, args.num_speculative_tokens)  # loadtest's -k: 5


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_cli_options_still_spell_a_method_out(command):
    parser = build_parser()
    long_form = parser.parse_args([command, "--method", "tree", "--tree", "kary:2x2", "--tree-sampling", "hub"])
    assert speculative_config(long_form) == parse_method("spechub:kary:2x2")
    sorted_long = parser.parse_args([command, "--method", "sorted", "--sorted-exit", "1", "--tree", "widths:3,1"])
    assert speculative_config(sorted_long) == parse_method("sorted@1:widths:3,1")
    with pytest.raises(ValueError, match="give it once"):
        speculative_config(parser.parse_args([command, "--method", "rrs:kary:2x2", "--tree-sampling", "hub"]))


@pytest.mark.parametrize("text", [t for t in CASES if t != "none"])
def test_bench_reads_method_strings_as_the_api(text):
    assert engine_fields(text) == CASES[text]
    assert engine_config(text, 4) == expected_config(text)


def test_bench_runs_grammar_methods_through_the_factory(tiny_dirs):
    methods = ["plain", "draft_model", "rrs:widths:2,1", "spechub:kary:2x2", "rrs_wo:widths:2,1"]
    config = BenchConfig(
        tiny_dirs["target"],
        tiny_dirs["draft"],
        prompts=[PROMPT],
        methods=methods,
        max_new_tokens=8,
        dtype="float32",
        device=DEVICE,
        measure_bandwidth=False,
    )
    result = run_bench(config, progress=False, log=lambda m: None)
    figures = result["methods"]
    for method in methods[1:]:
        assert figures[method]["identical_to_baseline"] is True, method
    assert figures["spechub:kary:2x2"]["tree"]["num_nodes"] == 6
    with pytest.raises(ValueError, match=r"unknown method.*spechub:SHAPE"):
        run_bench(BenchConfig(tiny_dirs["target"], prompts=[[1, 2]], methods=["tree"], measure_bandwidth=False))


def test_factory_builds_nothing_without_speculation_and_names_unregistered_methods(tiny_target):
    assert build_proposer(parse_method("none"), tiny_target, None, 64) == (None, 0)
    config = parse_method("draft_model")
    with pytest.raises(ValueError, match="needs a draft model"):
        build_proposer(config, tiny_target, None, 64)
    config.method = "medusa"  # past validation, as a caller could
    with pytest.raises(ValueError, match="no proposer is registered for method 'medusa'"):
        build_proposer(config, tiny_target, None, 64)


class RepeatLastProposer(Proposer):
    """A drafter written for this test: proposes the last token k times (deterministic, a point mass)."""

    name = "repeat_last"

    def propose(self, seq, num_tokens: int) -> TokenTree:
        return TokenTree.chain([seq.token_ids[-1]] * num_tokens)


@pytest.fixture
def repeat_last_registered():
    register("repeat_last", lambda spec: RepeatLastProposer())  # the one registration line
    yield
    BUILDERS.pop("repeat_last")
    METHODS.pop("repeat_last")


def test_a_new_drafter_is_one_module_plus_one_registration_line(repeat_last_registered, tiny_dirs, capsys):
    assert "repeat_last" in grammar() and parse_method("repeat_last").method == "repeat_last"
    plain = LLM(target=tiny_dirs["target"], dtype="float32", device=DEVICE)
    llm = LLM(target=tiny_dirs["target"], dtype="float32", device=DEVICE, speculative="repeat_last")
    assert isinstance(llm.engine.proposer, RepeatLastProposer) and llm.engine.num_speculative_tokens == 4
    greedy = SamplingParams(temperature=0, max_tokens=12)
    out = llm.generate([PROMPT], greedy)[0]
    assert out.token_ids == plain.generate([PROMPT], greedy)[0].token_ids
    assert sum(out.metrics.proposed_per_step) > 0
    argv = [
        "generate",
        "--target",
        tiny_dirs["target"],
        "--dtype",
        "float32",
        "--device",
        DEVICE,
        "--prompt-ids",
        ",".join(map(str, PROMPT)),
        "--max-new-tokens",
        "6",
        "--json",
        "--method",
        "repeat_last",
    ]
    code, printed, err = run_cli(argv, capsys)
    assert code == 0 and json.loads(printed)["method"] == "repeat_last", err
    assert engine_fields("repeat_last") == {"method": "repeat_last"}
    with pytest.raises(ValueError, match="cannot name a method"):
        register("plain", lambda spec: RepeatLastProposer())
