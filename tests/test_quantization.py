"""Weight-only int8: close to the dense layer, half the bytes, and an int8 draft never changes what
the target generates (greedy identity, and the exact one-step distribution)."""

import pytest
import torch

from specgrove import LLM, SamplingParams
from specgrove.drafting.draft_model import DraftModelProposer
from specgrove.engine.engine import SpecEngine
from specgrove.models.linear import Linear, int8_available, quantize_int8
from specgrove.models.loader import load_model
from specgrove.trees.shape import TreeShape

from conftest import DEVICE
from test_exactness import max_difference, speculative_sequence_distribution, target_sequence_distribution

pytestmark = pytest.mark.skipif(not int8_available(), reason="this torch build has no _weight_int8pack_mm")
PROMPT = [1, 2, 3, 1, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_is_close_to_dense(dtype):
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(96, 64, generator=g) * 0.05).to(dtype)
    bias = torch.randn(96, generator=g).to(dtype)
    x = torch.randn(3, 5, 64, generator=g).to(dtype)
    dense = Linear(weight, bias, packed=False)
    int8 = Linear(weight, bias, packed=False, quantization="int8")
    assert int8.nbytes < dense.nbytes * (0.3 if dtype == torch.float32 else 0.6)
    ref, out = dense(x).float(), int8(x).float()
    assert out.shape == ref.shape
    assert (out - ref).abs().max() < 0.02 * ref.abs().max()
    q, scales = quantize_int8(weight)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127 and scales.shape == (96,)
    with pytest.raises(ValueError, match="quantization"):
        Linear(weight, bias, packed=False, quantization="int3")


def test_int8_draft_keeps_greedy_output(tiny_dirs):
    params = SamplingParams(temperature=0, max_tokens=24)
    plain = LLM(target=tiny_dirs["target"], dtype="float32", max_model_len=128, device=DEVICE)
    spec = LLM(target=tiny_dirs["target"], draft=tiny_dirs["draft"], dtype="float32", max_model_len=128, device=DEVICE,
               speculative={"method": "tree", "tree": "widths:2,2,1"}, draft_quantization="int8")
    assert spec.draft.model.quantization == "int8" and spec.target.model.quantization is None
    assert spec.generate(PROMPT, params)[0].token_ids == plain.generate(PROMPT, params)[0].token_ids
    with pytest.raises(ValueError, match="quantization"):
        LLM(target=tiny_dirs["target"], dtype="float32", quantization="int4-magic")


def test_int8_draft_one_step_is_exact(tiny_dirs, tiny_target):
    draft = load_model(tiny_dirs["draft"], dtype="float32", device=DEVICE, quantization="int8")
    shape = TreeShape.parse("widths:2,1")
    params = SamplingParams(temperature=1.0, top_k=4, max_tokens=3)
    engine = SpecEngine(tiny_target, DraftModelProposer(draft, 64, shape), len(shape), 64)
    spec, emitted = speculative_sequence_distribution(engine, tiny_target, PROMPT, params, 3, tiny_target.vocab_size)
    exact = target_sequence_distribution(tiny_target, PROMPT, 3, params, tiny_target.vocab_size)
    assert any(len(s) > 1 for s in emitted)
    assert max_difference(spec, exact) < 1e-6
