"""Sorted fine-tuning (specgrove.train) on tiny models: batched distillation equals one-prompt greedy
decoding, the SoFT loss falls, an interrupted run resumes to the same weights, the trained directory
loads and its sub-models give the trainer's exit logits, a shrunk head keeps exactly the chosen tokens,
and `train-sorted` runs end to end."""

import argparse
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from specgrove.engine.engine import SpecEngine
from specgrove.errors import IncompatibleModelsError, ModelNotFoundError, SpecgroveError
from specgrove.models.loader import load_model
from specgrove.sampling import SamplingParams
from specgrove.testing import make_tiny_model
from specgrove.train import cli as train_cli
from specgrove.train import data, soft, teacher

VOCAB = 10
EOS = 3
EXITS = [1, 2, 4]
MAX_NEW = 16


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, VOCAB, (int(torch.randint(1, 10, (1,), generator=g)),), generator=g).tolist() for _ in range(n)
    ]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not suffer from a busy machine's other load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return {
        "target": make_tiny_model(
            root / "target",
            "qwen2",
            VOCAB,
            seed=0,
            init_scale=2.0,
            num_hidden_layers=4,
            with_tokenizer=True,
            eos_token_id=EOS,
        ),
        "init": make_tiny_model(root / "init", "qwen2", VOCAB, seed=1, num_hidden_layers=4, with_tokenizer=True),
        "other_vocab": make_tiny_model(
            root / "other", "qwen2", VOCAB + 2, seed=2, num_hidden_layers=2, with_tokenizer=True
        ),
    }


@pytest.fixture(scope="module")
def target(dirs):
    return load_model(dirs["target"], dtype="float32")


@pytest.fixture(scope="module")
def samples(target, tmp_path_factory):
    path = tmp_path_factory.mktemp("samples") / "samples.jsonl"
    return data.distill(target, _prompts(48), path, max_new_tokens=MAX_NEW, batch_size=8, progress=False)


def _settings(**overrides) -> soft.SoftSettings:
    kwargs = dict(lr=3e-3, max_steps=12, batch_size=8, save_every=4, seed=0)
    kwargs.update(overrides)
    return soft.SoftSettings(**kwargs)


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / soft.TRAIN_LOG).read_text().splitlines()]


# ---- (a) distillation data --------------------------------------------------------------------------
def test_batched_generation_equals_one_prompt_at_a_time(target):
    """Prompts of 1..9 tokens, 4 cache rows refilled as rows finish, EOS stops: every output equals the
    engine's plain greedy decoding of that prompt alone (same ids, EOS included)."""
    prompts = _prompts(10, seed=3)
    assert len({len(p) for p in prompts}) >= 4
    done_order = []
    outputs = data.batched_generate(
        target.model,
        prompts,
        MAX_NEW,
        eos_ids=[EOS],
        batch_size=4,
        on_done=lambda i, out, reason: done_order.append((i, reason)),
    )
    engine = SpecEngine(target, None, 0, 64)
    for prompt, output in zip(prompts, outputs):
        seq = engine.generate(engine.new_sequence(prompt, SamplingParams(temperature=0, max_tokens=MAX_NEW)))
        assert output == list(seq.output_ids)
    reasons = dict(done_order)
    assert sorted(reasons) == list(range(len(prompts)))
    assert any(r == "stop" for r in reasons.values()) and any(r == "length" for r in reasons.values())
    for i, out in enumerate(outputs):
        assert EOS not in out[:-1]
        assert (out[-1] == EOS) == (reasons[i] == "stop") and (reasons[i] == "stop" or len(out) == MAX_NEW)


def test_sampled_generation_does_not_depend_on_the_batch(target):
    prompts = _prompts(6, seed=4)
    batched = data.batched_generate(target.model, prompts, 12, [EOS], batch_size=3, temperature=1.0, seed=7)
    alone = [
        data.batched_generate(target.model, [p], 12, [EOS], batch_size=1, temperature=1.0, seeds=[7 + i])[0]
        for i, p in enumerate(prompts)
    ]
    greedy = data.batched_generate(target.model, prompts, 12, [EOS], batch_size=3)
    assert batched == alone and batched != greedy


def test_distill_resumes_and_skips_done_prompts(target, tmp_path):
    prompts = _prompts(8, seed=5)
    path = tmp_path / "s.jsonl"
    first = data.distill(target, prompts[:5], path, max_new_tokens=8, batch_size=4, progress=False)
    with open(path, "a") as f:
        f.write('{"target": "cut off mid-wri')  # an interrupted write
    loads = []

    def loader():
        loads.append(1)
        return target

    both = data.distill(
        loader, prompts, path, max_new_tokens=8, batch_size=4, progress=False, name=target.name, eos_ids=[EOS]
    )
    assert loads == [1] and both[:5] == first
    lines = path.read_text().splitlines()
    assert len(lines) == 8 and all(json.loads(line)["target"] == target.name for line in lines)
    again = data.distill(
        loader, prompts, path, max_new_tokens=8, batch_size=4, progress=False, name=target.name, eos_ids=[EOS]
    )
    assert loads == [1] and again == both  # nothing left to generate: the target is not even loaded
    said = []
    data.distill(
        loader, prompts, path, max_new_tokens=9, progress=False, name=target.name, eos_ids=[EOS], log=said.append
    )
    assert loads == [1] and any("other settings" in m for m in said)
    assert [s.output_ids for s in both] == data.batched_generate(target.model, prompts, 8, [EOS], batch_size=8)


# ---- (b) the loss falls ----------------------------------------------------------------------------
def _data_loss(init: soft.InitModel, samples) -> list[float]:
    """Each exit's mean CE over every continuation token of the samples."""
    model = soft.SortedTrainModel(init.config, init.weights, init.spec.exits)
    with torch.no_grad():
        return model.loss(*soft.collate(soft.build_examples(samples, 1024)))[1].tolist()


def test_soft_loss_goes_down(dirs, samples, tmp_path):
    init = soft.load_init(dirs["init"], EXITS)
    result = soft.train_soft(
        init, samples, tmp_path / "out", _settings(max_steps=40, save_every=100), eos_ids=[EOS], progress=False
    )
    assert result["status"] == "completed"
    before, after = _data_loss(init, samples), _data_loss(soft.load_init(tmp_path / "out"), samples)
    for exit_, b, a in zip(EXITS, before, after):
        assert a < 0.5 * b, (exit_, before, after)
    log = _log(tmp_path / "out")
    assert [r["step"] for r in log] == list(range(1, 41))
    assert sum(r["loss"] for r in log[-10:]) / 10 < 0.7 * sum(r["loss"] for r in log[:4]) / 4
    assert log[-1]["tokens"] > log[0]["tokens"] > 0
    assert max(r["lr"] for r in log) == pytest.approx(3e-3) and log[-1]["lr"] < 3e-4


def test_exit_weights_weigh_the_exits_losses(dirs, samples, tmp_path):
    """The loss is sum w_l L_l / sum w_l; training on the deepest exit alone (weights 0, 0, 1) leaves it
    lower than the equal-weight run does, and a checkpoint of other weights is not resumed."""
    init = soft.load_init(dirs["init"], EXITS)
    model = soft.SortedTrainModel(init.config, init.weights, EXITS)
    batch = soft.collate(soft.build_examples(samples[:8], 1024))
    with torch.no_grad():
        equal, per_exit, _ = model.loss(*batch)
        weighted, per_exit_w, _ = model.loss(*batch, exit_weights=[1.0, 0.0, 3.0])
    torch.testing.assert_close(per_exit_w, per_exit)
    torch.testing.assert_close(equal, per_exit.mean())
    torch.testing.assert_close(weighted, (per_exit[0] + 3 * per_exit[2]) / 4)

    soft.train_soft(init, samples, tmp_path / "equal", _settings(max_steps=30, save_every=100), progress=False)
    deep = _settings(max_steps=30, save_every=10, exit_weights=[0, 0, 1])
    soft.train_soft(init, samples, tmp_path / "deep", deep, progress=False, stop_after=10)
    with pytest.raises(SpecgroveError, match="other settings"):  # the same OUT with other weights
        soft.train_soft(
            init,
            samples,
            tmp_path / "deep",
            _settings(max_steps=30, save_every=10, exit_weights=[1, 1, 1]),
            progress=False,
        )
    soft.train_soft(init, samples, tmp_path / "deep", deep, progress=False)
    after_equal = _data_loss(soft.load_init(tmp_path / "equal"), samples)
    after_deep = _data_loss(soft.load_init(tmp_path / "deep"), samples)
    assert after_deep[-1] < after_equal[-1], (after_deep, after_equal)

    with pytest.raises(ValueError, match="one per exit"):
        soft.train_soft(init, samples, tmp_path / "bad", _settings(exit_weights=[1, 1]), progress=False)
    for bad in ([1, -1, 1], [0, 0, 0]):
        with pytest.raises(ValueError, match="exit-weights"):
            _settings(exit_weights=bad)
    assert "exit_weights" not in _settings().fingerprint()  # checkpoints from before the option still resume


def test_freeze_head_keeps_the_norm_and_head(dirs, samples, tmp_path):
    init = soft.load_init(dirs["init"], EXITS)
    soft.train_soft(init, samples, tmp_path / "frozen", _settings(max_steps=6, freeze_head=True), progress=False)
    trained = soft.load_init(tmp_path / "frozen")
    for name in soft.HEAD_PARAMETERS:
        assert name in trained.weights and torch.equal(trained.weights[name], init.weights[name].float()), name
    moved = [n for n in init.weights if not torch.equal(trained.weights[n], init.weights[n].float())]
    assert moved and all(n.startswith("model.layers.") or n == "model.embed_tokens.weight" for n in moved), moved
    assert _data_loss(trained, samples)[0] < _data_loss(init, samples)[0]  # the shallow exit still learns
    assert "freeze_head" not in _settings().fingerprint() and _settings(freeze_head=True).fingerprint()["freeze_head"]


def test_examples_train_on_the_continuation_only():
    long = data.Sample("t", list(range(10, 20)), list(range(20, 30)))
    short = data.Sample("t", [1, 2], [3, 4, 5])
    empty = data.Sample("t", [1, 2], [])
    examples = soft.build_examples([long, short, empty], max_len=8)
    assert [(e.ids, e.first) for e in examples] == [([16, 17, 18, 19, 20, 21, 22, 23], 4), ([1, 2, 3, 4, 5], 2)]
    ids, labels, teachers = soft.collate(examples)
    assert teachers is None
    assert ids.tolist() == [[16, 17, 18, 19, 20, 21, 22, 23], [1, 2, 3, 4, 5, 0, 0, 0]]
    assert labels.tolist() == [[-100] * 4 + [20, 21, 22, 23], [-100, -100, 3, 4, 5, -100, -100, -100]]


def test_chunked_loss_equals_the_plain_loss(dirs, samples, monkeypatch):
    """The head's logits are made CE_CHUNK tokens at a time and recomputed in backward: same loss and
    gradients as all at once."""
    init = soft.load_init(dirs["init"], EXITS)
    batch = soft.collate(soft.build_examples(samples[:8], 1024))
    results = []
    for chunk in (10_000, 7):
        monkeypatch.setattr(soft, "CE_CHUNK", chunk)
        model = soft.SortedTrainModel(init.config, init.weights, EXITS)
        loss, per_exit, count = model.loss(*batch)
        loss.backward()
        results.append((per_exit, {n: p.grad.clone() for n, p in model.lm.named_parameters()}, count))
    (plain, plain_grads, count), (chunked, chunked_grads, _) = results
    assert count == sum(len(s.output_ids) for s in samples[:8]) > 3 * 7  # continuation tokens only
    torch.testing.assert_close(plain, chunked, atol=1e-6, rtol=1e-6)
    for name in plain_grads:
        torch.testing.assert_close(plain_grads[name], chunked_grads[name], atol=1e-6, rtol=1e-5)


def test_training_is_the_plain_loop_bit_for_bit(dirs, samples, tmp_path):
    """train_soft's losses and weights are, bit for bit, those of the loop written out here: the batches of
    epoch_batches, lr_at's schedule, the SoFT loss, backward, clipping, AdamW (8 steps: into a second epoch)."""
    init = soft.load_init(dirs["init"], EXITS)
    settings = _settings(max_steps=8, save_every=100, exit_weights=[1, 1, 2])
    soft.train_soft(init, samples, tmp_path / "out", settings, progress=False)

    model = soft.SortedTrainModel(init.config, init.weights, EXITS)
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, betas=settings.betas, eps=settings.eps, weight_decay=settings.weight_decay
    )
    examples = soft.build_examples(samples, settings.max_len)
    lengths = [len(e.ids) for e in examples]
    per_epoch = -(-len(examples) // settings.batch_size)
    assert per_epoch < settings.max_steps
    losses = []
    for step in range(settings.max_steps):
        epoch, position = divmod(step, per_epoch)
        batch = [examples[i] for i in soft.epoch_batches(lengths, settings.batch_size, settings.seed, epoch)[position]]
        for group in optimizer.param_groups:
            group["lr"] = soft.lr_at(step, settings.max_steps, settings.lr, settings.warmup)
        loss = model.loss(*soft.collate(batch), exit_weights=settings.exit_weights)[0]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        losses.append(loss.item())
    assert [r["loss"] for r in _log(tmp_path / "out")] == losses
    trained = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(torch.equal(trained[name], p.detach()) for name, p in model.lm.named_parameters())


def test_bfloat16_autocast_trains(dirs, samples, tmp_path):
    init = soft.load_init(dirs["init"], EXITS)
    soft.train_soft(
        init,
        samples,
        tmp_path / "out",
        _settings(max_steps=20, save_every=100, dtype="bfloat16", save_dtype="bfloat16"),
        progress=False,
    )
    weights = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(w.dtype == torch.bfloat16 for w in weights.values())
    before, after = _data_loss(init, samples), _data_loss(soft.load_init(tmp_path / "out"), samples)
    assert all(a < 0.7 * b for a, b in zip(after, before)), (before, after)


# ---- (c) resume ------------------------------------------------------------------------------------
def test_interrupted_run_resumes_to_the_same_weights(dirs, samples, tmp_path, monkeypatch):
    """12 steps straight vs a run killed during step 7 (last checkpoint: step 4) and started again:
    the weights agree to max |diff| <= 1e-6 (fp32; in practice bitwise) and so do the logged losses."""
    init = soft.load_init(dirs["init"], EXITS)
    straight = tmp_path / "straight"
    soft.train_soft(init, samples, straight, _settings(), progress=False)

    resumed = tmp_path / "resumed"
    real_lr_at = soft.lr_at

    def dying_lr_at(step, *args):
        if step == 6:
            raise KeyboardInterrupt
        return real_lr_at(step, *args)

    monkeypatch.setattr(soft, "lr_at", dying_lr_at)
    with pytest.raises(KeyboardInterrupt):
        soft.train_soft(init, samples, resumed, _settings(), progress=False)
    monkeypatch.setattr(soft, "lr_at", real_lr_at)
    state = json.loads((resumed / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4 and not state["completed"] and len(_log(resumed)) == 6
    assert set(load_file(str(resumed / "checkpoint" / "optimizer.safetensors"))) >= {
        "model.norm.weight.exp_avg",
        "lm_head.weight.exp_avg_sq",
        "rng.torch",
    }

    result = soft.train_soft(init, samples, resumed, _settings(), progress=False)
    assert result["status"] == "completed" and result["steps"] == 12
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert [r["loss"] for r in _log(straight)] == pytest.approx([r["loss"] for r in _log(resumed)], abs=1e-6)
    assert [r["step"] for r in _log(resumed)] == list(range(1, 13))
    # The finished run keeps only its state; asking again does not train again.
    assert sorted(p.name for p in (resumed / "checkpoint").iterdir()) == ["state.json"]
    assert soft.train_soft(init, samples, resumed, _settings(), progress=False)["status"] == "already-completed"
    # A checkpoint is never continued with other settings.
    soft.train_soft(init, samples, tmp_path / "other", _settings(), progress=False, stop_after=2)
    with pytest.raises(Exception, match="other settings or data"):
        soft.train_soft(init, samples, tmp_path / "other", _settings(lr=1e-3), progress=False)


# ---- (c2) KL to the targets' own distributions -------------------------------------------------------
def _full_target_logprobs(target, s: data.Sample) -> torch.Tensor:
    """log softmax of the target before each continuation token, from one plain forward [n, V]."""
    ids = torch.tensor([s.prompt_ids + s.output_ids])
    logits = target.model.forward(ids, torch.arange(ids.shape[1])[None], target.model.new_cache(1, ids.shape[1]))
    return torch.log_softmax(logits[0].float(), -1)[len(s.prompt_ids) - 1 : -1]


def test_teacher_topk_is_the_targets_distribution(target, samples, monkeypatch):
    """Teacher forcing in chunks of 3 gives the top-k of one plain forward; for a greedy sample its
    first id is the token the target chose."""
    s = max(samples, key=lambda s: len(s.prompt_ids) + len(s.output_ids))
    assert len(s.prompt_ids) + len(s.output_ids) > 9
    ref = _full_target_logprobs(target, s)
    monkeypatch.setattr(teacher, "PREFILL_CHUNK", 3)
    ids, lp = teacher.teacher_topk(target.model, s.prompt_ids, s.output_ids, 4)
    assert ids.shape == lp.shape == (len(s.output_ids), 4)
    torch.testing.assert_close(lp, ref.topk(4, -1).values, atol=1e-5, rtol=0)
    torch.testing.assert_close(ref.gather(1, ids), lp, atol=1e-5, rtol=0)
    assert ids[:, 0].tolist() == s.output_ids


def test_teacher_file_resumes_and_loads_each_target_once(target, samples, tmp_path):
    path = tmp_path / "teacher.jsonl"
    loads = []

    def loader(name):
        assert name == target.name
        loads.append(name)
        return target

    first = teacher.compute_teachers(samples[:5], path, loader, k=4, progress=False)
    with open(path, "a") as f:
        f.write('{"key": "cut off mid-wri')
    both = teacher.compute_teachers(samples, path, loader, k=4, progress=False)
    assert len(loads) == 2 and len(path.read_text().splitlines()) == len(samples)
    for key, (ids, lp) in first.items():
        assert torch.equal(both[key][0], ids) and torch.equal(both[key][1], lp)
    again = teacher.compute_teachers(samples, path, loader, k=3, progress=False)  # fewer tokens: read, cut
    assert len(loads) == 2 and all(v[0].shape[1] == 3 for v in again.values())
    with pytest.raises(Exception, match="fewer than 6"):
        teacher.compute_teachers(samples, path, loader, k=6, progress=False)


@pytest.mark.parametrize("head", [None, [0, 1, 2, 3, 5, 8]])
def test_kl_loss_is_the_kl_to_the_target(dirs, samples, target, tmp_path, head):
    """With the teacher's whole distribution (k = vocabulary) the KL term is KL(p_target || q_exit) per
    token; with a cut head, p renormalised over the head's tokens; w mixes it with the CE."""
    init = soft.load_init(dirs["init"], EXITS)
    weights = init.weights if head is None else soft.shrink_head(init.weights, head)
    model = soft.SortedTrainModel(init.config, weights, EXITS)
    batch_samples = samples[:6]
    teachers = teacher.compute_teachers(
        batch_samples, tmp_path / "t.jsonl", lambda name: target, k=VOCAB, progress=False
    )
    ids, labels, soft_labels = soft.collate(soft.build_examples(batch_samples, 1024, teachers))
    with torch.no_grad():
        kl = model.loss(ids, labels, soft_labels, kl_weight=1.0)
        ce = model.loss(ids, labels)
        mixed = model.loss(ids, labels, soft_labels, kl_weight=0.25)
    exit_logits = model.exit_logits(ids)
    keep = torch.ones(VOCAB, dtype=torch.bool) if head is None else torch.isin(torch.arange(VOCAB), torch.tensor(head))
    expected, count = torch.zeros(len(EXITS)), 0
    for b, s in enumerate(batch_samples):
        p = _full_target_logprobs(target, s).exp() * keep
        p = p / p.sum(-1, keepdim=True)
        first = len(s.prompt_ids)
        valid = torch.tensor([keep[t].item() for t in s.output_ids])
        count += int(valid.sum())
        for e, logits in enumerate(exit_logits):
            logq = torch.log_softmax(logits[b, first - 1 : first - 1 + len(s.output_ids)], -1)
            term = (torch.xlogy(p, p) - torch.where(p > 0, p * logq, 0.0)).sum(-1)
            expected[e] += term[valid].sum()
    assert kl[2] == ce[2] == count > 0
    torch.testing.assert_close(kl[1], expected / count, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], 0.75 * ce[1] + 0.25 * kl[1], atol=1e-5, rtol=1e-5)


def test_kl_training_moves_every_exit_toward_the_target_and_resumes(dirs, samples, target, tmp_path):
    init = soft.load_init(dirs["init"], EXITS)
    teachers = teacher.compute_teachers(samples, tmp_path / "t.jsonl", lambda name: target, k=5, progress=False)
    settings = _settings(max_steps=30, save_every=100, kl_weight=1.0)
    with pytest.raises(ValueError, match="distributions"):
        soft.train_soft(init, samples, tmp_path / "none", settings, progress=False)
    soft.train_soft(init, samples, tmp_path / "kl", settings, progress=False, teachers=teachers)
    batch = soft.collate(soft.build_examples(samples, 1024, teachers))

    def kl_of(directory):
        trained = soft.load_init(directory, EXITS)
        with torch.no_grad():
            return soft.SortedTrainModel(trained.config, trained.weights, EXITS).loss(*batch, kl_weight=1.0)[1]

    before, after = kl_of(dirs["init"]), kl_of(tmp_path / "kl")
    assert (after < 0.5 * before).all(), (before, after)
    # Stopped after 7 steps and run again: the weights of the uninterrupted run.
    soft.train_soft(init, samples, tmp_path / "resumed", settings, progress=False, teachers=teachers, stop_after=7)
    soft.train_soft(init, samples, tmp_path / "resumed", settings, progress=False, teachers=teachers)
    a, b = (
        load_file(str(tmp_path / "kl" / "model.safetensors")),
        load_file(str(tmp_path / "resumed" / "model.safetensors")),
    )
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    # Other teacher distributions are other data: the checkpoint is not continued with them.
    soft.train_soft(init, samples, tmp_path / "other", settings, progress=False, teachers=teachers, stop_after=2)
    fewer = {k: (v[0][:, :4], v[1][:, :4]) for k, v in teachers.items()}
    with pytest.raises(Exception, match="other settings or data"):
        soft.train_soft(init, samples, tmp_path / "other", settings, progress=False, teachers=fewer)


# ---- (d) the output loads and its sub-models are the trainer's exits -------------------------------
def _check_exits_match(out: Path, ids: torch.Tensor) -> list[torch.Tensor]:
    trained = soft.load_init(out)
    model = soft.SortedTrainModel(trained.config, trained.weights, trained.spec.exits)
    mine = model.exit_logits(ids)
    loaded = load_model(out, dtype="float32")
    assert loaded.is_fast and loaded.model.config.num_layers == EXITS[-1]
    for exit_, logits in zip(EXITS, mine):
        sub = loaded.model.truncated(exit_)
        ref = sub.forward(ids, torch.arange(ids.shape[1])[None], sub.new_cache(1, ids.shape[1]))
        assert torch.equal(torch.isinf(ref), torch.isinf(logits))
        torch.testing.assert_close(ref, logits, atol=1e-4, rtol=0)
    return mine


def test_trained_draft_loads_and_its_sub_models_match_the_trainer(dirs, samples, tmp_path):
    out = tmp_path / "out"
    soft.train_soft(soft.load_init(dirs["init"], EXITS), samples, out, _settings(max_steps=5), progress=False)
    spec = json.loads((out / "sorted.json").read_text())
    assert spec["exits"] == EXITS and spec["head_tokens"] is None and spec["extra"]["soft"]["steps"] == 5
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 4, 2]])
    mine = _check_exits_match(out, ids)
    # The exits really differ (the test would pass trivially if every exit were the last one).
    assert (mine[0] - mine[-1]).abs().max() > 1e-2
    # The exit-l hidden state is layer l's output, not transformers' normed last hidden state.
    trained = soft.load_init(out)
    model = soft.SortedTrainModel(trained.config, trained.weights, trained.spec.exits)
    torch.testing.assert_close(model.lm(ids).logits, mine[-1], atol=1e-5, rtol=0)


# ---- (e) a shrunk head ------------------------------------------------------------------------------
def test_head_tokens_keep_the_most_frequent_tokens_and_eos(dirs, samples, tmp_path):
    counts = Counter()
    for s in samples:
        counts.update(s.prompt_ids + s.output_ids)
    ranked = sorted((t for t in range(VOCAB) if t != EOS), key=lambda t: (-counts[t], t))
    expected = sorted([EOS] + ranked[:4])
    assert expected != list(range(5))  # frequency, not id order, decides (a precondition of the data)
    out = tmp_path / "out"
    soft.train_soft(
        soft.load_init(dirs["init"], EXITS),
        samples,
        out,
        _settings(max_steps=4, head_tokens=5),
        eos_ids=[EOS],
        progress=False,
    )
    weights = load_file(str(out / "model.safetensors"))
    assert weights["lm_head.token_ids"].tolist() == expected and weights["lm_head.weight"].shape[0] == 5
    assert json.loads((out / "sorted.json").read_text())["head_tokens"] == 5

    ids = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])
    mine = _check_exits_match(out, ids)
    loaded = load_model(out, dtype="float32")
    outside = [t for t in range(VOCAB) if t not in expected]
    for exit_ in EXITS:
        sub = loaded.model.truncated(exit_)
        probs = torch.softmax(sub.forward(ids, torch.arange(10)[None], sub.new_cache(1, 10)), -1)
        assert torch.all(probs[..., outside] == 0) and torch.all(probs[..., expected] > 0)
    assert all(torch.isfinite(m[..., expected]).all() for m in mine)

    # Targets outside the head are left out of the loss.
    model = soft.SortedTrainModel(soft.load_init(out).config, weights, EXITS)
    labels = torch.tensor([[-100] + [outside[0]] * 4])
    assert model.loss(torch.tensor([[0, 1, 2, 4, 5]]), labels)[2] == 0
    labels[0, 2] = expected[0]
    assert model.loss(torch.tensor([[0, 1, 2, 4, 5]]), labels)[2] == 1


def test_spec_bench_prompts_skip_the_benchmark_questions(monkeypatch):
    """`--data spec-bench` without --num-prompts asks tune_prompts (questions 21..) for all the rest."""
    from specgrove import tuning
    from specgrove.bench.spec_bench import find_spec_bench, load_questions

    try:
        total = len(load_questions(find_spec_bench(), None))
    except Exception:
        pytest.skip("no Spec-Bench question file here")
    asked = []
    monkeypatch.setattr(tuning, "tune_prompts", lambda target, n, data=None: asked.append(n) or [[1]] * n)
    assert len(data.spec_bench_prompts(object(), None)) == total - tuning.TUNE_PROMPT_OFFSET
    assert len(data.spec_bench_prompts(object(), 3)) == 3 and asked == [total - 20, 3]


# ---- (f) the command --------------------------------------------------------------------------------
def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="specgrove")
    train_cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_train_sorted_command_end_to_end(dirs, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "abcab"}, {"prompt": "jjahd"}, {"prompt_ids": [1, 2, 3]}, {"prompt": "fgfgf"}, {"prompt": "e"}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "out"
    argv = [
        "train-sorted",
        "--init",
        str(dirs["init"]),
        "--exits",
        "1,2,4",
        "--targets",
        str(dirs["target"]),
        "--data",
        str(prompts),
        "--max-new-tokens",
        "10",
        "--out",
        str(out),
        "--max-steps",
        "6",
        "--batch-size",
        "2",
        "--save-every",
        "2",
        "--target-dtype",
        "float32",
        "--no-progress",
    ]
    args = _parse(argv)
    assert args.func is train_cli.cmd_train_sorted
    assert train_cli.cmd_train_sorted(args) == 0

    samples = data.read_samples(out / "samples.jsonl")
    by_index = {s.meta["prompt_index"]: s for s in samples}
    assert len(samples) == 5 and by_index[0].prompt_ids == [0, 1, 2, 0, 1]  # "abcab" via the letter tokenizer
    assert by_index[2].prompt_ids == [1, 2, 3]
    log = _log(out)
    assert [r["step"] for r in log] == list(range(1, 7))
    assert set(log[0]) >= {"step", "loss", "loss_exits", "lr", "tokens", "elapsed_s"}
    config = json.loads((out / "train_config.json").read_text())
    assert config["exits"] == EXITS and config["settings"]["batch_size"] == 2 and config["total_steps"] == 6
    assert config["data"]["samples"] == 5 and config["data"]["loss_tokens"] == sum(len(s.output_ids) for s in samples)
    assert config["torch"] == torch.__version__ and EOS in config["eos_ids"]
    spec = json.loads((out / "sorted.json").read_text())
    assert spec["exits"] == EXITS and spec["extra"]["soft"]["data"]["targets"] == [str(dirs["target"])]
    assert load_model(out, dtype="float32").model.config.num_layers == 4

    # The same command again: nothing to generate or train.
    assert train_cli.cmd_train_sorted(_parse(argv)) == 0
    assert len(_log(out)) == 6 and len((out / "samples.jsonl").read_text().splitlines()) == 5

    # The samples file can be the data of another run, without targets.
    args = _parse(
        [
            "train-sorted",
            "--init",
            str(out),
            "--data",
            str(out / "samples.jsonl"),
            "--out",
            str(tmp_path / "again"),
            "--max-steps",
            "2",
            "--no-progress",
        ]
    )
    assert train_cli.cmd_train_sorted(args) == 0
    assert json.loads((tmp_path / "again" / "sorted.json").read_text())["exits"] == EXITS

    # KL to the targets' distributions: the teacher pass loads each sample's target by its name.
    args = _parse(
        [
            "train-sorted",
            "--init",
            str(out),
            "--data",
            str(out / "samples.jsonl"),
            "--out",
            str(tmp_path / "kl"),
            "--max-steps",
            "2",
            "--kl-weight",
            "0.5",
            "--teacher-top-k",
            "4",
            "--target-dtype",
            "float32",
            "--no-progress",
        ]
    )
    assert train_cli.cmd_train_sorted(args) == 0
    records = [json.loads(line) for line in (tmp_path / "kl" / "teacher.jsonl").read_text().splitlines()]
    assert len(records) == 5 and all(len(r["ids"][0]) == 4 for r in records)
    config = json.loads((tmp_path / "kl" / "train_config.json").read_text())
    assert config["settings"]["kl_weight"] == 0.5 and config["data"]["teacher"]["top_k"] == 4


def test_train_sorted_rejects_bad_input_with_advice(dirs, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "abc"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    base = [
        "train-sorted",
        "--init",
        str(dirs["init"]),
        "--exits",
        "1,2,4",
        "--targets",
        str(dirs["target"]),
        "--data",
        str(prompts),
        "--out",
        str(tmp_path / "out"),
        "--max-steps",
        "1",
        "--no-progress",
    ]

    def run(**changes):
        argv = list(base)
        for flag, value in changes.items():
            argv[argv.index(flag) + 1] = value
        return train_cli.cmd_train_sorted(_parse(argv))

    with pytest.raises(ModelNotFoundError, match="built-in name"):
        run(**{"--init": "no-such-model"})
    with pytest.raises(ModelNotFoundError):
        run(**{"--targets": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match="deeper than .* 4 layers"):
        run(**{"--exits": "1,2,8"})
    with pytest.raises(ValueError, match="increasing"):
        run(**{"--exits": "2,1"})
    with pytest.raises(IncompatibleModelsError, match="same|share"):
        run(**{"--targets": str(dirs["other_vocab"])})
    with pytest.raises(ValueError, match="no prompts"):
        run(**{"--data": str(empty)})
    with pytest.raises(ValueError, match="pass --exits"):
        train_cli.cmd_train_sorted(_parse([a for a in base if a not in ("--exits", "1,2,4")]))
    assert not (tmp_path / "out" / "samples.jsonl").exists()  # every check comes before any generation


# ---- calibrating the exit thresholds -------------------------------------------------------------------
def test_calibration_statistics_and_rule(dirs, samples, tmp_path):
    from specgrove.models.sorted import build_sorted
    from specgrove.train import calibrate

    draft = load_model(build_sorted(dirs["init"], EXITS, tmp_path / "draft"), dtype="float32")
    stats = calibrate.exit_statistics(draft, samples, EXITS, limit=12)
    positions = sum(len(s.output_ids) for s in samples[:12] if s.output_ids)
    assert [s.exit_layer for s in stats] == EXITS and all(len(s.agrees) == positions for s in stats)
    # the statistics are the sub-models' own: exit 1 on one sample, by a plain forward of truncated(1)
    sample = next(s for s in samples if s.output_ids)
    ids = sample.prompt_ids + sample.output_ids
    sub = draft.model.truncated(EXITS[0])
    logits = sub.forward(torch.tensor([ids]), torch.arange(len(ids))[None], sub.new_cache(1, len(ids)))[0]
    probs = torch.softmax(logits[len(sample.prompt_ids) - 1 : -1], -1)
    first = calibrate.exit_statistics(draft, [sample], EXITS)[0]
    torch.testing.assert_close(first.confidence, probs.max(-1).values, atol=1e-5, rtol=0)
    assert first.agrees.tolist() == (probs.argmax(-1) == torch.tensor(sample.output_ids)).tolist()
    nxt = torch.tensor(sample.output_ids)
    assert first.in_top.tolist() == (probs.topk(4, -1).indices == nxt[:, None]).any(-1).tolist()
    assert all(s.in_top_rate() >= s.agreement for s in stats)
    # per target: two targets' samples (the same text under two names), each rate over its own positions
    from dataclasses import replace

    twin = [replace(s, target="other") for s in samples[:12]]
    mixed = calibrate.exit_statistics(draft, samples[:12] + twin, EXITS, top_n=2)
    for s, plain in zip(mixed, stats):
        groups = s.by_target()
        assert set(groups) == {samples[0].target, "other"} and groups["other"][2] == positions
        assert groups["other"][0] == pytest.approx(plain.agreement) == pytest.approx(groups[samples[0].target][0])
        assert groups["other"][1] == pytest.approx(s.in_top_rate())
    # the rule: the smallest grid threshold whose precision reaches the deepest exit's agreement
    thresholds = calibrate.choose_thresholds(stats)
    assert len(thresholds) == len(EXITS) and thresholds[-1] == 0.0
    goal = stats[-1].agreement
    for s, t in zip(stats[:-1], thresholds[:-1]):
        if t < 1.0:
            assert s.precision_at(t)[0] >= goal
        smaller = [g for g in calibrate.GRID if g < t]
        assert all(s.precision_at(g)[0] < goal or s.precision_at(g)[1] == 0 for g in smaller)
    # per target: the same rule over each target's own positions (here the same text: the same thresholds)
    assert calibrate.choose_target_thresholds(mixed) == {samples[0].target: thresholds, "other": thresholds}
    assert calibrate.choose_target_thresholds(stats) == {}  # one target: the draft's own thresholds serve it
    other = mixed[0].for_target("other")
    assert (
        other.agrees.tolist() == stats[0].agrees.tolist() and other.confidence.tolist() == stats[0].confidence.tolist()
    )
    made = [
        calibrate.ExitStatistics(1, torch.tensor([0.9, 0.3, 0.2]), torch.tensor([True, False, False])),
        calibrate.ExitStatistics(2, torch.tensor([0.9, 0.9, 0.9]), torch.tensor([True, True, False])),
    ]
    assert calibrate.choose_thresholds(made) == [0.35, 0.0]  # from 0.35 up exit 1 is right 1/1 >= 2/3
    made[0] = calibrate.ExitStatistics(1, torch.tensor([0.9, 0.3, 0.2]), torch.tensor([False, False, True]))
    assert calibrate.choose_thresholds(made) == [1.0, 0.0]  # never as good as the deepest exit


def test_calibrate_sorted_command_writes_thresholds(dirs, samples, tmp_path, capsys):
    from specgrove.cli import main
    from specgrove.models.sorted import SortedSpec, build_sorted

    draft = build_sorted(dirs["init"], EXITS, tmp_path / "draft")
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(s.to_json() + "\n" for s in samples))
    assert (
        main(
            [
                "calibrate-sorted",
                "--draft",
                str(draft),
                "--samples",
                str(path),
                "--limit",
                "8",
                "--dtype",
                "float32",
                "--write",
            ]
        )
        == 0
    )
    spec = SortedSpec.load(draft)
    calibration = spec.extra["calibration"]
    assert spec.thresholds[-1] == 0.0 and calibration["num_samples"] == 8
    assert set(calibration["in_top_4"]) == set(calibration["per_target"]) == {str(e) for e in EXITS}
    out = capsys.readouterr().out
    assert "agreement" in out and "in top-4" in out
    assert main(["calibrate-sorted", "--draft", str(draft), "--samples", str(tmp_path / "none.jsonl")]) == 2
