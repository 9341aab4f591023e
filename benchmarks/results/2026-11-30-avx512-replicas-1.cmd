# 2026-11-30 23:31-23:45 UTC, AMD EPYC with AVX-512 (avx512_vnni, avx512_bf16), 2 cores; load average 4.0 falling to 1.1 (another session's tests at the start); commit 87821ef + the sampling merge in progress (serving code as at ad18646); CPU flags: 2026-11-30-avx512-chunked-prefill.lscpu.txt
# server (1 Ray Serve replica(s); replica CPUs default: 2 / 1, as many torch threads):
.venv/bin/specgrove serve --replicas 1 --ray-address local --port 18001 --policy fixed:3 -k 3 --max-num-seqs 2 --max-waiting 32 --max-model-len 2048 --metrics-port 19010
# load (the same seeded Poisson arrivals and Spec-Bench prompts 1-8 as streamed chat requests, greedy):
.venv/bin/specgrove loadtest --url http://127.0.0.1:18001 --rates 0.1,0.2,0.4,0.8 --requests 8 --max-tokens 32 --data /work/shared/data/spec_bench/question.jsonl --out benchmarks/results/2026-11-30-avx512-replicas-1
