# 2026-12-01 01:30-01:31 UTC, AMD EPYC with AVX-512 (avx512_vnni, avx512_bf16), 2 cores, load average 0.83 -> 0.74 (this machine alone); commit 6549b44; CPU flags: 2026-12-01-avx512.lscpu.txt
.venv/bin/specgrove serve --port 18000 --policy fixed:3 -k 3 --max-num-seqs 2 --max-waiting 32 --max-model-len 2048 
.venv/bin/specgrove loadtest --url http://127.0.0.1:18000 --rates 0.2,0.8,1.6 --requests 8 --max-tokens 32 --data /work/shared/data/spec_bench/question.jsonl --out benchmarks/results/2026-12-01-avx512-single-b
