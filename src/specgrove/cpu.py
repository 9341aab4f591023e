"""What this CPU can compute, detected once, and which kernels may therefore run.

Machines of one kind differ: some x86-64 CPUs have only AVX2 (no AVX-512, no VNNI), some AVX-512 with
BF16 and VNNI, some AMX. Libraries under the runtime fail on the smaller ones in two ways:
- loudly: oneDNN's bf16 weight prepacking (`mkldnn._reorder_linear_weight`) raises without AVX-512
  BW/VL/DQ or AVX-NE-CONVERT;
- silently: fbgemm's int8 kernel (`quantized::linear_dynamic`, the `w8a8` format) sums u8 x s8 products
  in saturating 16-bit pairs (`vpmaddubsw`) without AVX-512 VNNI, so outputs come out wrong.

So every kernel choice asks `cpu_features()` first. The answer is the CPU's own flags (Linux
`/proc/cpuinfo`, else ATen's capability) capped by the same environment variables the libraries obey,
so that CI can run the AVX2 path on any machine:
- `SPECGROVE_MAX_ISA`: this project's cap, one of `ISA_LEVELS`;
- `ONEDNN_MAX_CPU_ISA`: oneDNN's (`AVX2`, `AVX512_CORE`, `AVX512_CORE_BF16`, ...);
- `ATEN_CPU_CAPABILITY`: ATen's (`default`, `avx2`, `avx512`).
The lowest of them wins. `isa_cap_env("avx2")` gives all three for a capped test run.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

import torch

# Ordered from least to most capable; each level implies the ones before it.
ISA_LEVELS = ("scalar", "avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx")

# The flags (Linux /proc/cpuinfo names) each level needs on top of the previous one.
_LEVEL_FLAGS = {
    "scalar": (),
    "avx2": ("avx2", "fma", "f16c"),
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq"),
    "avx512_vnni": ("avx512_vnni",),
    "avx512_bf16": ("avx512_bf16",),
    "amx": ("amx_bf16", "amx_int8", "amx_tile"),
}

# oneDNN's ONEDNN_MAX_CPU_ISA names -> the highest level of ours they allow.
_ONEDNN_CAPS = {
    "sse41": "scalar",
    "avx": "scalar",
    "avx2": "avx2",
    "avx2_vnni": "avx2",
    "avx2_vnni_2": "avx2",
    "avx512_core": "avx512",
    "avx512_core_vnni": "avx512_vnni",
    "avx512_core_bf16": "avx512_bf16",
    "avx512_core_fp16": "avx512_bf16",
    "avx10_1_512": "avx512_bf16",
    "avx512_core_amx": "amx",
    "avx512_core_amx_fp16": "amx",
    "avx10_1_512_amx": "amx",
    "avx10_1_512_amx_fp16": "amx",
    "default": "amx",
    "all": "amx",
}
_ATEN_CAPS = {"default": "scalar", "avx2": "avx2", "avx512": "amx"}


class UnsupportedOnCpuError(ValueError):
    """A format or dtype was asked for that this CPU (as capped) cannot compute correctly."""


@dataclass(frozen=True)
class CpuFeatures:
    """The CPU's capabilities after every cap. `level` is the highest `ISA_LEVELS` entry whose flags are
    all present; `flags` are the raw flags that survive the cap; `caps` says which variable capped what."""

    level: str
    detected_level: str
    flags: frozenset[str]
    model_name: str
    caps: tuple[tuple[str, str], ...]

    def has(self, level: str) -> bool:
        return ISA_LEVELS.index(self.level) >= ISA_LEVELS.index(level)

    @property
    def avx_ne_convert(self) -> bool:
        return "avx_ne_convert" in self.flags

    @property
    def bf16_prepack(self) -> bool:
        """oneDNN's bf16 weight reorder: AVX-512 BW/VL/DQ, or AVX-NE-CONVERT on AVX2 machines."""
        return self.has("avx512") or (self.has("avx2") and self.avx_ne_convert)

    @property
    def int8_exact(self) -> bool:
        """fbgemm's u8 x s8 products are summed without saturation only with AVX-512 VNNI (`vpdpbusd`)."""
        return self.has("avx512_vnni")

    @property
    def fast_bf16(self) -> bool:
        """Native bf16 dot products (AVX-512 BF16 or AMX): bf16 matmuls are then faster than fp32 ones."""
        return self.has("avx512_bf16")

    def describe(self) -> str:
        capped = (
            f" (capped from {self.detected_level} by {', '.join(f'{k}={v}' for k, v in self.caps)})"
            if self.level != self.detected_level
            else ""
        )
        return f"{self.model_name or platform.machine()}: {self.level}{capped}"

    def as_dict(self) -> dict:
        """For benchmark result files: what the machine had and what the run used."""
        interesting = sorted(f for level in ISA_LEVELS for f in _LEVEL_FLAGS[level]) + ["avx_vnni", "avx_ne_convert"]
        return {
            "model_name": self.model_name,
            "level": self.level,
            "detected_level": self.detected_level,
            "caps": dict(self.caps),
            "flags": [f for f in interesting if f in self.flags],
        }


def _read_cpuinfo() -> tuple[set[str], str]:
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return set(), ""
    flags: set[str] = set()
    model = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and not flags:
            flags = set(value.split())
        elif key == "model name" and not model:
            model = value.strip()
    return flags, model


def _level_of(flags: set[str]) -> str:
    level = "scalar"
    for name in ISA_LEVELS[1:]:
        if not all(f in flags for f in _LEVEL_FLAGS[name]):
            break
        level = name
    return level


def _cap(name: str, value: str, table: dict[str, str]) -> str:
    key = value.strip().lower()
    if key not in table:
        raise ValueError(f"{name}={value!r} is not a known value; use one of {', '.join(sorted(table))}")
    return table[key]


def detect(flags: set[str], model_name: str = "", environ: dict[str, str] | None = None) -> CpuFeatures:
    """The features of a CPU with these /proc/cpuinfo `flags` under the caps in `environ` (default os.environ)."""
    environ = os.environ if environ is None else environ
    detected = _level_of(flags)
    caps: list[tuple[str, str]] = []
    allowed = len(ISA_LEVELS) - 1
    ours = environ.get("SPECGROVE_MAX_ISA")
    if ours:
        if ours.lower() not in ISA_LEVELS:
            raise ValueError(f"SPECGROVE_MAX_ISA={ours!r} is not a level; use one of {', '.join(ISA_LEVELS)}")
        allowed = min(allowed, ISA_LEVELS.index(ours.lower()))
        caps.append(("SPECGROVE_MAX_ISA", ours))
    for name, table in (("ONEDNN_MAX_CPU_ISA", _ONEDNN_CAPS), ("ATEN_CPU_CAPABILITY", _ATEN_CAPS)):
        value = environ.get(name)
        if value:
            allowed = min(allowed, ISA_LEVELS.index(_cap(name, value, table)))
            caps.append((name, value))
    level = ISA_LEVELS[min(ISA_LEVELS.index(detected), allowed)]
    kept: set[str] = set()
    for name in ISA_LEVELS[1 : ISA_LEVELS.index(level) + 1]:
        kept.update(_LEVEL_FLAGS[name])
    # Extensions outside the ladder (AVX-VNNI, AVX-NE-CONVERT) survive only an uncapped run: a capped
    # run stands for the plain machine of that level.
    if level == detected:
        kept.update(f for f in ("avx_vnni", "avx_ne_convert") if f in flags)
    return CpuFeatures(
        level=level, detected_level=detected, flags=frozenset(kept & flags), model_name=model_name, caps=tuple(caps)
    )


_CAP_VARIABLES = ("SPECGROVE_MAX_ISA", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def cpu_features() -> CpuFeatures:
    """This CPU's features after the caps in the environment (the CPU is read once per process; the caps
    are looked up on every call, so a test that sets one sees it)."""
    return _features(tuple(os.environ.get(name) for name in _CAP_VARIABLES))


@functools.cache
def _features(caps: tuple) -> CpuFeatures:
    flags, model = _read_cpuinfo()
    if not flags and platform.machine().lower() in ("x86_64", "amd64"):
        # No /proc/cpuinfo (not Linux): ATen's own detection is the best we have.
        aten = torch.backends.cpu.get_cpu_capability().lower()
        flags = set(_LEVEL_FLAGS["avx2"]) | (set(_LEVEL_FLAGS["avx512"]) if aten.startswith("avx512") else set())
    return detect(flags, model, {k: v for k, v in zip(_CAP_VARIABLES, caps) if v})


def isa_cap_env(level: str) -> dict[str, str]:
    """Environment variables that cap this project, oneDNN and ATen to `level` (for a capped test run)."""
    if level not in ISA_LEVELS:
        raise ValueError(f"unknown ISA level {level!r}; use one of {', '.join(ISA_LEVELS)}")
    onednn = {
        "scalar": "SSE41",
        "avx2": "AVX2",
        "avx512": "AVX512_CORE",
        "avx512_vnni": "AVX512_CORE_VNNI",
        "avx512_bf16": "AVX512_CORE_BF16",
        "amx": "DEFAULT",
    }[level]
    aten = {"scalar": "default", "avx2": "avx2"}.get(level, "avx512")
    return {"SPECGROVE_MAX_ISA": level, "ONEDNN_MAX_CPU_ISA": onednn, "ATEN_CPU_CAPABILITY": aten}
