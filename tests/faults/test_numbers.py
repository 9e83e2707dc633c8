"""Numbers validated in one place; JSON never NaN.

Moved from tests/test_faults.py (issue 11's fault suite, split by class in issue 19); each test name still
starts with its class."""

from __future__ import annotations

import json

import pytest
import torch

from gmi_core import limits
from gmi_core.engine import Gmi
from gmi_core.errors import InvalidInput
from gmi_core.protocols import GenerationSettings
from tests.faults.harness import (
    SETTINGS,
    World,
    query,
)

torch.set_num_threads(1)

# ===================================================================================================================
# Faults: numbers validated in one place; JSON never NaN
# ===================================================================================================================
BAD_NUMBERS = [
    ("top_k", 0),
    ("top_k", -3),
    ("top_k", "abc"),
    ("top_k", 1.5),
    ("top_k", True),
    ("gamma", float("nan")),
    ("gamma", float("inf")),
    ("gamma", 0),
    ("gamma", -1.0),
    ("gamma", "x"),
    ("tau", float("nan")),
    ("tau", float("-inf")),
    ("tau", 0.0),
]


@pytest.mark.parametrize(("field", "value"), BAD_NUMBERS)
def test_faults_numbers_identify_refuses_bad_values(core, field, value):
    with pytest.raises(InvalidInput):
        core.gmi().identify([query()], prompt="x", source=core.source(), **{field: value})


BAD_SETTINGS = [
    {"steps": 0},
    {"steps": -1},
    {"steps": 10**6},
    {"width": 65},
    {"width": 32},
    {"height": 8192},
    {"width": 0},
    {"cfg": float("nan")},
    {"cfg": float("inf")},
    {"cfg": -1.0},
    {"sampler": ""},
    {"negative_prompt": "x" * 5000},
]


@pytest.mark.parametrize("bad", BAD_SETTINGS, ids=lambda d: "-".join(f"{k}={str(v)[:8]}" for k, v in d.items()))
def test_faults_numbers_build_settings_refused_before_anything_runs(tmp_path, bad):
    w = World(tmp_path)
    with pytest.raises(InvalidInput):
        Gmi(w.home / "specs", w.encoder, w.prompts, "allx2", GenerationSettings(**{**SETTINGS.to_dict(), **bad}))
    with pytest.raises(InvalidInput):
        Gmi(w.home / "specs", w.encoder, w.prompts, "allx0", SETTINGS)
    with pytest.raises(InvalidInput, match="unknown sampler"):
        limits.check_settings(GenerationSettings(sampler="warp"), samplers=["euler"], schedulers=["normal"])


def test_faults_numbers_json_never_holds_nan(core):
    result = core.gmi().identify([query()], prompt="x", source=core.source())
    result.ranking[0].score = float("nan")
    result.ranking[1].score = float("inf")
    text = json.dumps(result.to_dict(), allow_nan=False)
    assert json.loads(text)["ranking"][0]["score"] is None
    assert limits.json_safe({"a": [float("nan"), 1.0, {"b": float("-inf")}]}) == {"a": [None, 1.0, {"b": None}]}
