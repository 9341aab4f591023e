"""Building and loading this project's C++ kernels, and choosing their instruction-set path.

Each kernel is one C++ file under `csrc/`, compiled on first use by torch's JIT extension builder (a C++17
compiler and ninja) into `$SPECGROVE_CACHE/kernels/<stem>-<hash>` (default `~/.cache/specgrove`), the hash
covering the source, the headers of `csrc/`, the flags and the torch and Python versions; an already built
library is loaded directly, without the compiler. `scripts/bootstrap.sh` builds them ahead of time (`build_all`).

The files are compiled for baseline x86-64; their AVX2 functions carry a GCC target attribute and run only
when `best_isa()` says so. `best_isa` follows `specgrove.cpu` (the CPU's flags, capped by
SPECGROVE_MAX_ISA / ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY), so a capped test run takes the scalar path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

ISA_SCALAR, ISA_AVX2 = 0, 1
ISA_NAMES = {ISA_SCALAR: "scalar", ISA_AVX2: "avx2"}

# -ffp-contract=off: the scalar and AVX2 paths must not differ by multiply-adds the compiler fuses.
# -fopenmp: at::parallel_for is a header template that runs serially without it.
_CFLAGS = ["-O3", "-std=c++17", "-ffp-contract=off", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]


def cache_root() -> Path:
    root = os.environ.get("SPECGROVE_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "specgrove"


def best_isa(max_level: int | None = None) -> int:
    """ISA_AVX2 where the CPU, after the caps in the environment (read on every call), has AVX2, FMA and F16C;
    else ISA_SCALAR. `max_level` caps it further."""
    from specgrove.cpu import cpu_features

    level = ISA_AVX2 if cpu_features().has("avx2") else ISA_SCALAR
    return level if max_level is None else min(level, int(max_level))


def check_isa(isa: int | None) -> int:
    """`isa` (None: the best) as a level this machine may run; ValueError otherwise."""
    best = best_isa()
    level = best if isa is None else int(isa)
    if level not in ISA_NAMES:
        raise ValueError(f"isa must be one of {ISA_NAMES}, got {isa}")
    if level > best:
        raise ValueError(f"isa={ISA_NAMES[level]} is not available here (best: {ISA_NAMES[best]})")
    return level


class CppExtension:
    """One C++ file of `csrc/` as a lazily built, cached Python extension module."""

    def __init__(self, stem: str, source: str):
        self.stem = stem
        self.source = Path(__file__).with_name("csrc") / source
        self._lock = threading.Lock()
        self._module: ModuleType | None = None

    def build_key(self) -> str:
        h = hashlib.sha256(self.source.read_bytes())
        for header in sorted(self.source.parent.glob("*.h")):  # the shared headers a source may include
            h.update(header.name.encode() + header.read_bytes())
        h.update(repr((_CFLAGS, _LDFLAGS, torch.__version__, sys.version_info[:2], platform.machine())).encode())
        return h.hexdigest()[:16]

    def build_directory(self) -> Path:
        return cache_root() / "kernels" / f"{self.stem}-{self.build_key()}"

    def reset(self) -> None:
        """Forget the loaded module (as in a fresh process); for tests."""
        self._module = None

    def _load_built(self, name: str, directory: Path) -> ModuleType | None:
        """The library already built in `directory`, or None (also while a build holds torch's lock file)."""
        library = directory / f"{name}.so"
        if not library.is_file() or (directory / "lock").exists():
            return None
        spec = importlib.util.spec_from_file_location(name, library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    def load(self) -> ModuleType:
        """The compiled module, built once per source version and then reused. RuntimeError naming the missing
        tool (C++ compiler, ninja) or carrying the compiler's output."""
        with self._lock:
            if self._module is not None:
                return self._module
            name = f"specgrove_{self.stem}_{self.build_key()}"
            directory = self.build_directory()
            self._module = self._load_built(name, directory)
            if self._module is not None:
                return self._module
            from torch.utils import cpp_extension

            missing = []
            cxx = os.environ.get("CXX", "c++")
            if shutil.which(cxx) is None:
                missing.append(f"a C++17 compiler ({cxx!r} not on PATH; set CXX or install g++)")
            if not cpp_extension.is_ninja_available():
                missing.append("ninja (pip install ninja, or apt-get install ninja-build)")
            if missing:
                raise RuntimeError(f"cannot build the {self.stem} kernels: missing " + "; ".join(missing))
            directory.mkdir(parents=True, exist_ok=True)
            try:
                self._module = cpp_extension.load(
                    name=name,
                    sources=[str(self.source)],
                    extra_cflags=_CFLAGS,
                    extra_ldflags=_LDFLAGS,
                    build_directory=str(directory),
                    verbose=False,
                )
            except Exception as e:  # torch raises RuntimeError / CalledProcessError with the compiler output
                raise RuntimeError(f"building the {self.stem} kernels in {directory} failed: {e}") from e
            return self._module


GGML = CppExtension("ggml", "ggml_matmul.cpp")
ATTENTION = CppExtension("attention", "attention.cpp")
LAYER_OPS = CppExtension("layer_ops", "layer_ops.cpp")
EXTENSIONS = (GGML, ATTENTION, LAYER_OPS)


def build_all() -> list[Path]:
    """Build (or find built) every kernel; what the set-up script runs."""
    for extension in EXTENSIONS:
        extension.load()
    return [extension.build_directory() for extension in EXTENSIONS]


if __name__ == "__main__":
    for path in build_all():
        print(f"[specgrove] kernels ready in {path}", file=sys.stderr)
