"""benchmarks/bench_nights.py's scoring and question selection (the nights themselves are a
benchmark, not a test). The LoCoMo part is skipped when the file (not shipped) is absent."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_nights  # noqa: E402


def test_f1_is_locomos_token_f1():
    assert bench_nights.f1("19 January, 2023", "19 January 2023") == 1.0
    assert bench_nights.f1("He lost it on 19 January 2023", "19 January, 2023") == pytest.approx(0.6)
    assert bench_nights.f1("The dance studio", "a dance studio") == 1.0   # articles dropped
    assert bench_nights.f1("no idea", "dancing") == 0.0 and bench_nights.f1("", "x") == 0.0


@pytest.mark.skipif(not bench_nights.LOCOMO.exists(), reason="LoCoMo file absent")
def test_questions_have_their_evidence_in_the_slept_sessions():
    items = bench_nights.questions(bench_nights.LOCOMO, "jon", [1, 2, 3])
    assert items and all(q["category"] in (2, 4) and "jon" in q["question"].lower() for q in items)
    assert all(set(q["sessions"]) <= {1, 2, 3} and q["transcript"] for q in items)
    assert len(bench_nights.questions(bench_nights.LOCOMO, "jon", [1, 2, 3, 4, 5, 6])) > len(items)
