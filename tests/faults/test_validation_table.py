"""Class 6 (issue 18): every number in one validation table (gmi_core.limits.NUMBERS) with its own range and a
message that says it: seeds (ComfyUI routes and the Build node alike), width=1e12, tau, the map threshold, the
A1111 build budget (4xx before a job starts)."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from gmi_core import limits
from gmi_core.errors import InvalidInput
from gmi_core.limits import NUMBERS, check_number
from tests.faults.harness import query, run_gmi
from tests.test_a1111_adapter import encoder_file, gmi, webui, world  # noqa: F401 - fixtures and helpers
from tests.test_a1111_faults import a1111_app, a1111_world  # noqa: F401 - fixtures
from tests.test_comfyui_nodes import build, env  # noqa: F401 - the fixture

torch.set_num_threads(1)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("width", 512, 512),
        ("width", "512", 512),
        ("width", 512.0, 512),
        ("seed", 0, 0),
        ("seed", 2**31 - 1, 2**31 - 1),
        ("seed", 100_001, 100_001),
        ("cfg", "7.5", 7.5),
        ("tau", 0.05, 0.05),
        ("threshold", 0, 0.0),
        ("max_prompts", 0, 0),
    ],
)
def test_validation_table_accepts_values_in_range(field, value, expected):
    assert check_number(field, value) == expected


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("width", 1e12, "between 64 and 4096 in steps of 8"),
        ("width", "1e12", "between 64 and 4096"),
        ("width", 100, "in steps of 8"),
        ("width", 512.5, "whole number"),
        ("seed", 2**31, "between 0 and 2147483647"),
        ("seed", -1, "between 0 and 2147483647"),
        ("tau", 1e-9, "between 0.001 and 100"),
        ("tau", float("nan"), "between 0.001 and 100"),
        ("gamma", float("inf"), "between 1e-06 and 1e+06"),
        ("threshold", float("nan"), "between 0 and 10"),
        ("steps", True, "whole number"),
        ("steps", "many", "whole number between 1 and 500"),
        ("cfg", None, "number between 0 and 100"),
    ],
)
def test_validation_table_refuses_with_the_range(field, value, says):
    with pytest.raises(InvalidInput) as info:
        check_number(field, value)
    assert str(info.value).startswith(f"{field} must be") and says in str(info.value), str(info.value)


def test_validation_table_every_limit_the_hosts_show_comes_from_it():
    from gmi_core.families import LIMITS
    from gmi_core.service import defaults_payload

    assert NUMBERS["seed"].high == limits.MAX_SEED == defaults_payload()["limits"]["seed"]["max"]
    for name, (low, high) in LIMITS.items():
        assert (NUMBERS[name].low, NUMBERS[name].high) == (low, high)


def test_validation_table_identify_refuses_a_degenerate_tau(core):
    with pytest.raises(InvalidInput, match="tau must be a number between"):
        core.gmi().identify([query()], prompt="x", source=core.source(), tau=1e-9)
    result = core.gmi().identify([query()], prompt="x", source=core.source(), tau=limits.MIN_TAU)
    assert all(math.isfinite(r.score) for r in result.ranking)  # the smallest allowed tau: finite scores


def test_validation_table_cli_tau_and_threshold(core, tmp_path):
    from gmi_core.encoders import save_encoder

    encoder = save_encoder(core.encoder, tmp_path / "enc.safetensors")
    image = tmp_path / "q.png"
    query().save(image)
    common = ("--models", core.models, "--home", core.home, "--encoder", encoder)
    out = run_gmi("identify", image, *common, "--prompt", "x", "--tau", "1e-9")
    assert out.returncode != 0 and "tau must be a number between 0.001 and 100" in out.stderr, out
    out = run_gmi("map", *common, "--threshold", "nan")
    assert out.returncode != 0 and "--threshold must be a number between 0 and 10" in out.stderr, out
    assert "NaN" not in out.stdout


def test_validation_table_comfyui_seed_is_the_build_nodes_range(env):  # noqa: F811
    from aiohttp.test_utils import TestClient, TestServer

    from tests.test_comfyui_faults import _client

    build(env)
    app = _client(env)
    base = "/gmi/status?encoder=tiny.safetensors&max_prompts=4&budget=allx2&family_settings=steps%3D3+width%3D64"

    async def scenario():
        async with TestClient(TestServer(app)) as client:
            for seed in (0, 100_001, 2**31 - 1):
                r = await client.get(f"{base}&seed={seed}")
                assert r.status == 200, (seed, await r.text())
            for seed, says in ((2**31, "between 0 and 2147483647"), ("1e40", "between 0"), (-5, "between 0")):
                r = await client.get(f"{base}&seed={seed}")
                assert r.status == 400 and says in (await r.json())["error"], (seed, await r.text())
            r = await client.get(f"{base}+height%3D1e12")
            assert r.status == 400 and "between 64 and 4096" in (await r.json())["error"], await r.text()

    asyncio.run(scenario())


@pytest.mark.parametrize("budget", ["abc", "0x0", "10x0", "x2", "99999999x1"])
def test_validation_table_a1111_malformed_budget_is_4xx_not_a_failed_job(a1111_app, budget):  # noqa: F811
    client, webui_world = a1111_app
    r = client.post("/gmi/v1/build", json={"budget": budget})
    assert r.status_code == 400 and "budget" in r.json()["detail"], r.text
    assert webui_world.process_calls == [] and client.get("/gmi/v1/build").status_code == 404  # no job at all
