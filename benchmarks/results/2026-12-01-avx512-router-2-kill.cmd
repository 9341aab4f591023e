# 2026-12-01 01:35-01:37 UTC, AMD EPYC with AVX-512 (avx512_vnni, avx512_bf16), 2 cores, load average 3.01 -> 2.17 (this machine alone); commit c739cde; CPU flags: 2026-12-01-avx512.lscpu.txt
.venv/bin/specgrove serve --port 18003 --policy fixed:3 -k 3 --max-num-seqs 2 --max-waiting 32 --max-model-len 2048 --replicas 2 --ray-address local
.venv/bin/specgrove loadtest --url http://127.0.0.1:18003 --rates 0.8 --requests 16 --max-tokens 32 --data /work/shared/data/spec_bench/question.jsonl --out benchmarks/results/2026-12-01-avx512-router-2-kill
# 10 s into the load test: kill -KILL $(pgrep -f ServeReplica:specgrove:engine | head -1)  (one engine replica)
