import os

import pytest
import torch

from specgrove.models.loader import load_model
from specgrove.testing import make_tiny_model

torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY_VOCAB = 8
# Run the suite's tiny-model tests on another device, e.g. SPECGROVE_TEST_DEVICE=cuda on a GPU machine.
DEVICE = os.environ.get("SPECGROVE_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {
        "target": make_tiny_model(root / "target", "qwen2", TINY_VOCAB, seed=0, init_scale=2.0, with_tokenizer=True),
        "draft": make_tiny_model(root / "draft", "qwen2", TINY_VOCAB, seed=1, init_scale=2.0, with_tokenizer=True),
        "llama": make_tiny_model(root / "llama", "llama", TINY_VOCAB, seed=2, init_scale=2.0),
        "other_vocab": make_tiny_model(root / "other", "qwen2", TINY_VOCAB + 2, seed=3),
    }


@pytest.fixture(scope="session")
def tiny_target(tiny_dirs):
    return load_model(tiny_dirs["target"], dtype="float32", device=DEVICE)


@pytest.fixture(scope="session")
def tiny_draft(tiny_dirs):
    return load_model(tiny_dirs["draft"], dtype="float32", device=DEVICE)


def tiny_llm(tiny_dirs, k: int = 3, **kwargs):
    """An LLM over the tiny target drafted by the tiny draft model (k tokens), in float32 on DEVICE."""
    from specgrove.api import LLM

    return LLM(
        target=tiny_dirs["target"],
        draft=tiny_dirs["draft"],
        dtype="float32",
        device=DEVICE,
        speculative={"method": "draft_model", "num_speculative_tokens": k},
        **kwargs,
    )
