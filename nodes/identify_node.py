"""GMI Identify: rank local checkpoints for reference images and output the chosen one's MODEL, CLIP, VAE."""

from __future__ import annotations

import json
from urllib.parse import urlencode

from ..gmi_core.errors import GmiError
from ..gmi_core.ranker import DEFAULT_METHOD, METHODS
from . import engines
from .encoder_node import ENCODER_TYPE
from .host import checkpoint_path, load_checkpoint, tensor_to_pils


def thumbnail_url(sha256: str, encoder_id: str, prompt_set_hash: str, prompt_index: int) -> str:
    query = urlencode({"sha256": sha256, "encoder_id": encoder_id, "prompt_set_hash": prompt_set_hash, "prompt": prompt_index})
    return f"/gmi/thumbnail?{query}"


def ui_ranking(result, encoder_id: str, prompt_set_hash: str, chosen: str) -> dict:
    """The JSON the web extension renders: the engine's result plus thumbnail URLs and the chosen name."""
    data = result.to_dict()
    for row in data["ranking"]:
        for match in row["top_prompts"]:
            match["thumbnail"] = thumbnail_url(row["sha256"], encoder_id, match.get("prompt_set_hash") or prompt_set_hash,
                                               match.get("spec_index", match["index"]))
    data["chosen"] = chosen
    return data


class GMIIdentify:
    CATEGORY = "gmi"
    FUNCTION = "identify"
    OUTPUT_NODE = True
    RETURN_TYPES = ("MODEL", "CLIP", "VAE", "STRING", "STRING")
    RETURN_NAMES = ("model", "clip", "vae", "checkpoint_name", "ranking_json")
    DESCRIPTION = "Finds the local checkpoint that best matches the reference image(s) and loads it."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "encoder": (ENCODER_TYPE,),
                "image": ("IMAGE", {"tooltip": "one or more reference images (a batch)"}),
                "method": (list(METHODS), {"default": DEFAULT_METHOD}),
                "top_k": ("INT", {"default": 5, "min": 0, "max": 1000, "tooltip": "rows shown; 0 = all"}),
                "pick_rank": ("INT", {"default": 1, "min": 1, "max": 1000, "tooltip": "1 = the best match"}),
            },
            "optional": {
                "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "empty = interrogate the image"}),
                "prompt_set": (engines.prompt_set_choices(), {"default": "platform"}),
                "max_prompts": ("INT", {"default": 0, "min": 0, "max": 10000, "tooltip": "as used for the build"}),
                "include_not_installed": ("BOOLEAN", {"default": False, "tooltip": "also rank imported specs of checkpoints "
                                                      "that are not installed (shown, never loaded)"}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        # Same inputs are cached by ComfyUI itself; re-run also when any spec was written or removed.
        try:
            return engines.store().fingerprint()
        except Exception:  # noqa: BLE001 - never block execution on a status check
            return float("nan")

    def identify(self, encoder, image, method, top_k, pick_rank, prompt="", prompt_set="platform", max_prompts=0,
                 include_not_installed=False):
        prompts = engines.get_prompt_set(prompt_set, max_prompts)
        engine = engines.get_engine(encoder, prompts)
        result = engine.identify(tensor_to_pils(image), prompt=prompt or None, method=method, top_k=None, source=engines.source(),
                                 include_not_installed=bool(include_not_installed))
        installed = [r for r in result.ranking if r.installed]  # only installed checkpoints can be switched to
        if pick_rank > len(installed):
            raise GmiError(f"pick_rank {pick_rank} but only {len(installed)} installed checkpoint(s) have specs")
        chosen = installed[pick_rank - 1]
        model, clip, vae = load_checkpoint(checkpoint_path(chosen.name))
        ui = ui_ranking(result, encoder.encoder_id, prompts.hash, chosen.name)
        if top_k:
            ui["ranking"] = ui["ranking"][: max(int(top_k), pick_rank)]
        text = json.dumps(ui, indent=1)
        return {"ui": {"gmi_ranking": [ui], "text": [chosen.name]}, "result": (model, clip, vae, chosen.name, text)}
