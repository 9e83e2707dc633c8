"""Class 2 (issue 18): names resolve exactly (gmi_core.names, the one resolver): a title, a file name, a sha256 or
a unique sha256 prefix of >= 10 hex digits; never a substring; ambiguous or non-string input is a 4xx listing the
candidates. Through the resolver itself and the A1111 switch and build routes (fake WebUI)."""

from __future__ import annotations

import pytest

from gmi_core.errors import CheckpointError, InvalidInput
from gmi_core.names import Named, resolve
from gmi_core.service import http_status
from tests.test_a1111_adapter import encoder_file, gmi, webui, world  # noqa: F401 - fixtures and helpers
from tests.test_a1111_faults import a1111_app, a1111_world  # noqa: F401 - fixtures

SHA = {"a": "ab12cd34ef" + "0" * 54, "b": "ab12cd34ee" + "1" * 54, "c": "ff" * 32}
CANDIDATES = [
    Named("A", "sub/wuerstchen.safetensors", "wuerstchen.safetensors [ab12cd34ef]", SHA["a"]),
    Named("B", "model_1.safetensors", "model_1.safetensors [ab12cd34ee]", SHA["b"]),
    Named("C", "model_11.safetensors", "model_11.safetensors [ffffffffff]", SHA["c"]),
]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("model_1.safetensors", "B"),
        ("model_1", "B"),  # the stem, as the WebUI's model_name
        ("model_1.safetensors [ab12cd34ee]", "B"),
        ("sub/wuerstchen.safetensors", "A"),
        ("wuerstchen.safetensors", "A"),
        (SHA["c"], "C"),
        (SHA["c"].upper(), "C"),
        ("ab12cd34ef", "A"),  # a unique 10-hex prefix (the WebUI's short hash)
        ("  model_11.safetensors ", "C"),
    ],
)
def test_exact_names_resolve_a_name_exactly(query, expected):
    assert resolve(query, CANDIDATES) == expected


@pytest.mark.parametrize("query", ["1", "wu", "model", "odel_1", "ab12cd34", "ffffffff", "model_1.safe", "sub"])
def test_exact_names_never_by_substring_or_a_short_hash(query):
    with pytest.raises(CheckpointError) as info:
        resolve(query, CANDIDATES)
    assert http_status(info.value) == 404 and "model_1.safetensors [ab12cd34ee]" in str(info.value)  # candidates


def test_exact_names_ambiguous_prefix_lists_the_candidates():
    with pytest.raises(InvalidInput) as info:
        resolve(
            "ab12cd34ef0", [*CANDIDATES, Named("D", "d.safetensors", "d.safetensors [ab12cd34ef]", SHA["a"][:-1] + "9")]
        )
    assert http_status(info.value) == 400 and "2 checkpoints" in str(info.value)
    assert "wuerstchen.safetensors [ab12cd34ef]" in str(info.value) and "d.safetensors [ab12cd34ef]" in str(info.value)


@pytest.mark.parametrize("query", ["", "   "])
def test_exact_names_blank_is_not_found(query):
    with pytest.raises(CheckpointError):
        resolve(query, CANDIDATES)


def test_exact_names_a_title_with_a_stale_hash_is_its_name_exactly():
    assert resolve("model_1.safetensors [0000000000]", CANDIDATES) == "B"
    with pytest.raises(CheckpointError):
        resolve("model [ab12cd34ee]", CANDIDATES)  # the name part must still be exact


def test_exact_names_one_file_under_two_names_is_not_ambiguous():
    copy = Named("A2", "copy_of_wuerstchen.safetensors", "", SHA["a"])
    assert resolve(SHA["a"][:12], [*CANDIDATES, copy]) == "A"


@pytest.mark.parametrize("query", [1, 1.5, None, ["model_1"], {"name": "model_1"}, "x" * 20000])
def test_exact_names_non_strings_are_refused(query):
    with pytest.raises(InvalidInput):
        resolve(query, CANDIDATES)


@pytest.mark.parametrize(
    "body",
    [
        {"checkpoint": "1"},
        {"checkpoint": "model"},
        {"checkpoint": "odel_1"},
        {"checkpoint": 1},
        {"checkpoint": ["model_1.safetensors"]},
    ],
    ids=str,
)
def test_exact_names_a1111_switch_refuses_what_is_not_exact(a1111_app, body):  # noqa: F811
    client, webui_world = a1111_app
    loaded = list(webui_world.reloads)
    r = client.post("/gmi/v1/switch", json=body)
    assert 400 <= r.status_code < 500, r.text
    assert webui_world.reloads == loaded  # no wrong switch


@pytest.mark.parametrize(
    "body",
    [{"checkpoints": [1, 2]}, {"checkpoints": ["1"]}, {"checkpoints": "model"}, {"checkpoints": [["model_1"]]}],
    ids=str,
)
def test_exact_names_a1111_build_refuses_what_is_not_exact(a1111_app, body):  # noqa: F811
    client, webui_world = a1111_app
    r = client.post("/gmi/v1/build", json=body)
    assert 400 <= r.status_code < 500, r.text
    assert webui_world.process_calls == []  # nothing rendered


def test_exact_names_a1111_switch_and_build_by_hash(a1111_app):  # noqa: F811
    client, _ = a1111_app
    specs = client.get("/gmi/v1/specs").json()
    while specs["encoder_state"] == "loading":
        specs = client.get("/gmi/v1/specs").json()
    row = next(c for c in specs["checkpoints"] if c["name"] == "model_1.safetensors")
    r = client.post("/gmi/v1/switch", json={"checkpoint": row["sha256"][:10]})
    assert r.status_code == 200 and r.json()["name"] == "model_1.safetensors", r.text
    r = client.post("/gmi/v1/build", json={"checkpoints": [row["sha256"]], "wait": True})
    assert r.status_code == 200 and r.json()["state"] == "done", r.text
    assert r.json()["which"] == ["model_1.safetensors"] and r.json()["report"]["built"] == ["model_1.safetensors"]
