"""Time the fast runtime on CUDA with random weights in the default target's shape (Qwen2.5-1.5B).

For a GPU machine that cannot fetch the real weights: forward time for 1..32 new tokens at a ~100-token
context, with CUDA graphs off. Usage: PYTHONPATH=src python scripts/cuda_timing.py [--dtype bfloat16]
"""

import argparse
import time

import torch
from transformers import Qwen2Config

from specgrove.models.llama import LlamaConfig, LlamaModel


def random_weights(cfg: Qwen2Config) -> dict[str, torch.Tensor]:
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    w = {"model.embed_tokens.weight": torch.randn(cfg.vocab_size, h) * 0.02, "model.norm.weight": torch.ones(h),
         "lm_head.weight": torch.randn(cfg.vocab_size, h) * 0.02}
    for layer in range(L):
        p = f"model.layers.{layer}."
        w.update({p + "input_layernorm.weight": torch.ones(h), p + "post_attention_layernorm.weight": torch.ones(h),
                  p + "self_attn.q_proj.weight": torch.randn(h, h) * 0.02, p + "self_attn.q_proj.bias": torch.zeros(h),
                  p + "self_attn.k_proj.weight": torch.randn(kv, h) * 0.02, p + "self_attn.k_proj.bias": torch.zeros(kv),
                  p + "self_attn.v_proj.weight": torch.randn(kv, h) * 0.02, p + "self_attn.v_proj.bias": torch.zeros(kv),
                  p + "self_attn.o_proj.weight": torch.randn(h, h) * 0.02,
                  p + "mlp.gate_proj.weight": torch.randn(i, h) * 0.02, p + "mlp.up_proj.weight": torch.randn(i, h) * 0.02,
                  p + "mlp.down_proj.weight": torch.randn(h, i) * 0.02})
    return w


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                      num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                      rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=1000000.0)
    model = LlamaModel(LlamaConfig.from_hf(cfg), cfg, random_weights(cfg), dtype, args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    context = 100
    print(f"device={args.device} dtype={args.dtype} params={model.num_parameters() / 1e6:.0f}M "
          f"weights={model.weight_bytes() / 1e9:.2f} GB")
    for n in (1, 2, 4, 8, 16, 32):
        cache = model.new_cache(1, context + n + 1)
        model.forward(torch.randint(0, 1000, (1, context)), torch.arange(context)[None], cache, logits_at=None)
        cache.commit(0)
        ids, pos = torch.randint(0, 1000, (1, n)), (context + torch.arange(n))[None]
        for _ in range(3):
            model.forward(ids, pos, cache)
        sync()
        reps = 20
        t0 = time.perf_counter()
        for _ in range(reps):
            model.forward(ids, pos, cache)
        sync()
        ms = (time.perf_counter() - t0) / reps * 1e3
        print(f"new tokens {n:3d}: {ms:7.2f} ms/forward  weight bandwidth {model.weight_bytes() / ms / 1e6:7.1f} GB/s")


if __name__ == "__main__":
    main()
