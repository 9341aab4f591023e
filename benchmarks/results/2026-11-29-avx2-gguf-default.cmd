# 2026-11-29, AMD EPYC (Zen 3, avx2 fma f16c; no AVX-512, no VNNI), 2 cores, commit 826313a + docs
.venv/bin/specgrove bench --limit 20 --max-new-tokens 64 --interleave -k 3 --methods plain,draft_model,prompt_lookup,llama_cpp --json benchmarks/results/2026-11-29-avx2-gguf-default.json
# llama-cpp-python 0.3.x built here with CMAKE_ARGS="-DGGML_NATIVE=ON"
