# 2026-11-30, AMD EPYC (Zen 3, avx2 fma f16c; no AVX-512, no VNNI), 2 cores, commit 6cba47b (Q6_K rows kernel: one unpacking for up to 8 tokens; Q4_K x8 with tokens 8 at a time; SPECGROVE_Q4K_LAYOUT=auto, the default; the draft's head cut to 32768 tokens); CPU flags: 2026-11-30-avx2.lscpu.txt
.venv/bin/specgrove bench --limit 20 --max-new-tokens 64 --interleave -k 3 --draft-vocab 32768 --methods plain,draft_model,prompt_lookup,llama_cpp --json benchmarks/results/2026-11-30-avx2-q6k-8tokens.json
# llama-cpp-python 0.3.36 built here with CMAKE_ARGS="-DGGML_NATIVE=ON"
