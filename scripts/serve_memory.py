"""Resident memory of `specgrove serve` with two targets sharing one draft, against two separate servers.

Starts each configuration as its own process (one after the other, never together), waits for /health,
serves one short request per target (so lazily built state exists), reads the process's VmRSS and VmHWM
from /proc, and stops it. Writes a JSON report.

    .venv/bin/python scripts/serve_memory.py --out benchmarks/results/DATE-CPU-serve-memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time

import httpx

TARGET, DRAFT = "qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"
COMMON = ["--policy", "fixed:3", "-k", "3", "--max-num-seqs", "2", "--max-model-len", "2048"]
CONFIGS = {
    # one process: both targets (the 1.5B and the 0.5B itself), the 0.5B draft loaded once for both
    "shared": [["--targets", f"{TARGET},{DRAFT}", "--draft", DRAFT]],
    # two processes, each loading its own copy of the draft
    "separate": [["--target", TARGET, "--draft", DRAFT], ["--target", DRAFT, "--draft", DRAFT]],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def measure(serve_args: list[str]) -> dict:
    port = free_port()
    command = [sys.executable, "-m", "specgrove.cli", "serve", "--port", str(port), *COMMON, *serve_args]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"serve exited: {process.stderr.read()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("serve did not start in 15 minutes")
            time.sleep(0.5)
        models = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        for model in models:
            body = {"model": model, "prompt": "def add(a, b):", "max_tokens": 8, "temperature": 0}
            httpx.post(url + "/v1/completions", json=body, timeout=600).raise_for_status()
        return {
            "command": " ".join(command[1:]),
            "models": models,
            "rss_mib": status_kib(process.pid, "VmRSS") / 1024,
            "peak_rss_mib": status_kib(process.pid, "VmHWM") / 1024,
        }
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    report = {"machine": {"cpu": platform.processor(), "cpus": os.cpu_count()}, "configs": {}}
    for name, processes in CONFIGS.items():
        runs = [measure(p) for p in processes]
        report["configs"][name] = {
            "processes": runs,
            "rss_mib": sum(r["rss_mib"] for r in runs),
            "peak_rss_mib": sum(r["peak_rss_mib"] for r in runs),
        }
        print(f"{name}: {report['configs'][name]['rss_mib']:.0f} MiB resident", file=sys.stderr)
    shared, separate = report["configs"]["shared"]["rss_mib"], report["configs"]["separate"]["rss_mib"]
    report["saved_mib"] = separate - shared
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"shared draft saves {separate - shared:.0f} MiB ({shared:.0f} vs {separate:.0f}); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
