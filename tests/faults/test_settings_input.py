"""Class 7 (issue 18): settings are input too. A1111 settings that name files or folders (gmi_encoder,
gmi_spec_dir; /sdapi/v1/options can set them) are confined to the WebUI's models and data folders like request
parameters (runtime.setting_path); a bad one gets a clear message in the API and the tab, and nothing is read or
written outside."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.faults.harness import no_server_path
from tests.test_a1111_adapter import encoder_file, gmi, webui, world  # noqa: F401 - fixtures and helpers
from tests.test_a1111_faults import a1111_app, a1111_world  # noqa: F401 - fixtures

torch.set_num_threads(1)


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("gmi_encoder", "/etc/passwd", "CLIP encoder (an absolute path) is outside"),
        ("gmi_encoder", "../../../../../../etc/hostname", "is outside the WebUI's models and data folders"),
        ("gmi_encoder", "gmi/clip/missing.safetensors", "is not a file"),
        ("gmi_spec_dir", "../../../../../../..", "Spec folder '../../../../../../..' is outside"),
        ("gmi_spec_dir", "/", "Spec folder (an absolute path) is outside"),
    ],
)
def test_settings_input_files_and_folders_are_confined(a1111_app, key, value, says):  # noqa: F811
    client, webui_world = a1111_app
    outside = (webui_world.models_path / value).resolve() if not value.startswith("/") else None
    webui_world.shared.opts.set(key, value)
    r = client.get("/gmi/v1/specs")
    assert 400 <= r.status_code < 500 and says in r.json()["detail"], r.text
    assert no_server_path(r.text, webui_world.root)
    r = client.post("/gmi/v1/build", json={"wait": True})
    assert 400 <= r.status_code < 500 and webui_world.process_calls == [], r.text
    if key == "gmi_spec_dir":
        assert not (outside or Path(value)).joinpath("cache").exists()  # nothing written


def test_settings_input_a_bad_setting_is_a_clear_message_in_the_tab(a1111_world, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "gradio", type(sys)("gradio"))  # ui.py imports it; status_rows uses none of it
    a1111_world.shared.opts.set("gmi_spec_dir", "/")
    rows, _, _, note = gmi("ui").status_rows()
    assert rows == [] and "Spec folder (an absolute path) is outside" in note


def test_settings_input_folders_inside_are_accepted(a1111_app):  # noqa: F811
    client, webui_world = a1111_app
    elsewhere = webui_world.models_path / "gmi_elsewhere"
    (elsewhere / "prompt_sets").mkdir(parents=True)
    prompts = webui_world.models_path / "gmi" / "prompt_sets" / "prompts.json"
    (elsewhere / "prompt_sets" / "prompts.json").write_bytes(prompts.read_bytes())
    webui_world.shared.opts.set("gmi_spec_dir", "gmi_elsewhere")  # relative to the models folder
    r = client.post("/gmi/v1/build", json={"wait": True})
    assert r.status_code == 200 and r.json()["state"] == "done", r.text
    assert list((webui_world.models_path / "gmi_elsewhere" / "specs").rglob("*.safetensors"))
