"""Model versions: each one a complete mlx-lm model folder, switched atomically.

Layout under ``root`` (``Paths.versions``, i.e. ``data/models/versions``)::

    base/                 config.json, model.safetensors, tokenizer files, version.json
    night-2026-11-21/     the same, for the model after that night's adapter was fused
    active.json           {"name": "night-2026-11-21", "previous": "base", "activated_at": ...}
    .staging-<name>-xxxx/ a version being written (ignored, removed by prune)

Every version folder loads with ``mlx_lm.load(folder)``. A version exists only once its
folder has been renamed from a ``.staging-*`` folder to its name, which happens after all of
its files, ``version.json`` last, are written and synced: ``os.rename`` within one directory
is atomic on POSIX, so a crash while training, fusing or saving leaves at worst a hidden
staging folder and never a half-written version. The active version is named by
``active.json``, replaced atomically (temporary file + ``os.replace``); a JSON pointer rather
than a symlink because it also records the previous version and the time, and works on every
filesystem. The active model folder itself is never written to.

Weights are saved as float32 (fusing into a quantized base and re-quantizing would erase the
small LoRA updates: FINDINGS, "Fusing").

``version.json`` records the sha256 of every file of the version (``files``), computed from
the synced staging folder right before the rename: :meth:`Versions.verify` checks a version
against it (``reverie models list --verify``), so a version that was half-written or changed
afterwards is told apart from the one that was committed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from reverie.runtime import blas  # noqa: F401  (OpenBLAS before mlx)

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

VERSION_FILE = "version.json"
ACTIVE_FILE = "active.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class UnknownVersion(KeyError, ValueError):
    """No complete version of that name; the message lists the known ones. Both a
    ``KeyError`` and a ``ValueError``, so either ``except`` catches it."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


# --------------------------------------------------------------------------- model folders

from reverie.files import atomic_write_json, fsync_dir  # noqa: E402
from reverie.runtime.folders import (  # noqa: E402  (re-exported: versions are model folders)
    _dequantized_weight, save_model_dir)


def _fuse_lora_linear(layer, dtype) -> nn.Linear:
    """``LoRALinear.fuse(dequantize=True)`` computed in float32: mlx-lm's dequantizes with
    the scales' dtype (float16 for GGUF) and adds the update in that dtype."""
    linear = layer.linear
    if isinstance(linear, nn.QuantizedLinear):
        weight = _dequantized_weight(linear, mx.float32)
    else:
        weight = linear.weight.astype(mx.float32)
    delta = (layer.scale * layer.lora_b.astype(mx.float32).T) @ layer.lora_a.astype(mx.float32).T
    output_dims, input_dims = weight.shape
    bias = "bias" in linear
    fused = nn.Linear(input_dims, output_dims, bias=bias)
    fused.weight = (weight + delta).astype(dtype)
    if bias:
        fused.bias = linear.bias.astype(dtype)
    return fused


def fuse(model: nn.Module, dtype=mx.float32) -> nn.Module:
    """Merge every LoRA layer into its base weight, in place: ``W + scale * (A B)^T``.

    ``LoRALinear`` layers become float ``nn.Linear`` (``dtype``, float32 by default; the sum
    is done in float32, quantized bases dequantized with float32 scales), never re-quantized:
    a re-quantized merge loses small updates (FINDINGS). Other fusable modules (DoRA,
    switch layers) use their own ``fuse(dequantize=True)`` as ``mlx_lm/fuse.py`` does.
    Layers without adapters are left as they are. Returns the model, evaluated.
    """
    from mlx_lm.tuner.lora import LoRALinear

    fused = []
    for name, module in model.named_modules():
        if type(module) is LoRALinear:
            fused.append((name, _fuse_lora_linear(module, dtype)))
        elif hasattr(module, "fuse"):
            fused.append((name, module.fuse(dequantize=True)))
    if fused:
        model.update_modules(tree_unflatten(fused))
    mx.eval(model.parameters())
    return model


# --------------------------------------------------------------------------- versions


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class Versions:
    """The model versions under ``root`` (see the module docstring for the layout).

    Typical night::

        versions = Versions(paths.versions)
        staging = versions.stage("night-7")
        try:
            save_model_dir(fuse(model), tokenizer, staging)
            ... validate the staged model ...
            versions.commit(staging, "night-7", parent="night-6", info={...})
        except BaseException:
            versions.discard(staging); raise
        versions.activate("night-7"); versions.prune(keep=5)

    (:meth:`save_model` does stage, save and commit in one call.)
    """

    def __init__(self, root: Path):
        self.root = Path(root)

    # ---- reading

    def _read(self, folder: Path) -> dict | None:
        """version.json of a complete version folder, else None."""
        if folder.name.startswith(".") or not folder.is_dir():
            return None
        try:
            info = json.loads((folder / VERSION_FILE).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(info, dict) or info.get("name") != folder.name:
            return None
        return info

    def _all(self) -> dict[str, dict]:
        if not self.root.is_dir():
            return {}
        found = {}
        for folder in self.root.iterdir():
            info = self._read(folder)
            if info is not None:
                found[folder.name] = info
        return found

    def names(self) -> list[str]:
        """Names of the complete versions, in :meth:`list` order."""
        return [v["name"] for v in self.list()]

    def _unknown(self, name: str) -> UnknownVersion:
        known = ", ".join(self.names()) or "none"
        return UnknownVersion(f"unknown model version {name!r} (known: {known})")

    def path(self, name: str) -> Path:
        """The folder of complete version ``name`` (loadable with ``mlx_lm.load``).

        Raises:
            UnknownVersion: no complete version of that name.
        """
        folder = self.root / name
        if not _NAME.match(name) or self._read(folder) is None:
            raise self._unknown(name)
        return folder

    def info(self, name: str) -> dict:
        """The version's ``version.json`` (UnknownVersion if there is none)."""
        return dict(self._read(self.path(name)))

    def active(self) -> str | None:
        """Name of the active version, or None if none was activated."""
        try:
            data = json.loads((self.root / ACTIVE_FILE).read_text())
        except (OSError, ValueError):
            return None
        name = data.get("name") if isinstance(data, dict) else None
        return name if isinstance(name, str) else None

    def list(self) -> list[dict]:
        """Every complete version, parents before children (base first; siblings by
        creation time), each its ``version.json`` plus ``"active"`` (bool) and ``"path"``.
        Staging folders and folders without a valid ``version.json`` are ignored."""
        versions = self._all()
        active = self.active()
        children: dict[str | None, list[str]] = {}
        for name, info in versions.items():
            parent = info.get("parent")
            children.setdefault(parent if parent in versions else None, []).append(name)
        for kids in children.values():
            kids.sort(key=lambda n: (versions[n].get("created_at", ""), n))
        ordered: list[str] = []
        stack = list(reversed(children.get(None, [])))
        while stack:
            name = stack.pop()
            ordered.append(name)
            stack.extend(reversed(children.get(name, [])))
        return [{**versions[n], "active": n == active, "path": str(self.root / n)}
                for n in ordered]

    def verify(self, name: str) -> list[str]:
        """Check version ``name``'s files against the sha256 digests its ``version.json``
        recorded at commit time. Returns the problems (a missing, changed or unrecorded
        file, or no digests recorded: a version committed before they were), ``[]`` when
        every file is the one committed. Reads every file (a 135M-parameter float32 model:
        about 0.5 GB, a second or two). Raises UnknownVersion."""
        folder = self.path(name)
        recorded = self._read(folder).get("files")
        if not isinstance(recorded, dict) or not recorded:
            return [f"{name}: no checksums recorded (committed before they were)"]
        found = _checksums(folder)
        problems = [f"{name}/{f}: missing" for f in sorted(set(recorded) - set(found))]
        problems += [f"{name}/{f}: sha256 {found[f][:12]} differs from the recorded "
                     f"{recorded[f][:12]}" for f in sorted(set(recorded) & set(found))
                     if found[f] != recorded[f]]
        problems += [f"{name}/{f}: not part of the committed version"
                     for f in sorted(set(found) - set(recorded))]
        return problems

    def lineage(self, name: str) -> list[str]:
        """``[root, ..., name]``: the chain of versions ``name`` descends from, e.g.
        ``["base", "night-1", "night-2"]``, recorded at commit time (so it survives
        pruning of intermediate versions). Raises UnknownVersion."""
        return list(self.info(name).get("lineage") or [name])

    # ---- writing

    def stage(self, name: str) -> Path:
        """A new empty hidden folder ``root/.staging-<name>-xxxx`` to write a version into
        (then :meth:`commit` or :meth:`discard` it). Raises ValueError for a bad name."""
        self._check_name(name)
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".staging-{name}-", dir=self.root))

    def discard(self, staging: Path) -> None:
        """Remove a staging folder (after a failure); ignores a missing one."""
        staging = Path(staging)
        if staging.name.startswith(".staging-") and staging.parent == self.root:
            shutil.rmtree(staging, ignore_errors=True)

    def _check_name(self, name: str) -> None:
        if not isinstance(name, str) or not _NAME.match(name) or name.endswith(".json"):
            raise ValueError(f"bad version name {name!r}: letters, digits, '.', '_', '-'")

    def commit(self, staging: Path, name: str, parent: str | None,
               info: dict | None = None) -> Path:
        """Turn a staged folder into version ``name``, atomically.

        Syncs every file, then writes ``version.json`` (``name``, ``parent``, ``lineage``,
        ``created_at``, ``night_id``, ``adapter``, ``metrics``, any other keys of ``info``,
        and ``files``: each file's path relative to the folder -> its sha256 hex digest)
        into the staging folder, then renames the folder to ``root/name`` in one
        ``os.rename``. Does not activate it.

        Args:
            staging: a folder from :meth:`stage` holding a model (:func:`save_model_dir`).
            name: the version's name (``base``, ``night-<night_id>``, ...).
            parent: the version it was trained from (None for a base).
            info: ``night_id``, ``adapter`` (path), ``metrics`` (dict) and any extra keys.

        Returns:
            The version's folder.

        Raises:
            ValueError: bad name, or the staging folder is not one of this root's or holds
                no ``config.json``; FileExistsError: the version exists;
            UnknownVersion: ``parent`` is not a complete version.
        """
        self._check_name(name)
        staging = Path(staging)
        if staging.parent.resolve() != self.root.resolve() \
                or not staging.name.startswith(".staging-") or not staging.is_dir():
            raise ValueError(f"{staging} is not a staging folder of {self.root}")
        if not (staging / "config.json").is_file():
            raise ValueError(f"{staging} holds no model (config.json missing)")
        final = self.root / name
        if final.exists():
            raise FileExistsError(f"model version {name!r} already exists")
        lineage = (self.lineage(parent) if parent is not None else []) + [name]
        info = dict(info or {})
        record = {
            "name": name,
            "parent": parent,
            "lineage": lineage,
            "created_at": _now(),
            "night_id": info.pop("night_id", None),
            "adapter": str(info["adapter"]) if info.get("adapter") is not None else None,
            "metrics": info.pop("metrics", {}) or {},
        }
        info.pop("adapter", None)
        record.update({k: v for k, v in info.items() if k not in record})
        for file in staging.rglob("*"):
            if file.is_file():
                fsync_dir(file)
        record["files"] = _checksums(staging)  # after the sync: what is on disk is recorded
        atomic_write_json(staging / VERSION_FILE, record)
        os.rename(staging, final)
        fsync_dir(self.root)
        return final

    def save_model(self, name: str, model: nn.Module, tokenizer, parent: str | None = None,
                   info: dict | None = None, activate: bool = False) -> Path:
        """Stage, :func:`save_model_dir` and :meth:`commit` in one call; on any error the
        staging folder is removed and nothing else changes. Optionally :meth:`activate`.

        Turning the GGUF-loaded default model into the first version::

            model, tok = load_gguf(gguf_path, quantized=False)
            Versions(paths.versions).save_model("base", model, tok, activate=True)
        """
        staging = self.stage(name)
        try:
            save_model_dir(model, tokenizer, staging)
            folder = self.commit(staging, name, parent, info)
        except BaseException:
            self.discard(staging)
            raise
        if activate:
            self.activate(name)
        return folder

    def load(self, name: str | None = None):
        """``mlx_lm.load`` of version ``name`` (the active one by default): ``(model,
        tokenizer)``. Raises UnknownVersion (or LookupError when nothing is active)."""
        import mlx_lm

        if name is None:
            name = self.active()
            if name is None:
                raise LookupError(f"no active model version in {self.root}")
        return mlx_lm.load(str(self.path(name)))

    def activate(self, name: str) -> None:
        """Make ``name`` the active version: ``active.json`` is replaced atomically (readers
        see the old or the new name, never a torn file). Raises UnknownVersion."""
        self.path(name)
        atomic_write_json(self.root / ACTIVE_FILE,
                           {"name": name, "previous": self.active(), "activated_at": _now()})

    def rollback(self, to: str | None = None) -> str:
        """Activate an earlier version and return its name.

        Args:
            to: the version to activate; by default the active version's parent (its nearest
                ancestor still on disk when the parent was pruned). The rolled-back version
                stays on disk (``rollback night-3`` can go forward again).

        Raises:
            UnknownVersion: ``to`` is not a complete version.
            ValueError: ``to`` is None and nothing is active or the active version has no
                ancestor left.
        """
        if to is not None:
            self.activate(to)
            return to
        current = self.active()
        if current is None:
            raise ValueError(f"no active model version in {self.root} to roll back from")
        known = self._all()
        ancestors = [n for n in self.lineage(current)[:-1] if n in known]
        if not ancestors:
            raise ValueError(f"version {current!r} has no earlier version to roll back to")
        self.activate(ancestors[-1])
        return ancestors[-1]

    def prune(self, keep: int) -> list[str]:
        """Remove old versions: keep the ``keep`` most recent (by creation time), plus always
        the active version and every root version (``base``, no parent). Also removes
        leftover staging folders and folders without a complete ``version.json`` (do not
        prune while another process is staging a version). Each folder is first renamed to
        a hidden name and then deleted, so a crash mid-delete leaves no visible half version.

        Returns:
            The names of the removed versions. Raises ValueError if ``keep < 0``.
        """
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        if not self.root.is_dir():
            return []
        versions = self._all()
        active = self.active()
        newest = sorted(versions, key=lambda n: (versions[n].get("created_at", ""), n),
                        reverse=True)
        protected = {n for n, v in versions.items() if v.get("parent") is None}
        protected |= {active} if active else set()
        protected |= set([n for n in newest if n not in protected][:keep])
        removed = []
        for folder in sorted(self.root.iterdir()):
            if not folder.is_dir():
                continue
            name = folder.name
            if name in versions and name in protected:
                continue
            if name.startswith(".trash-") or name.startswith(".staging-") \
                    or name.startswith(".tmp-"):
                shutil.rmtree(folder, ignore_errors=True)
                continue
            if name.startswith("."):
                continue
            trash = Path(tempfile.mkdtemp(prefix=f".trash-{name}-", dir=self.root))
            os.rename(folder, trash / name)
            shutil.rmtree(trash, ignore_errors=True)
            if name in versions:
                removed.append(name)
        return removed


def _checksums(folder: Path) -> dict[str, str]:
    """``{relative path: sha256 hex}`` of every file in ``folder`` but ``version.json``."""
    out = {}
    for file in sorted(Path(folder).rglob("*")):
        rel = file.relative_to(folder).as_posix()
        if file.is_file() and rel != VERSION_FILE:
            h = hashlib.sha256()
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            out[rel] = h.hexdigest()
    return out


def learned_folders(settings) -> dict[str, Path]:
    """What to hand :class:`~reverie.runtime.models.Runtime`: ``{forge.model: folder}`` of
    the version the forge promoted, or ``{}`` while the base model is active (a
    :class:`reverie.config.Settings` in; the runtime then loads the configured sources)."""
    versions = Versions(settings.paths.versions)
    active = versions.active()
    if not active or active == "base":
        return {}
    return {settings.forge.model: versions.path(active)}
