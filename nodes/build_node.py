"""GMI Build Specs: renders each checkpoint's spec images with ComfyUI and stores their CLIP features."""

from __future__ import annotations

import json

from ..gmi_core.limits import check_settings
from ..gmi_core.paths import one_line
from ..gmi_core.protocols import BuildProgress, GenerationSettings
from . import engines, events, settings
from .encoder_node import ENCODER_TYPE
from .host import ComfyGenerator

FALLBACK_SAMPLERS = ["euler", "euler_ancestral", "dpmpp_2m", "ddim"]
FALLBACK_SCHEDULERS = ["normal", "karras", "simple"]


def sampler_choices():
    try:
        import comfy.samplers

        return list(comfy.samplers.KSampler.SAMPLERS), list(comfy.samplers.KSampler.SCHEDULERS)
    except ImportError:
        return FALLBACK_SAMPLERS, FALLBACK_SCHEDULERS


def parse_which(which: str, checkpoints: str):
    if which != "listed":
        return which
    names = [line.strip() for line in (checkpoints or "").splitlines() if line.strip()]
    if not names:
        raise ValueError("which = listed, but no checkpoint names were given (one per line)")
    return names


class GMIBuildSpecs:
    CATEGORY = "gmi"
    FUNCTION = "build"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    DESCRIPTION = (
        "Builds (or resumes) the spec of each checkpoint in models/checkpoints: renders the prompt set with "
        "ComfyUI's own loader, sampler and VAE and keeps the CLIP features of the images. Run once per new "
        "checkpoint; interrupting keeps every finished prompt, and the next run resumes."
    )
    OUTPUT_TOOLTIPS = ("What the run did, as JSON: built, skipped (with reasons), failed and whether it was interrupted.",)

    @classmethod
    def INPUT_TYPES(cls):
        samplers, schedulers = sampler_choices()
        d = settings.DEFAULTS
        return {
            "required": {
                "encoder": (ENCODER_TYPE, {"tooltip": "The CLIP encoder the spec images are encoded with (GMI Load CLIP Encoder)."}),
                "which": (["missing", "all", "listed"], {"default": "missing", "tooltip": (
                    "missing: checkpoints without a ready spec (resumes partial ones); all: rebuild every spec; "
                    "listed: only the names in 'checkpoints'.")}),
                "prompt_set": (engines.prompt_set_choices(), {"default": "platform",
                                                              "tooltip": "The prompts every checkpoint renders for its spec."}),
                "max_prompts": ("INT", {"default": 0, "min": 0, "max": 10000,
                                        "tooltip": "Use only the first N prompts of the set; 0 = every prompt."}),
                "images_per_prompt": ("INT", {"default": d["images_per_prompt"], "min": 1, "max": 64,
                                              "tooltip": "Images (seeds) rendered per prompt and checkpoint."}),
                "steps": ("INT", {"default": d["steps"], "min": 1, "max": 200, "tooltip": "Sampling steps per spec image."}),
                "cfg": ("FLOAT", {"default": d["cfg"], "min": 0.0, "max": 50.0, "step": 0.1,
                                  "tooltip": "Classifier-free guidance scale of the spec images."}),
                "sampler_name": (samplers, {"default": "euler", "tooltip": "ComfyUI sampler for the spec images."}),
                "scheduler": (schedulers, {"default": "normal", "tooltip": "ComfyUI scheduler for the spec images."}),
                "width": ("INT", {"default": d["width"], "min": 64, "max": 4096, "step": 8, "tooltip": "Spec image width in pixels."}),
                "height": ("INT", {"default": d["height"], "min": 64, "max": 4096, "step": 8,
                                   "tooltip": "Spec image height in pixels."}),
                # control_after_generate off: the front end would otherwise randomize a "seed" after every run,
                # and specs built with another seed are not comparable.
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "control_after_generate": False,
                                 "tooltip": "Base seed of the spec images; the same seeds are used for every checkpoint."}),
            },
            "optional": {
                "checkpoints": ("STRING", {"multiline": True, "default": "",
                                           "tooltip": "Checkpoint file names, one per line (used when which = listed)."}),
                "negative_prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "Negative prompt for every spec image."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        # Always look again: checkpoints may have been added, and "missing" is judged at run time.
        return float("nan")

    def build(self, encoder, which, prompt_set, max_prompts, images_per_prompt, steps, cfg, sampler_name, scheduler,
              width, height, seed, checkpoints="", negative_prompt=""):
        gen_settings = GenerationSettings(
            steps=int(steps), cfg=float(cfg), sampler=sampler_name, scheduler=scheduler,
            width=int(width), height=int(height), negative_prompt=negative_prompt or "",
        )
        check_settings(gen_settings, *sampler_choices())
        prompts = engines.get_prompt_set(prompt_set, max_prompts)
        engine = engines.get_engine(encoder, prompts, int(images_per_prompt), gen_settings, int(seed))
        source = engines.source()
        target = parse_which(which, checkpoints)
        statuses, _ = engine.status(source)
        if isinstance(target, str):
            todo = [s for s in statuses if target == "all" or s.state != "ready"]
        else:
            todo = [s for s in statuses if s.name in target]
        remaining = sum(s.prompts_total - (s.prompts_done if s.state == "partial" and target != "all" else 0) for s in todo)
        bar = events.NodeProgress(remaining * int(images_per_prompt))
        generator = ComfyGenerator(on_image=bar.step)

        def progress(p: BuildProgress):
            events.send(events.BUILD_PROGRESS, {
                "checkpoint": p.checkpoint, "index": p.checkpoint_index, "count": p.checkpoint_count,
                "prompts_done": p.prompts_done, "prompts_total": p.prompts_total,
                "images_done": p.images_done, "images_total": p.images_total, "message": p.message,
            })

        settings.save({
            "encoder": getattr(encoder, "gmi_choice", settings.DEFAULTS["encoder"]), "prompt_set": prompt_set,
            "max_prompts": int(max_prompts), "images_per_prompt": int(images_per_prompt), "steps": int(steps),
            "cfg": float(cfg), "sampler_name": sampler_name, "scheduler": scheduler, "width": int(width),
            "height": int(height), "seed": int(seed),
        })
        result = {"built": [], "skipped": [], "failed": [], "cancelled": False}
        try:
            report = engine.build(source, generator, target, progress=progress, should_cancel=events.interrupted)
            result = report.to_dict()
        except BaseException as exc:  # interrupt inside the sampler, OS error, anything: the panel must still end
            result["cancelled"] = events.interrupted() or type(exc).__name__ == "InterruptProcessingException"
            result["error"] = "interrupted" if result["cancelled"] else one_line(exc)
            raise
        finally:
            events.send(events.BUILD_DONE, result)
        if report.cancelled:
            events.check_interrupted()  # raises ComfyUI's interrupt exception; finished prompts are saved
        text = json.dumps(result, indent=1)
        return {"ui": {"gmi_build": [result]}, "result": (text,)}
