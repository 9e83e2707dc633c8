"""GMI Build Specs: renders each checkpoint's spec images with ComfyUI and stores their CLIP features."""

from __future__ import annotations

import json

from comfy_api.latest import io

from ..gmi_core.budgets import BUDGETS
from ..gmi_core.families import FAMILY_DEFAULTS
from ..gmi_core.limits import MAX_PROMPT_SET_PROMPTS, MAX_SEED, check_settings
from ..gmi_core.loras import MODEL_KINDS
from ..gmi_core.paths import one_line
from ..gmi_core.protocols import BuildProgress, GenerationSettings, format_eta
from . import engines, events, loras, settings, workflow_template
from .encoder_node import Encoder
from .host import ComfyGenerator

BUDGET_HELP = ", ".join(f"{k} = {v.label()}" for k, v in BUDGETS.items()) + ", or PROMPTSxIMAGES such as 32x2"
FAMILY_HELP = (
    "empty = per-family defaults ("
    + "; ".join(
        f"{f}: {v['width']}x{v['height']}, {v['steps']} steps, cfg {v['cfg']}" for f, v in FAMILY_DEFAULTS.items()
    )
    + "). Change them per family: sdxl.steps=30, sd1.width=640, cfg=6 (all families)"
)


def sampler_choices() -> tuple[list[str], list[str]]:
    import comfy.samplers  # imported when asked: it loads ComfyUI's model management

    return list(comfy.samplers.KSampler.SAMPLERS), list(comfy.samplers.KSampler.SCHEDULERS)


def parse_which(which: str, checkpoints: str):
    if which != "listed":
        return which
    names = [line.strip() for line in (checkpoints or "").splitlines() if line.strip()]
    if not names:
        raise ValueError("which = listed, but no checkpoint names were given (one per line)")
    return names


def build_inputs(config: dict) -> dict:
    """The Build node's widget values the side panel queues, from the saved panel ``config`` and the node's own
    defaults: every widget input of :meth:`GMIBuildSpecs.define_schema`, so the panel repeats none of them."""
    widgets = [i for i in GMIBuildSpecs.define_schema().inputs if isinstance(i, io.WidgetInput)]
    inputs = {i.id: config.get(i.id, i.default) for i in widgets}  # not the encoder: a link, wired by the panel
    inputs["which"] = "missing"
    return inputs


def progress_payload(p: BuildProgress) -> dict:
    """What the panel shows: the engine's BuildProgress plus the short names and the ETA text the panel reads."""
    return {**p.to_dict(), "index": p.checkpoint_index, "count": p.checkpoint_count, "eta": format_eta(p.eta_s)}


class GMIBuildSpecs(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        samplers, schedulers = sampler_choices()
        d = settings.DEFAULTS
        return io.Schema(
            node_id="GMIBuildSpecs",
            display_name="GMI Build Specs",
            category="gmi",
            description=(
                "Builds or tops up the spec of each checkpoint in models/checkpoints to a budget (prompts x images): "
                "renders the prompt set with ComfyUI's own loader, sampler and VAE at the checkpoint family's size, "
                "steps and CFG, and keeps the CLIP features of the images. A larger budget later adds only the missing "
                "images; interrupting keeps every finished prompt, and the next run resumes."
            ),
            inputs=[
                Encoder.Input(
                    "encoder", tooltip="The CLIP encoder the spec images are encoded with (GMI Load CLIP Encoder)."
                ),
                io.Combo.Input(
                    "which",
                    options=["missing", "all", "listed"],
                    default="missing",
                    tooltip=(
                        "missing: top every spec up to the budget (resumes partial ones, adds only missing images); "
                        "all: render every spec again with these settings; listed: only the names in 'checkpoints'."
                    ),
                ),
                io.Combo.Input(
                    "prompt_set",
                    options=engines.prompt_set_choices(),
                    default=d["prompt_set"],
                    tooltip="The prompts every checkpoint renders for its spec.",
                ),
                io.String.Input("budget", default=d["budget"], tooltip="Images per spec: " + BUDGET_HELP),
                io.String.Input("family_settings", multiline=True, default=d["family_settings"], tooltip=FAMILY_HELP),
                io.Combo.Input(
                    "sampler_name",
                    options=samplers,
                    default=d["sampler_name"],
                    tooltip="ComfyUI sampler for the spec images.",
                ),
                io.Combo.Input(
                    "scheduler",
                    options=schedulers,
                    default=d["scheduler"],
                    tooltip="ComfyUI scheduler for the spec images.",
                ),
                # control_after_generate off: the front end would otherwise randomize a "seed" after every run,
                # and specs built with another seed are not comparable.
                io.Int.Input(
                    "seed",
                    default=d["seed"],
                    min=0,
                    max=MAX_SEED,
                    control_after_generate=False,
                    tooltip="Base seed of the spec images; the same seeds are used for every checkpoint.",
                ),
                io.Int.Input(
                    "max_prompts",
                    optional=True,
                    default=d["max_prompts"],
                    min=0,
                    max=MAX_PROMPT_SET_PROMPTS,
                    tooltip=(
                        "Use only the first N prompts of the set; 0 = every prompt. A cut set is another prompt set: "
                        "prefer a smaller budget."
                    ),
                ),
                io.String.Input(
                    "checkpoints",
                    optional=True,
                    multiline=True,
                    default="",
                    tooltip="Checkpoint file names, one per line (used when which = listed).",
                ),
                io.String.Input(
                    "workflow",
                    optional=True,
                    multiline=True,
                    default="",
                    tooltip=(
                        "Optional: your own workflow renders the spec images instead of the family recipes. Paste it "
                        "(API format or a saved workflow's JSON) or give the name of a saved workflow. Title the model "
                        "loader 'gmi:model', the positive prompt's text encode 'gmi:prompt' and the sampler (or noise) "
                        "node 'gmi:seed'; gmi swaps only those values."
                    ),
                ),
                io.String.Input(
                    "negative_prompt",
                    optional=True,
                    multiline=True,
                    default=GenerationSettings.negative_prompt,
                    tooltip="Negative prompt for every spec image.",
                ),
                io.Combo.Input(
                    "models",
                    optional=True,
                    options=list(MODEL_KINDS),
                    default="checkpoints",
                    tooltip=(
                        "checkpoints: the files in models/checkpoints; loras: each LoRA in models/loras on its base "
                        "checkpoint at each strength (one spec per combination); both."
                    ),
                ),
                io.String.Input(
                    "lora_strengths",
                    optional=True,
                    multiline=True,
                    default=d["lora_strengths"],
                    tooltip=(
                        "LoRA strength(s) for every LoRA (1, or 0.5,1 for one spec each), and per LoRA one line "
                        "name=0.8 (file name or stem)."
                    ),
                ),
                io.String.Input(
                    "lora_bases",
                    optional=True,
                    multiline=True,
                    default=d["lora_bases"],
                    tooltip=(
                        "Base checkpoint per LoRA family (sd1=my_model.safetensors) or per LoRA (name=checkpoint), one "
                        "per line. Default: the base the LoRA's metadata names if installed, else the family's first."
                    ),
                ),
            ],
            outputs=[
                io.String.Output(
                    display_name="report",
                    tooltip="What the run did, as JSON: built, skipped (with reasons), failed and whether it was interrupted.",
                ),
            ],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        # Always look again: checkpoints may have been added, and "missing" is judged at run time.
        return float("nan")

    @classmethod
    def execute(
        cls,
        encoder,
        which,
        prompt_set,
        budget,
        family_settings,
        sampler_name,
        scheduler,
        seed,
        max_prompts=0,
        checkpoints="",
        negative_prompt="",
        workflow="",
        models="checkpoints",
        lora_strengths="1",
        lora_bases="",
    ) -> io.NodeOutput:
        template = workflow_template.parse(workflow) if (workflow or "").strip() else None  # checked before any work
        per_family = settings.family_settings(family_settings, sampler_name, scheduler, negative_prompt)
        per_family = workflow_template.with_template(per_family, template)
        for _, family_row in per_family.rows:
            check_settings(family_row, *sampler_choices())
        prompts = engines.get_prompt_set(prompt_set, max_prompts)
        engine = engines.get_engine(encoder, prompts, budget, per_family, int(seed))
        lora_choices = loras.choices(lora_strengths, lora_bases)
        source = loras.model_source(engines.source(), engines.hash_cache(), lora_choices, models)
        plan = engine.plan(source, parse_which(which, checkpoints))
        bar = events.NodeProgress(plan.images)
        if template is None:
            generator = ComfyGenerator(on_image=bar.step, hash_cache=engines.hash_cache())
        else:
            generator = workflow_template.TemplateGenerator(template, on_image=bar.step)
        settings.save(
            {
                "encoder": getattr(encoder, "gmi_choice", settings.DEFAULTS["encoder"]),
                "prompt_set": prompt_set,
                "max_prompts": int(max_prompts),
                "budget": budget,
                "family_settings": family_settings,
                "sampler_name": sampler_name,
                "scheduler": scheduler,
                "seed": int(seed),
                "lora_strengths": lora_strengths,
                "lora_bases": lora_bases,
            }
        )
        events.send(events.BUILD_PLAN, plan.to_dict())
        result = {"built": [], "skipped": [], "failed": [], "cancelled": False}
        try:
            report = engine.build(
                None,
                generator,
                plan=plan,
                should_cancel=events.interrupted,
                progress=lambda p: events.send(events.BUILD_PROGRESS, progress_payload(p)),
            )
            result = report.to_dict()
        except BaseException as exc:  # interrupt inside the sampler, OS error, anything: the panel must still end
            result["cancelled"] = events.interrupted() or type(exc).__name__ == "InterruptProcessingException"
            result["error"] = "interrupted" if result["cancelled"] else one_line(exc)
            raise
        finally:
            events.send(events.BUILD_DONE, result)
        if report.cancelled:
            events.check_interrupted()  # raises ComfyUI's interrupt exception; finished prompts are saved
        return io.NodeOutput(json.dumps(result, indent=1), ui={"gmi_build": [result]})
