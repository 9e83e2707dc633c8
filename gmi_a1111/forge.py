"""The one place that knows whether gmi runs in Forge (stable-diffusion-webui-forge) or in the A1111 WebUI.

Everything else in gmi_a1111 is shared by both hosts; where they differ it asks this module:

- the switch: Forge changes checkpoints through ``modules_forge.main_entry.checkpoint_change`` (its
  ``reload_model_weights`` does nothing) and loads the model lazily at the next generation; a Flux-style checkpoint
  also needs its VAE / text encoder files, chosen with ``main_entry.modules_change``;
- the family parameters Forge's processing takes beyond A1111's (``distilled_cfg_scale`` for Flux's guidance);
- Gradio: Forge runs Gradio 4 (``js=``), A1111 Gradio 3.41 (``_js=``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

from modules import sd_models, shared

from gmi_core.checkpoints import ModelFile, renders_sd_single_files, skipped_model
from gmi_core.families import RECIPES, SD_FAMILIES

IS_FORGE = importlib.util.find_spec("modules_forge") is not None
HOST_NAME = "Forge" if IS_FORGE else "the WebUI"

# gmi_core.families field -> the StableDiffusionProcessing attribute Forge reads it from. The family table
# (one for every host) holds the values; a family without the field leaves Forge's default.
FORGE_PROCESSING_FIELDS = {"guidance": "distilled_cfg_scale"}


# The families Forge's backend runs from one checkpoint file (backend/diffusion_engine/*.py).
FORGE_FAMILIES = ("sd1", "sd2", "sd2-v", "sdxl", "sd3", "flux-dev", "flux-schnell", "chroma")
HOST_FAMILIES = FORGE_FAMILIES if IS_FORGE else SD_FAMILIES  # the families this host renders (Settings > GMI rows)


def renders(found: ModelFile, path) -> ModelFile:
    """The host's render policy (gmi_core.checkpoints.RenderPolicy): A1111 renders single SD1/SD2/SDXL files;
    Forge also single SD3.5 / Flux / Chroma files. A file without its text encoders and VAE would render with the
    modules chosen in Forge's UI, which a spec could not record, so it is skipped with that reason."""
    if not IS_FORGE or found.reason:
        return renders_sd_single_files(found, path)
    if found.family in FORGE_FAMILIES and found.layout == "single":
        return found
    if found.family in FORGE_FAMILIES:
        return skipped_model(
            f"{RECIPES[found.family].label} file without its text encoders and VAE: Forge would render it with the"
            " modules chosen in its UI, which a spec cannot record; build its spec in ComfyUI"
        )
    return renders_sd_single_files(found, path)


def processing_parameters(settings) -> dict:
    """Extra txt2img parameters for a family's GenerationSettings (Forge only: A1111 has none of them)."""
    if not IS_FORGE:
        return {}
    out = {}
    for field, attribute in FORGE_PROCESSING_FIELDS.items():
        value = getattr(settings, field, None)
        if value is not None:
            out[attribute] = value
    return out


def gradio_js(js: str) -> dict:
    """The keyword an event listener takes for client-side JavaScript: ``js`` in Gradio 4, ``_js`` before."""
    import gradio as gr

    major = int(str(getattr(gr, "__version__", "3")).split(".")[0] or 3)
    return {"js": js} if major >= 4 else {"_js": js}


def module_names() -> list[str]:
    """Forge's VAE / text-encoder files (models/VAE, models/text_encoder), by file name; none in A1111."""
    if not IS_FORGE:
        return []
    from modules_forge import main_entry

    if not main_entry.module_list:
        main_entry.refresh_models()
    return sorted(main_entry.module_list)


def selected_modules() -> list[str]:
    """The VAE / text-encoder files Forge loads with the checkpoint now (file names)."""
    if not IS_FORGE:
        return []
    return [os.path.basename(p) for p in shared.opts.data.get("forge_additional_modules") or []]


def switch(title: str, modules: list[str] | None = None) -> str:
    """Make ``title`` the checkpoint of the next generations, the host's own way, and save the setting.

    ``modules`` (Forge): VAE / text-encoder file names to load with it; None keeps the current selection,
    [] clears it. Names not in Forge's module folders are refused."""
    if not IS_FORGE:
        # the option's onchange reloads the weights under the queue lock, like the quicksettings dropdown
        shared.opts.set("sd_model_checkpoint", title)
        with contextlib.suppress(AssertionError):  # --freeze-settings
            shared.opts.save(shared.config_filename)
        return title
    from modules_forge import main_entry

    if modules is not None:
        unknown = [m for m in modules if m not in module_names()]
        if unknown:
            raise LookupError(f"{unknown[0]!r} is not in Forge's VAE / text encoder folders")
        main_entry.modules_change(list(modules), save=False, refresh=False)
    main_entry.checkpoint_change(dropdown_value(title), save=False, refresh=False)
    with contextlib.suppress(AssertionError):  # --freeze-settings
        shared.opts.save(shared.config_filename)
    main_entry.refresh_model_loading_parameters()  # Forge loads it at the next generation
    return title


def dropdown_value(title: str) -> str:
    """How Forge's own checkpoint dropdown names a checkpoint (no hash; the short title if so set), so that the
    dropdown shows the switched-to checkpoint as one of its choices."""
    info = sd_models.get_closet_checkpoint_match(title)
    if info is None:
        return title
    return info.short_title if getattr(shared.opts, "sd_checkpoint_dropdown_use_short", False) else info.name


def loaded_title() -> str | None:
    """The checkpoint whose weights are in memory now (in Forge: since the last generation)."""
    model = getattr(getattr(sd_models, "model_data", None), "sd_model", None)
    return getattr(getattr(model, "sd_checkpoint_info", None), "title", None)


def selected_title() -> str | None:
    """The checkpoint the next generation renders with: Forge's loading parameters, else the loaded one."""
    if IS_FORGE:
        parameters = getattr(sd_models.model_data, "forge_loading_parameters", None) or {}
        info = parameters.get("checkpoint_info")
        if info is not None:
            return info.title
    return loaded_title()
