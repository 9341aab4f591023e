# 2026-11-30 23:48-23:52 UTC, AMD EPYC with AVX-512 (avx512_vnni, avx512_bf16), 2 cores, load average 1.1-2.1 (this machine alone); commit ad18646; CPU flags: 2026-11-30-avx512-chunked-prefill.lscpu.txt
.venv/bin/specgrove serve --replicas 2 --ray-address local --port 18002 --policy fixed:3 -k 3 --max-num-seqs 2 --max-waiting 32 --max-model-len 2048 --metrics-port 19020
.venv/bin/specgrove loadtest --url http://127.0.0.1:18002 --rates 1.6,3.2 --requests 12 --max-tokens 32 --data /work/shared/data/spec_bench/question.jsonl --out benchmarks/results/2026-11-30-avx512-replicas-2-high
