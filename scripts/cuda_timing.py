"""Time the fast runtime on CUDA with random weights in the default models' shapes (Qwen2.5-1.5B target,
Qwen2.5-0.5B draft): a GPU machine here cannot fetch the real weights.

Reports, as JSON (--json) and text: the GPU's memory bandwidth; the target's forward time for 1..32 new
tokens at a ~100-token context, eager and with CUDA graphs, bf16 and int4, with the achieved weight
bandwidth; the engine's plain decoding and a draft-model step (k=4 chain), eager and with graphs. With
random weights acceptance means nothing, so the speculative figure is the step time; tokens/s follow for
a given tau (--tau, measured on CPU with the real models) as tau / step time.
Usage: PYTHONPATH=src python scripts/cuda_timing.py [--json out.json] [--tau 3.06]
"""

import argparse
import json
import time

import torch
from transformers import Qwen2Config

from specgrove.bench.bandwidth import measure_memory_bandwidth
from specgrove.drafting.draft_model import DraftModelProposer
from specgrove.engine.engine import SpecEngine
from specgrove.models.llama import LlamaConfig, LlamaModel
from specgrove.models.loader import LoadedModel
from specgrove.sampling import SamplingParams
from specgrove.trees.shape import TreeShape

SHAPES = {
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14),
}


def config(shape: str) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=151936,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_theta=1000000.0,
        **SHAPES[shape],
    )


def random_weights(cfg: Qwen2Config, device) -> dict[str, torch.Tensor]:
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)

    def r(*shape):
        return torch.randn(*shape, device=device, dtype=torch.bfloat16) * 0.02

    w = {
        "model.embed_tokens.weight": r(cfg.vocab_size, h),
        "model.norm.weight": torch.ones(h, device=device),
        "lm_head.weight": r(cfg.vocab_size, h),
    }
    for layer in range(L):
        p = f"model.layers.{layer}."
        w.update(
            {
                p + "input_layernorm.weight": torch.ones(h, device=device),
                p + "post_attention_layernorm.weight": torch.ones(h, device=device),
                p + "self_attn.q_proj.weight": r(h, h),
                p + "self_attn.q_proj.bias": r(h),
                p + "self_attn.k_proj.weight": r(kv, h),
                p + "self_attn.k_proj.bias": r(kv),
                p + "self_attn.v_proj.weight": r(kv, h),
                p + "self_attn.v_proj.bias": r(kv),
                p + "self_attn.o_proj.weight": r(h, h),
                p + "mlp.gate_proj.weight": r(i, h),
                p + "mlp.up_proj.weight": r(i, h),
                p + "mlp.down_proj.weight": r(h, i),
            }
        )
    return w


def build(shape: str, device, quantization=None, graphs=False) -> LoadedModel:
    cfg = config(shape)
    model = LlamaModel(
        LlamaConfig.from_hf(cfg),
        cfg,
        random_weights(cfg, device),
        torch.bfloat16,
        device,
        quantization=quantization,
        cuda_graphs=graphs,
    )
    return LoadedModel(
        name=f"random-{shape}",
        path=None,
        model=model,
        tokenizer=None,
        hf_config=cfg,
        dtype=torch.bfloat16,
        device=torch.device(device),
        load_seconds=0.0,
        info={},
    )


def forward_ms(model: LlamaModel, n: int, sync, context: int = 100, reps: int = 30) -> float:
    cache = model.new_cache(1, context + n + 1)
    model.forward(torch.randint(0, 1000, (1, context)), torch.arange(context)[None], cache, logits_at=None)
    cache.commit(0)
    ids, pos = torch.randint(0, 1000, (1, n)), (context + torch.arange(n))[None]
    for _ in range(3):
        model.forward(ids, pos, cache)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        model.forward(ids, pos, cache)
    sync()
    return (time.perf_counter() - t0) / reps * 1e3


def engine_ms_per_step(target: LoadedModel, draft: LoadedModel | None, sync, k: int = 4, tokens: int = 64) -> float:
    proposer = DraftModelProposer(draft, 512, TreeShape.chain(k)) if draft is not None else None
    engine = SpecEngine(target, proposer, k if draft is not None else 0, 512)
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    prompt = list(range(100, 200))
    engine.generate(engine.new_sequence(prompt, params))  # warm-up (graph capture included)
    sync()
    t0 = time.perf_counter()
    seq = engine.generate(engine.new_sequence(prompt, params))
    sync()
    steps = seq.metrics.target_forwards
    return (time.perf_counter() - t0 - seq.metrics.prefill_time_s) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default=None)
    ap.add_argument("--tau", type=float, default=3.06, help="tau of the draft-model step measured with the real models")
    args = ap.parse_args()
    device = args.device
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    out = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu", "torch": torch.__version__}
    bw = measure_memory_bandwidth(device=device)
    out["bandwidth"] = {"read_gbs": bw.read_bandwidth_gbs, "copy_gbs": bw.memory_bandwidth_gbs}
    print(
        f"{out['device']}: memory bandwidth read {bw.read_bandwidth_gbs:.0f} GB/s, "
        f"copy {bw.memory_bandwidth_gbs:.0f} GB/s",
        flush=True,
    )
    out["forward"] = []
    for quant in (None, "int4"):
        for graphs in (False, True):
            m = build("1.5b", device, quant, graphs).model
            wb = m.weight_bytes()
            for n in (1, 2, 4, 8, 16, 32):
                ms = forward_ms(m, n, sync)
                row = {
                    "weights": quant or "bf16",
                    "graphs": graphs,
                    "new_tokens": n,
                    "ms": ms,
                    "weight_gbs": wb / ms / 1e6,
                    "weight_bytes": wb,
                }
                out["forward"].append(row)
                print(
                    f"1.5B {row['weights']:5s} graphs={graphs!s:5s} new tokens {n:2d}: {ms:7.3f} ms/forward, "
                    f"weights at {row['weight_gbs']:7.0f} GB/s "
                    f"({row['weight_gbs'] / bw.read_bandwidth_gbs:.0%} of read)",
                    flush=True,
                )
            del m
            torch.cuda.empty_cache()
    out["engine"] = []
    for graphs in (False, True):
        target, draft = build("1.5b", device, None, graphs), build("0.5b", device, None, graphs)
        plain = engine_ms_per_step(target, None, sync)
        spec = engine_ms_per_step(target, draft, sync)
        row = {
            "graphs": graphs,
            "plain_ms_per_token": plain,
            "plain_tokens_per_s": 1000 / plain,
            "draft_model_k4_ms_per_step": spec,
            "tau": args.tau,
            "draft_model_tokens_per_s_at_tau": args.tau * 1000 / spec,
            "speedup_at_tau": args.tau * plain / spec,
        }
        out["engine"].append(row)
        print(
            f"engine graphs={graphs}: plain {plain:.2f} ms/token ({1000 / plain:.0f} tok/s); draft_model k=4 step "
            f"{spec:.2f} ms -> at tau {args.tau}: {row['draft_model_tokens_per_s_at_tau']:.0f} tok/s, "
            f"{row['speedup_at_tau']:.2f}x over plain",
            flush=True,
        )
        del target, draft
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
