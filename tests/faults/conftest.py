"""The fault suite's fixture: a small built core (three fake checkpoints, their specs)."""

import pytest

from tests.faults.harness import PaintingGenerator, World


@pytest.fixture
def core(tmp_path) -> World:
    w = World(tmp_path)
    report = w.gmi().build(w.source(), PaintingGenerator())
    assert sorted(report.built) == ["m0.safetensors", "m1.safetensors", "m2.safetensors"] and not report.failed
    return w
