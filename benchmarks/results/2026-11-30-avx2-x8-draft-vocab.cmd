# 2026-11-30, AMD EPYC (Zen 3, avx2 fma f16c; no AVX-512, no VNNI), 2 cores, commit ca63094 (Q4_K x8; the draft's head cut to 32768 tokens)
.venv/bin/specgrove bench --limit 20 --max-new-tokens 64 --interleave -k 3 --draft-vocab 32768 --methods plain,draft_model,prompt_lookup,llama_cpp --json benchmarks/results/2026-11-30-avx2-x8-draft-vocab.json
# llama-cpp-python 0.3.36 built here with CMAKE_ARGS="-DGGML_NATIVE=ON"
