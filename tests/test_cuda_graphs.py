"""CUDA graphs (specgrove.models.cuda_graphs): a graphed forward gives the eager forward's logits and KV.

On CPU the runner's static-buffer path runs without capture (`capture=False`): the same fixed shapes,
span buckets, masking of keys past a row and row gathering, checked against the eager forward. With
SPECGROVE_TEST_DEVICE=cuda the same tests capture and replay real CUDA graphs."""

import pytest
import torch

from specgrove.drafting.draft_model import DraftModelProposer
from specgrove.engine.engine import SpecEngine
from specgrove.models.cuda_graphs import SPAN_BUCKET, GraphRunner
from specgrove.models.loader import load_model
from specgrove.sampling import SamplingParams
from specgrove.testing import make_tiny_model
from specgrove.trees.shape import TreeShape

from conftest import DEVICE

CAPTURE = DEVICE == "cuda"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = make_tiny_model(tmp_path_factory.mktemp("graphs"), "qwen2", vocab_size=50, seed=7, max_position_embeddings=1024)
    eager = load_model(d, dtype="float32", device=DEVICE, cuda_graphs=False)
    graphed = load_model(d, dtype="float32", device=DEVICE, cuda_graphs=False)
    graphed.model.graphs = GraphRunner(graphed.model, capture=CAPTURE)
    return eager.model, graphed.model


def both(models, caches, *args, **kwargs):
    (eager, graphed), (ce, cg) = models, caches
    a = eager.forward(*args, ce, **kwargs)
    b = graphed.forward(*args, cg, **kwargs)
    if a is None:
        assert b is None
        return None
    assert a.shape == b.shape
    assert (a - b).abs().max().item() < 1e-5
    return a


def test_graphed_forwards_match_eager(models):
    eager, graphed = models
    g = torch.Generator().manual_seed(0)
    caches = (eager.new_cache(2, 700), graphed.new_cache(2, 700))
    replays = graphed.graphs.replays
    # Prefill (logits not asked: eager in both), two rows of different lengths.
    for row, length in ((0, SPAN_BUCKET - 3), (1, 40)):
        ids = torch.randint(0, 50, (1, length), generator=g)
        both(models, caches, ids, torch.arange(length)[None], rows=[row], logits_at=None)
        for c in caches:
            c.commit(row)
    assert graphed.graphs.replays == replays
    # Decode steps on row 0 crossing the first span bucket (keys 253.. -> 256..)
    for _ in range(6):
        pos = caches[0].lengths[0]
        both(models, caches, torch.randint(0, 50, (1, 1), generator=g), torch.tensor([[pos]]), rows=[0])
        for c in caches:
            c.commit(0)
    # A tree (chain + branch) on row 1 via tree_mask, then keep a path.
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)[None]
    pos = caches[0].lengths[1]
    positions = torch.tensor([[pos, pos + 1, pos + 1, pos + 2]])
    both(models, caches, torch.randint(0, 50, (1, 4), generator=g), positions, tree_mask=mask, rows=[1])
    # Extend the uncommitted tree by one level (draft-style), then commit a path through both forwards.
    ext_mask = torch.tensor([[1, 0, 1, 1, 1]], dtype=torch.bool)[None]
    both(
        models,
        caches,
        torch.randint(0, 50, (1, 1), generator=g),
        torch.tensor([[pos + 3]]),
        tree_mask=ext_mask,
        rows=[1],
        extend=True,
        logits_at="last",
    )
    for c in caches:
        c.commit(1, [0, 2, 3, 4])
    # Both rows in one batch, in reverse order, padded (num_new), logits of the last valid token.
    ids = torch.randint(0, 50, (2, 3), generator=g)
    positions = torch.stack([torch.arange(3) + caches[0].lengths[1], torch.arange(3) + caches[0].lengths[0]])
    both(models, caches, ids, positions, rows=[1, 0], num_new=[3, 2], logits_at="last")
    assert graphed.graphs.replays > replays + 8
    for c in caches:
        c.commit(1)
        c.commit(0)
    ce, cg = caches
    for row in (0, 1):
        n = ce.lengths[row]
        assert n == cg.lengths[row]
        assert torch.allclose(ce.k[:, row, :, :n], cg.k[:, row, :, :n], atol=1e-5)
        assert torch.allclose(ce.v[:, row, :, :n], cg.v[:, row, :, :n], atol=1e-5)
    # Forwards too large for a graph stay eager.
    before = graphed.graphs.replays
    both(models, caches, torch.randint(0, 50, (1, 40), generator=g), torch.arange(40)[None] + ce.lengths[0], rows=[0])
    assert graphed.graphs.replays == before
    # Another cache: the graphs writing into the old one are dropped (they would hold it alive).
    assert len(graphed.graphs.graphs) > 1
    other = graphed.new_cache(1, 64)
    graphed.forward(torch.tensor([[1]]), torch.tensor([[0]]), other)
    assert len(graphed.graphs.graphs) == 1 and graphed.graphs.cache_in_use[0] is other


def test_speculation_with_graphs_keeps_greedy_output(tiny_dirs):
    """Target and draft both replaying graphs (batched steps of two sequences): plain greedy's tokens."""

    def load(name: str, graphs: bool):
        m = load_model(tiny_dirs[name], dtype="float32", device=DEVICE, cuda_graphs=False)
        if graphs:
            m.model.graphs = GraphRunner(m.model, capture=CAPTURE)
        return m

    params = SamplingParams(temperature=0, max_tokens=20)
    prompts = [[1, 2, 3, 1, 2], [4, 5, 6]]
    plain = SpecEngine(load("target", False), None, 0, 128)
    expected = [plain.generate(plain.new_sequence(p, params)).output_ids for p in prompts]
    target = load("target", True)
    draft = load("draft", True)
    engine = SpecEngine(target, DraftModelProposer(draft, 128, TreeShape.parse("widths:2,1,1")), 4, 128)
    seqs = [engine.new_sequence(p, params) for p in prompts]
    for s in seqs:
        engine.prefill(s)
    while not all(s.finished for s in seqs):
        engine.step_batch([s for s in seqs if not s.finished])
    for s in seqs:
        engine.finish(s)
    assert [s.output_ids for s in seqs] == expected
    assert target.model.graphs.replays > 0 and draft.model.graphs.replays > 0
