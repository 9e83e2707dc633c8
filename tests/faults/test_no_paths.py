"""Class 5 (issue 18): no server path in any message. Messages are built from relative names in the first place
(spec files as ``<sha256>/<file>``, weights and folders by their last components), so a models folder whose path
has spaces and non-ASCII letters (which the old regex redaction cut at the first space) never shows up."""

from __future__ import annotations

import pytest
import torch

from gmi_core.encoders import load_encoder
from gmi_core.errors import EncoderUnavailable, GmiError
from gmi_core.paths import one_line, shown
from gmi_core.spec import Spec
from tests.faults.harness import PaintingGenerator, World, query
from tests.test_a1111_adapter import b64png, encoder_file, gmi, webui, world  # noqa: F401 - fixtures and helpers
from tests.test_a1111_faults import a1111_app, a1111_world  # noqa: F401 - fixtures

torch.set_num_threads(1)
ROOT_NAME = "Program Files/ComfyUI Ü/my models"  # spaces and a non-ASCII letter, as on Windows installs


@pytest.fixture
def spaced(tmp_path) -> World:
    w = World(tmp_path / ROOT_NAME)
    w.gmi().build(w.source(), PaintingGenerator())
    return w


def _no_path(text: str, place: World) -> bool:
    """No absolute path, nor its leading part (a folder name relative to a model folder may show)."""
    return str(place.root) not in text and "Program Files" not in text and "/tmp" not in text


def test_no_paths_corrupt_spec_in_status_and_identify(spaced):
    path = spaced.spec_path("m1.safetensors")
    path.write_bytes(path.read_bytes()[:300])  # truncated
    statuses = {s.name: s for s in spaced.gmi().status(spaced.source())[0]}
    assert statuses["m1.safetensors"].state == "corrupt" and _no_path(statuses["m1.safetensors"].detail, spaced)
    result = spaced.gmi().identify([query()], prompt="x", source=spaced.source())
    text = str(result.to_dict()["excluded"])
    assert "m1.safetensors" in text and _no_path(text, spaced), text


@pytest.mark.parametrize("damage", ["truncated", "not_safetensors", "checksum"])
def test_no_paths_spec_errors_name_the_spec_by_its_relative_file(spaced, damage):
    path = spaced.spec_path("m0.safetensors")
    data = path.read_bytes()
    path.write_bytes(
        {"truncated": data[:100], "not_safetensors": b"hello", "checksum": data[:-4] + b"\0\0\0\0"}[damage]
    )
    with pytest.raises(GmiError) as info:
        Spec.load(path)
    message = one_line(info.value)
    assert shown(path) in message and _no_path(message, spaced), message


def test_no_paths_encoder_errors(spaced, tmp_path):
    clip = spaced.root / "clip"
    clip.mkdir()
    (clip / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    for name, kwargs in (
        ("ViT-B-32", {"search_dirs": [clip], "own_dirs": [spaced.root / "gmi" / "clip"], "download_dir": clip}),
        (str(clip / "broken.safetensors"), {}),
    ):
        with pytest.raises(EncoderUnavailable) as info:
            load_encoder(name, **kwargs)
        assert _no_path(one_line(info.value), spaced), one_line(info.value)


def test_no_paths_a1111_excluded_reason_and_switch_error(a1111_app):  # noqa: F811
    client, webui_world = a1111_app
    r = client.post("/gmi/v1/build", json={"checkpoints": "all", "wait": True})
    assert r.status_code == 200 and r.json()["state"] == "done", r.text
    spec_files = sorted((webui_world.models_path / "gmi" / "specs").rglob("*.safetensors"))
    spec_files[0].write_bytes(spec_files[0].read_bytes()[:200])
    info = next(i for i in webui_world.sd_models.checkpoints_list.values() if i.name == "model_1.safetensors")
    image = webui_world.render(info.filename, "a lighthouse", 5, 64, 64)
    r = client.post("/gmi/v1/identify", json={"image": b64png(image)})
    assert r.status_code == 200, r.text
    excluded = r.json()["excluded"]
    assert excluded and all(str(webui_world.root) not in e["reason"] for e in excluded), excluded
    assert str(webui_world.root) not in client.get("/gmi/v1/specs").text
