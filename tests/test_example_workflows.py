"""example_workflows/ hold saved UI-format workflows ComfyUI lists as templates; the converter that turns them into
API prompts follows the front end's widget rules. (Running them in real ComfyUI: test_comfyui_integration.py.)"""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfyui_support.workflows import ui_to_api, widget_values_taken

EXAMPLES = Path(__file__).resolve().parents[1] / "example_workflows"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.json")), ids=lambda p: p.stem)
def test_example_is_a_consistent_ui_workflow_with_a_thumbnail(path):
    workflow = json.loads(path.read_text())
    assert workflow["version"] == 0.4
    nodes = {n["id"]: n for n in workflow["nodes"]}
    assert workflow["last_node_id"] >= max(nodes)
    for link_id, origin, origin_slot, target, target_slot, kind in workflow["links"]:
        assert nodes[origin]["outputs"][origin_slot]["type"] == kind
        assert link_id in nodes[origin]["outputs"][origin_slot]["links"]
        assert nodes[target]["inputs"][target_slot]["link"] == link_id
    assert any(n["type"].startswith("GMI") for n in nodes.values())
    assert any(n["type"] == "MarkdownNote" for n in nodes.values()), "a template explains itself"
    assert path.with_suffix(".jpg").read_bytes()[:3] == b"\xff\xd8\xff"  # the template browser's thumbnail


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.json")), ids=lambda p: p.stem)
def test_example_runs_on_a_new_install(path):
    """Issue 18 class 9: a new install has no CLIP weights; the templates ship with downloads on (as ComfyUI's own
    templates fetch their models), so they download the default encoder instead of stopping."""
    workflow = json.loads(path.read_text())
    info = {"GMILoadEncoder": FAKE_INFO_FOR_IDENTIFY["GMILoadEncoder"]}
    encoders = [n for n in workflow["nodes"] if n["type"] == "GMILoadEncoder"]
    loaders = [n["inputs"] for n in ui_to_api({**workflow, "nodes": encoders}, info).values()]
    assert loaders and all(inputs["allow_download"] is True for inputs in loaders), loaders
    generator = (Path(__file__).resolve().parent / "comfyui_support" / "example_workflows.py").read_text()
    assert "allow_download: false" not in generator, "the generator would undo it"


def test_identify_example_feeds_the_sampler_from_identify():
    prompt = ui_to_api(json.loads((EXAMPLES / "gmi_identify.json").read_text()), FAKE_INFO_FOR_IDENTIFY)
    by_type = {n["class_type"]: (i, n) for i, n in prompt.items()}
    identify_id, _ = by_type["GMIIdentify"]
    sampler = by_type["KSampler"][1]["inputs"]
    assert sampler["model"] == [identify_id, 0]
    assert by_type["VAEDecode"][1]["inputs"]["vae"] == [identify_id, 2]
    assert all(n["inputs"]["clip"] == [identify_id, 1] for n in prompt.values() if n["class_type"] == "CLIPTextEncode")
    assert by_type["GMIIdentify"][1]["inputs"]["image"] == [by_type["LoadImage"][0], 0]
    assert sampler["seed"] == 0 and sampler["steps"] == 20  # the control_after_generate value was skipped


def _info(required, optional=None):
    return {
        "input": {"required": required, "optional": optional or {}},
        "input_order": {"required": list(required), "optional": list(optional or {})},
    }


FAKE_INFO_FOR_IDENTIFY = {  # /object_info's shape for the node types of the Identify example (real: the integration test)
    "LoadImage": _info({"image": [["example.png"], {"image_upload": True}]}),
    "GMILoadEncoder": _info({"encoder": [["ViT-L-14/openai"], {}], "allow_download": ["BOOLEAN", {}]}),
    "GMIIdentify": _info(
        {
            "encoder": ["GMI_ENCODER", {}],
            "image": ["IMAGE", {}],
            "method": [["gmi"], {}],
            "top_k": ["INT", {}],
            "pick_rank": ["INT", {}],
        },
        {
            "prompt": ["STRING", {}],
            "prompt_set": [["platform"], {}],
            "max_prompts": ["INT", {}],
            "include_not_installed": ["BOOLEAN", {}],
            "models": [["checkpoints", "loras", "both"], {}],
            "on_checkpoint": ["STRING", {}],
            "refine": [["off", "contenders"], {}],
            "refine_max_images": ["INT", {}],
        },
    ),
    "CLIPTextEncode": _info({"text": ["STRING", {"multiline": True}], "clip": ["CLIP", {}]}),
    "EmptyLatentImage": _info({"width": ["INT", {}], "height": ["INT", {}], "batch_size": ["INT", {}]}),
    "KSampler": _info(
        {
            "model": ["MODEL", {}],
            "seed": ["INT", {"control_after_generate": True}],
            "steps": ["INT", {}],
            "cfg": ["FLOAT", {}],
            "sampler_name": [["euler"], {}],
            "scheduler": [["normal"], {}],
            "positive": ["CONDITIONING", {}],
            "negative": ["CONDITIONING", {}],
            "latent_image": ["LATENT", {}],
            "denoise": ["FLOAT", {}],
        }
    ),
    "VAEDecode": _info({"samples": ["LATENT", {}], "vae": ["VAE", {}]}),
    "SaveImage": _info({"images": ["IMAGE", {}], "filename_prefix": ["STRING", {}]}),
}


def test_widget_rules_are_the_front_ends():
    assert widget_values_taken("model", ["MODEL", {}]) == 0
    assert widget_values_taken("steps", ["INT", {}]) == 1
    assert widget_values_taken("seed", ["INT", {}]) == 2  # seed / noise_seed get a control widget by default
    assert widget_values_taken("noise_seed", ["INT", {"min": 0}]) == 2
    assert widget_values_taken("seed", ["INT", {"control_after_generate": False}]) == 1
    assert widget_values_taken("n", ["INT", {"control_after_generate": True}]) == 2
    assert widget_values_taken("image", [["a.png"], {"image_upload": True}]) == 2
    assert widget_values_taken("text", ["STRING", {"forceInput": True}]) == 0
    assert widget_values_taken("mode", [["a", "b"]]) == 1


def test_converter_refuses_what_it_does_not_model():
    workflow = json.loads((EXAMPLES / "gmi_build_specs.json").read_text())
    info = {"GMILoadEncoder": FAKE_INFO_FOR_IDENTIFY["GMILoadEncoder"]}
    with pytest.raises(ValueError, match="no node type 'GMIBuildSpecs'"):
        ui_to_api(workflow, info)
    encoder = next(n for n in workflow["nodes"] if n["type"] == "GMILoadEncoder")
    encoder["widgets_values"].append("surplus")
    with pytest.raises(ValueError, match="left over"):
        ui_to_api({**workflow, "nodes": [encoder]}, info)
    encoder["widgets_values"].pop()
    encoder["mode"] = 4
    with pytest.raises(ValueError, match="bypassed"):
        ui_to_api({**workflow, "nodes": [encoder]}, info)
