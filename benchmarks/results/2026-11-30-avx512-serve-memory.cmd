# 2026-11-30 22:47-23:00 UTC, AMD EPYC with AVX-512 (avx512_vnni, avx512_bf16), 2 cores shared with other sessions (memory, not time, is measured); commit 734ff57; CPU flags: 2026-11-30-avx512-chunked-prefill.lscpu.txt
.venv/bin/python scripts/serve_memory.py --out benchmarks/results/2026-11-30-avx512-serve-memory.json
