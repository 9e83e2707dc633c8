"""GMI Identify: rank local checkpoints for reference images and output the chosen one's MODEL, CLIP, VAE."""

from __future__ import annotations

import json
from urllib.parse import urlencode

from ..gmi_core import service
from ..gmi_core.limits import DEFAULT_TOP_K, MAX_PROMPTS, MAX_TOP_K
from ..gmi_core.ranker import DEFAULT_METHOD, METHODS
from . import engines
from .encoder_node import ENCODER_TYPE
from .host import checkpoint_path, load_checkpoint, tensor_to_pils


def thumbnail_urls(encoder_id: str):
    """Thumbnail references for :func:`gmi_core.service.identify_payload`: the /gmi/thumbnail route."""

    def url(sha256: str, prompt_set_hash: str, prompt_index: int) -> str:
        query = {"sha256": sha256, "encoder_id": encoder_id, "prompt_set_hash": prompt_set_hash, "prompt": prompt_index}
        return f"/gmi/thumbnail?{urlencode(query)}"

    return url


class GMIIdentify:
    CATEGORY = "gmi"
    FUNCTION = "identify"
    OUTPUT_NODE = True
    RETURN_TYPES = ("MODEL", "CLIP", "VAE", "STRING", "STRING")
    RETURN_NAMES = ("model", "clip", "vae", "checkpoint_name", "ranking_json")
    DESCRIPTION = (
        "Ranks every local checkpoint that has a spec by how likely it made the reference image(s), shows the "
        "ranking with the closest spec images in the node, and loads the checkpoint at pick_rank: wire its MODEL, "
        "CLIP and VAE into a KSampler to generate with it."
    )
    OUTPUT_TOOLTIPS = (
        "The chosen checkpoint's diffusion model.",
        "The chosen checkpoint's text encoder (CLIP).",
        "The chosen checkpoint's VAE.",
        "File name of the chosen checkpoint, as listed in models/checkpoints.",
        "The whole ranking as JSON: method, pseudo-prompt, score and closest spec prompts per checkpoint.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "encoder": (
                    ENCODER_TYPE,
                    {"tooltip": "The CLIP encoder the specs were built with (GMI Load CLIP Encoder)."},
                ),
                "image": (
                    "IMAGE",
                    {"tooltip": "One or more reference images (a batch); more images give a steadier ranking."},
                ),
                "method": (
                    list(METHODS),
                    {
                        "default": DEFAULT_METHOD,
                        "tooltip": (
                            "gmi: prompt-weighted kernel mean distance (recommended). The rkme_* and download methods are "
                            "the baselines of the source paper."
                        ),
                    },
                ),
                "top_k": (
                    "INT",
                    {
                        "default": DEFAULT_TOP_K,
                        "min": 0,
                        "max": MAX_TOP_K,
                        "tooltip": "Rows shown in the node's ranking; 0 = all.",
                    },
                ),
                "pick_rank": (
                    "INT",
                    {
                        "default": 1,
                        "min": 1,
                        "max": MAX_TOP_K,
                        "tooltip": "Which row's checkpoint to load: 1 = the best match, 2 = the runner-up, ...",
                    },
                ),
            },
            "optional": {
                "prompt": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "",
                        "tooltip": (
                            "The prompt the reference image was made with, if known. Empty = gmi guesses one from the image "
                            "(see GMI Interrogate)."
                        ),
                    },
                ),
                "prompt_set": (
                    engines.prompt_set_choices(),
                    {"default": "platform", "tooltip": "The prompt set the specs were built with."},
                ),
                "max_prompts": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": MAX_PROMPTS,
                        "tooltip": "The max_prompts the specs were built with (0 = the whole set).",
                    },
                ),
                "include_not_installed": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": (
                            "Also rank imported specs of checkpoints that are not installed here (marked 'not installed'; "
                            "never loaded: pick_rank skips them)."
                        ),
                    },
                ),
            },
        }

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        # Same inputs are cached by ComfyUI itself; re-run also when any spec was written or removed.
        try:
            return engines.store().fingerprint()
        except Exception:  # noqa: BLE001 - never block execution on a status check
            return float("nan")

    def identify(
        self,
        encoder,
        image,
        method,
        top_k,
        pick_rank,
        prompt="",
        prompt_set="platform",
        max_prompts=0,
        include_not_installed=False,
    ):
        prompts = engines.get_prompt_set(prompt_set, max_prompts)
        engine = engines.get_engine(encoder, prompts)
        result = service.identify(
            engine, tensor_to_pils(image), engines.source(), prompt, method, bool(include_not_installed)
        )
        chosen = service.pick_installed(result, pick_rank)  # only installed checkpoints can be switched to
        model, clip, vae = load_checkpoint(checkpoint_path(chosen.name))
        ui = service.identify_payload(result, thumbnail_urls(encoder.encoder_id), top_k=top_k, pick_rank=pick_rank)
        text = json.dumps(ui, indent=1)
        return {"ui": {"gmi_ranking": [ui], "text": [chosen.name]}, "result": (model, clip, vae, chosen.name, text)}
