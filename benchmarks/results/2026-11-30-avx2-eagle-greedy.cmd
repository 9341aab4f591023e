# 2026-11-30 (session 7), AMD EPYC (Zen 3, avx2 fma f16c; no AVX-512, no VNNI), 2 cores, commit 7fb1cf7; CPU flags: 2026-11-30-avx2.lscpu.txt
# the head: `.venv/bin/specgrove train-eagle --data-only` (37:27) then `.venv/bin/specgrove train-eagle` (48:50), default recipe, into ~/.cache/specgrove/eagle/
.venv/bin/specgrove bench --limit 20 --max-new-tokens 64 --interleave -k 3 --draft-vocab 32768 --methods plain,draft_model,prompt_lookup,eagle,eagle:widths:2,1,1,eagle:dynamic:6,4,2,eagle:mixed:8,4,2 --json benchmarks/results/2026-11-30-avx2-eagle-greedy.json
