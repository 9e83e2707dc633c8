"""GMI Identify: rank local checkpoints for reference images and output the chosen one's MODEL, CLIP, VAE."""

from __future__ import annotations

import json
from urllib.parse import urlencode

from comfy_api.latest import io

from ..gmi_core import service
from ..gmi_core.limits import DEFAULT_TOP_K, MAX_PROMPT_SET_PROMPTS, MAX_TOP_K
from ..gmi_core.loras import MODEL_KINDS
from ..gmi_core.prompts import DEFAULT_PROMPT_SET
from ..gmi_core.protocols import ListedCheckpoints
from ..gmi_core.ranker import DEFAULT_METHOD, METHODS
from ..gmi_core.refine import REFINE_MODES
from . import engines, events, loras, settings
from .build_node import progress_payload
from .encoder_node import Encoder
from .host import ComfyGenerator, load_winner, tensor_to_pils


def thumbnail_urls(encoder_id: str):
    """Thumbnail references for :func:`gmi_core.service.identify_payload`: the /gmi/thumbnail route."""

    def url(sha256: str, prompt_set_hash: str, prompt_index: int) -> str:
        query = {"sha256": sha256, "encoder_id": encoder_id, "prompt_set_hash": prompt_set_hash, "prompt": prompt_index}
        return f"/gmi/thumbnail?{urlencode(query)}"

    return url


class GMIIdentify(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GMIIdentify",
            display_name="GMI Identify",
            category="gmi",
            description=(
                "Ranks every local checkpoint that has a spec by how likely it made the reference image(s), shows the "
                "ranking with the closest spec images in the node, and loads the checkpoint at pick_rank: wire its "
                "MODEL, CLIP and VAE into a KSampler to generate with it."
            ),
            inputs=[
                Encoder.Input("encoder", tooltip="The CLIP encoder the specs were built with (GMI Load CLIP Encoder)."),
                io.Image.Input(
                    "image", tooltip="One or more reference images (a batch); more images give a steadier ranking."
                ),
                io.Combo.Input(
                    "method",
                    options=list(METHODS),
                    default=DEFAULT_METHOD,
                    tooltip=(
                        "gmi: prompt-weighted kernel mean distance (recommended). The rkme_* and download methods are "
                        "the baselines of the source paper."
                    ),
                ),
                io.Int.Input(
                    "top_k",
                    default=DEFAULT_TOP_K,
                    min=0,
                    max=MAX_TOP_K,
                    tooltip="Rows shown in the node's ranking; 0 = all.",
                ),
                io.Int.Input(
                    "pick_rank",
                    default=1,
                    min=1,
                    max=MAX_TOP_K,
                    tooltip="Which row's checkpoint to load: 1 = the best match, 2 = the runner-up, ...",
                ),
                io.String.Input(
                    "prompt",
                    optional=True,
                    multiline=True,
                    default="",
                    tooltip=(
                        "The prompt the reference image was made with, if known. Empty = gmi guesses one from the "
                        "image (see GMI Interrogate)."
                    ),
                ),
                io.Combo.Input(
                    "prompt_set",
                    optional=True,
                    options=engines.prompt_set_choices(),
                    default=DEFAULT_PROMPT_SET,
                    tooltip="The prompt set the specs were built with.",
                ),
                io.Int.Input(
                    "max_prompts",
                    optional=True,
                    default=0,
                    min=0,
                    max=MAX_PROMPT_SET_PROMPTS,
                    tooltip="The max_prompts the specs were built with (0 = the whole set).",
                ),
                io.Boolean.Input(
                    "include_not_installed",
                    optional=True,
                    default=False,
                    tooltip=(
                        "Also rank imported specs of checkpoints that are not installed here (marked 'not installed'; "
                        "never loaded: pick_rank skips them)."
                    ),
                ),
                io.Combo.Input(
                    "models",
                    optional=True,
                    options=list(MODEL_KINDS),
                    default="both",
                    tooltip=(
                        "Which rows to rank: checkpoints, LoRAs (each on its base at its strength, as GMI Build Specs "
                        "built them with its lora_strengths and lora_bases), or both in one ranking."
                    ),
                ),
                io.String.Input(
                    "on_checkpoint",
                    optional=True,
                    default="",
                    tooltip="Only the LoRAs on this checkpoint (its file name); empty = every base.",
                ),
                io.Combo.Input(
                    "refine",
                    optional=True,
                    options=list(REFINE_MODES),
                    default="off",
                    tooltip=(
                        "contenders: when the ranking is ambiguous (checkpoints that cannot be told apart at the images "
                        "their specs hold), render the contenders' missing spec images (up to the full budget) with "
                        "ComfyUI and rank again. The grown specs stay for later queries; interrupting keeps them."
                    ),
                ),
                io.Int.Input(
                    "refine_max_images",
                    optional=True,
                    default=0,
                    min=0,
                    max=MAX_TOP_K,
                    tooltip="Images refine renders at most, shared by the contenders (0 = up to the full budget).",
                ),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The chosen checkpoint's diffusion model."),
                io.Clip.Output(display_name="clip", tooltip="The chosen checkpoint's text encoder (CLIP)."),
                io.Vae.Output(display_name="vae", tooltip="The chosen checkpoint's VAE."),
                io.String.Output(
                    display_name="checkpoint_name",
                    tooltip="File name of the chosen checkpoint, as listed in models/checkpoints.",
                ),
                io.String.Output(
                    display_name="ranking_json",
                    tooltip="The whole ranking as JSON: method, pseudo-prompt, score and closest spec prompts per checkpoint.",
                ),
                io.String.Output(
                    display_name="lora_name",
                    tooltip="The chosen row's LoRA file (as listed in models/loras), applied to MODEL and CLIP; empty "
                    "when the chosen row is a checkpoint (checkpoint_name is then its base).",
                ),
                io.Float.Output(
                    display_name="lora_strength",
                    tooltip="The strength the LoRA is applied at (0 for a checkpoint row).",
                ),
            ],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        # Same inputs are cached by ComfyUI itself; re-run also when any spec was written or removed.
        try:
            return engines.store().fingerprint()
        except Exception:  # noqa: BLE001 - never block execution on a status check
            return float("nan")

    @classmethod
    def execute(
        cls,
        encoder,
        image,
        method,
        top_k,
        pick_rank,
        prompt="",
        prompt_set=DEFAULT_PROMPT_SET,
        max_prompts=0,
        include_not_installed=False,
        models="both",
        on_checkpoint="",
        refine="off",
        refine_max_images=0,
    ) -> io.NodeOutput:
        prompts = engines.get_prompt_set(prompt_set, max_prompts)
        engine = engines.get_engine(encoder, prompts)
        thumbnails = thumbnail_urls(encoder.encoder_id)
        saved = settings.load()  # the LoRA strengths and bases the Build node last used: the same combinations
        lora_choices = loras.choices(saved["lora_strengths"], saved["lora_bases"])
        source = loras.model_source(engines.source(), engines.hash_cache(), lora_choices, models, on_checkpoint)
        source = ListedCheckpoints(source.list_checkpoints())  # listed once: ranked, then the chosen row looked up
        images = tensor_to_pils(image)
        if refine == "contenders":
            refined = refine_with_comfyui(
                engine, images, source, prompt, method, bool(include_not_installed), refine_max_images
            )
            result = refined.after
            ranking = service.refine_payload(refined, thumbnails, top_k=top_k, pick_rank=pick_rank)
        else:
            result = service.identify(engine, images, source, prompt, method, bool(include_not_installed))
            ranking = service.identify_payload(result, thumbnails, top_k=top_k, pick_rank=pick_rank)
        chosen = service.pick_installed(result, pick_rank)  # only installed checkpoints can be switched to
        listed = next((c for c in source.listing.checkpoints if c.sha256 == chosen.sha256), None)
        lora_name, lora_strength, checkpoint_name = "", 0.0, chosen.name
        if listed is not None and listed.lora is not None:
            base = listed.lora.base
            model, clip, vae = load_winner(engine, base.name, base.sha256)
            model, clip = loras.apply_lora(model, clip, listed)
            lora_name, lora_strength, checkpoint_name = listed.lora.name, listed.lora.strength, base.name
        else:
            model, clip, vae = load_winner(engine, chosen.name, chosen.sha256)
        text = json.dumps(ranking, indent=1)
        return io.NodeOutput(
            model,
            clip,
            vae,
            checkpoint_name,
            text,
            lora_name,
            lora_strength,
            ui={"gmi_ranking": [ranking], "text": [chosen.name]},
        )


def refine_with_comfyui(
    engine,
    images,
    source,
    prompt,
    method,
    include_not_installed,
    max_images,
    node_bar: bool = True,
    should_cancel=events.interrupted,
    generator=None,
):
    """Identify with refine of the contenders through ComfyUI's own sampler: the panel gets the build progress
    events (with ETA), the node's bar (``node_bar``: inside a running node) counts the images after each prompt; an
    interrupt (``should_cancel``) keeps what was rendered and still answers. The node and /gmi/identify call it;
    ``generator``: a :class:`ComfyGenerator` the caller wrapped (default: a plain one)."""
    box = {"done": 0}

    def progress(p):
        if node_bar:
            if "bar" not in box:
                box["bar"] = events.NodeProgress(p.images_planned)
            box["bar"].step(p.images_rendered - box["done"])
            box["done"] = p.images_rendered
        events.send(events.BUILD_PROGRESS, progress_payload(p))

    generator = generator or ComfyGenerator(hash_cache=engines.hash_cache())
    return service.refine(
        engine,
        images,
        source,
        generator,
        prompt,
        method,
        include_not_installed,
        max_images=int(max_images) or None,
        progress=progress,
        should_cancel=should_cancel,
    )
