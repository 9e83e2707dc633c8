"""Unit tests of the Forge seam (gmi_a1111/forge.py) on the fake WebUI, with and without Forge's modules_forge.

The real Forge is exercised by tests/test_forge_integration.py (opt-in, GMI_FORGE_DIR).
"""

from __future__ import annotations

import dataclasses
import importlib.machinery
import sys
import types

import pytest

from gmi_core.checkpoints import list_checkpoint_files
from gmi_core.families import RECIPES, FamilySettings
from gmi_core.protocols import GenerationSettings
from tests.test_a1111_adapter import gmi, webui  # noqa: F401 - the fake WebUI fixture


class FakeMainEntry(types.ModuleType):
    """``modules_forge.main_entry`` as Forge has it: a module list by file name, checkpoint and module changes
    that set the options, and loading parameters read at the next generation."""

    def __init__(self, world):
        super().__init__("modules_forge.main_entry")
        self.world = world
        self.module_list = {}
        self.calls = []

    def refresh_models(self):
        self.module_list.update({"ae.safetensors": "/m/VAE/ae.safetensors", "t5.safetensors": "/m/te/t5.safetensors"})

    def checkpoint_change(self, name, save=True, refresh=True):
        self.calls.append(("checkpoint_change", name, save, refresh))
        self.world.shared.opts.set("sd_model_checkpoint", name)
        return True

    def modules_change(self, values, save=True, refresh=True):
        self.calls.append(("modules_change", list(values), save, refresh))
        self.world.shared.opts.data["forge_additional_modules"] = [self.module_list[v] for v in values]
        return True

    def refresh_model_loading_parameters(self):
        self.calls.append(("refresh_model_loading_parameters",))
        sd_models = self.world.sd_models
        info = sd_models.get_closet_checkpoint_match(self.world.shared.opts.sd_model_checkpoint)
        sd_models.model_data.forge_loading_parameters = {"checkpoint_info": info}


@pytest.fixture
def forge_world(webui, monkeypatch):  # noqa: F811 - the fixture imported above
    for i in range(2):
        webui.add_checkpoint(f"model_{i}.safetensors", seed=i)
    webui.refresh()
    package = types.ModuleType("modules_forge")
    package.__spec__ = importlib.machinery.ModuleSpec("modules_forge", None, is_package=True)
    main_entry = FakeMainEntry(webui)
    package.main_entry = main_entry
    monkeypatch.setitem(sys.modules, "modules_forge", package)
    monkeypatch.setitem(sys.modules, "modules_forge.main_entry", main_entry)
    webui.main_entry = main_entry
    return webui


def test_a1111_has_no_forge_parameters_and_switches_through_the_option(webui):  # noqa: F811
    webui.add_checkpoint("model_0.safetensors", seed=0)
    webui.refresh()
    forge = gmi("forge")
    assert not forge.IS_FORGE
    assert forge.processing_parameters(dataclasses.replace(GenerationSettings(), cfg=1.0)) == {}
    assert forge.module_names() == []
    title = webui.sd_models.get_closet_checkpoint_match("model_0.safetensors").title
    assert forge.switch(title) == title
    assert webui.shared.opts.sd_model_checkpoint == title


def test_forge_switch_goes_through_checkpoint_change_and_modules_change(forge_world):
    forge = gmi("forge")
    assert forge.IS_FORGE
    info = forge_world.sd_models.get_closet_checkpoint_match("model_1.safetensors")
    title = info.title
    assert forge.switch(title, ["ae.safetensors", "t5.safetensors"]) == title
    calls = forge_world.main_entry.calls
    assert calls[0] == ("modules_change", ["ae.safetensors", "t5.safetensors"], False, False)
    assert calls[1] == ("checkpoint_change", "model_1.safetensors", False, False)  # as Forge's dropdown names it
    assert calls[-1] == ("refresh_model_loading_parameters",)  # once, after both
    assert forge.selected_title() == info.title  # the checkpoint Forge loads at the next generation
    assert forge.selected_modules() == ["ae.safetensors", "t5.safetensors"]

    forge_world.main_entry.calls.clear()
    forge.switch(title)  # None keeps Forge's module selection
    assert [c[0] for c in forge_world.main_entry.calls] == ["checkpoint_change", "refresh_model_loading_parameters"]
    with pytest.raises(LookupError, match="not in Forge's VAE / text encoder folders"):
        forge.switch(title, ["../../etc/passwd"])


def test_forge_family_parameters_come_from_the_family_settings(forge_world):
    forge = gmi("forge")
    families = FamilySettings.defaults()
    flux = families.for_family("flux-dev")
    assert flux.cfg == 1.0  # Flux dev renders with CFG 1 and distilled guidance
    assert forge.processing_parameters(flux) == {"distilled_cfg_scale": RECIPES["flux-dev"].guidance}
    assert forge.processing_parameters(families.for_family("sd1")) == {}  # SD1: Forge's defaults stay


def test_forge_renders_the_single_files_of_its_families(forge_world, tmp_path, monkeypatch):
    """A1111 skips a Flux / SD3 file with the reason; Forge renders the single files of the families its backend
    runs, and skips a bare diffusion model (its modules would come from Forge's UI, which a spec cannot record)."""
    from tests.test_families import FLUX_SINGLE, SD3_SINGLE, flux, mmdit, single, write

    files = [
        ("flux.safetensors", write(tmp_path / "flux.safetensors", single(flux(), *FLUX_SINGLE))),
        ("sd3.safetensors", write(tmp_path / "sd3.safetensors", single(mmdit(), *SD3_SINGLE))),
        ("flux-bare.safetensors", write(tmp_path / "flux-bare.safetensors", flux())),
    ]
    forge = gmi("forge")
    listing = list_checkpoint_files(files, renders=forge.renders)
    assert {c.name: c.family for c in listing.checkpoints} == {"flux.safetensors": "flux-dev", "sd3.safetensors": "sd3"}
    (bare,) = listing.skipped
    assert bare.name == "flux-bare.safetensors" and "modules chosen in its UI" in bare.reason
    monkeypatch.setattr(forge, "IS_FORGE", False)  # the same files in A1111
    listing = list_checkpoint_files(files, renders=forge.renders)
    assert not listing.checkpoints
    assert all("this host renders single-file SD1.x/SD2.x/SDXL" in s.reason for s in listing.skipped)


def test_gradio_js_keyword_follows_the_gradio_major_version(webui, monkeypatch):  # noqa: F811
    gradio = types.ModuleType("gradio")
    monkeypatch.setitem(sys.modules, "gradio", gradio)
    forge = gmi("forge")
    gradio.__version__ = "4.40.0"  # Forge
    assert forge.gradio_js("f") == {"js": "f"}
    gradio.__version__ = "3.41.2"  # A1111 1.10
    assert forge.gradio_js("f") == {"_js": "f"}


def test_settings_have_rows_for_the_families_the_host_renders(webui):  # noqa: F811
    """A1111 renders SD1/SD2/SDXL only, so Settings > GMI shows no Flux / SD3 rows (Forge: HOST_FAMILIES)."""
    runtime, forge = gmi("runtime"), gmi("forge")
    rows = {key.split("_")[1] for key in runtime.OPTIONS if key.endswith("_steps")}
    assert rows == {family.replace("-", "") for family in forge.HOST_FAMILIES} == {"sd1", "sd2", "sd2v", "sdxl"}


def test_recipe_sampler_names_take_the_webui_spelling(webui):  # noqa: F811
    """The family table names samplers as ComfyUI does ("euler"); the WebUI knows "Euler" / "k_euler"."""
    host = gmi("host")
    names = (["Euler a", "Euler", "k_euler", "DPM++ 2M"], ["Automatic", "sgm_uniform", "SGM Uniform", "Karras"])
    sd3 = FamilySettings.defaults().for_family("sd3")
    assert (sd3.sampler, sd3.scheduler) == ("euler", "sgm_uniform")
    out = host.webui_sampling(sd3, names)
    assert (out.sampler, out.scheduler) == ("Euler", "sgm_uniform")
    odd = dataclasses.replace(sd3, sampler="no_such", scheduler="SGM_UNIFORM")
    assert host.webui_sampling(odd, names).sampler == "no_such"  # left for the validation to refuse with the list
    assert host.webui_sampling(odd, (None, names[1])).scheduler == "sgm_uniform"
