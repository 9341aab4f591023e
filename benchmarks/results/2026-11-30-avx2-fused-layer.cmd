# 2026-11-30, AMD EPYC (Zen 3, avx2 fma f16c; no AVX-512, no VNNI), 2 cores, commit ef070a6 (layer ops fused; before Q4_K x8)
.venv/bin/specgrove bench --limit 20 --max-new-tokens 64 --interleave -k 3 --methods plain,draft_model,prompt_lookup,llama_cpp --json benchmarks/results/2026-11-30-avx2-fused-layer.json
# llama-cpp-python 0.3.36 built here with CMAKE_ARGS="-DGGML_NATIVE=ON"
