# 2026-11-30 (session 6), AMD EPYC (Zen 3, avx2 fma f16c; no AVX-512, no VNNI), 2 cores, commit 6399c7a (GGUF linears: rows split over threads by claimed blocks, each thread its own range first, then the others' from the back); CPU flags: 2026-11-30-avx2.lscpu.txt
.venv/bin/specgrove bench --limit 20 --max-new-tokens 64 --interleave -k 3 --draft-vocab 32768 --methods plain,draft_model,prompt_lookup,llama_cpp --json benchmarks/results/2026-11-30-avx2-steal.json
# llama-cpp-python 0.3.36 built here with CMAKE_ARGS="-DGGML_NATIVE=ON"
