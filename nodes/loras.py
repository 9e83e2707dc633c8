"""ComfyUI's LoRAs for gmi: the ``loras`` folders as LoRA specs, applied with ComfyUI's own LoRA loader.

Which LoRAs, strengths and bases come from :mod:`gmi_core.loras`; here only ComfyUI's side: its file names (through
``folder_paths``) and ``comfy.sd.load_lora_for_models``, the loader the LoraLoader node runs, so a LoRA spec and the
Identify node's outputs render as base + LoraLoader at that strength do.
"""

from __future__ import annotations

from pathlib import Path

from ..gmi_core.loras import LoraChoices, LoraSource, parse_choices
from ..gmi_core.protocols import CheckpointInfo, CheckpointSource


def lora_files() -> list[tuple[str, Path]]:
    import folder_paths

    files = []
    for name in folder_paths.get_filename_list("loras"):
        path = folder_paths.get_full_path("loras", name)
        if path:
            files.append((name, Path(path)))
    return files


def choices(strengths: str, bases: str) -> LoraChoices:
    """The Build node's ``lora_strengths`` (``1`` / ``0.5,1`` / lines ``name=0.8``) and ``lora_bases`` (lines
    ``sd1=checkpoint`` or ``lora=checkpoint``)."""
    lines = [line.strip() for line in (strengths or "").replace(";", "\n").splitlines() if line.strip()]
    return parse_choices(lines, [line.strip() for line in (bases or "").splitlines() if line.strip()])


def model_source(
    checkpoints: CheckpointSource, hash_cache: Path, lora_choices: LoraChoices, kinds: str, on_base: str = ""
) -> CheckpointSource:
    """ComfyUI's checkpoints and checkpoint + LoRA combinations (``kinds``: checkpoints / loras / both)."""
    if kinds == "checkpoints":
        return checkpoints
    return LoraSource(
        checkpoints, lora_files, lora_choices, hash_cache, kinds=kinds, on_base=on_base or None, host="ComfyUI"
    )


def apply_lora(model, clip, checkpoint: CheckpointInfo):
    """(MODEL, CLIP) of the base with ``checkpoint.lora`` applied as ComfyUI's LoraLoader applies it."""
    import comfy.sd
    import comfy.utils

    part = checkpoint.lora
    if part.strength == 0:  # LoraLoader returns the inputs unchanged at strength 0
        return model, clip
    lora = comfy.utils.load_torch_file(str(part.path), safe_load=True)
    return comfy.sd.load_lora_for_models(model, clip, lora, part.strength, part.strength)


def configured_source(config: dict, kinds: str = "both", on_base: str = "") -> CheckpointSource:
    """ComfyUI's models with the LoRA strengths and bases of ``config`` (the panel's settings: what the Build node
    last saved, with a request's overrides): the rows the side panel's status lists, its build and the routes rank."""
    from . import engines

    lora_choices = choices(config["lora_strengths"], config["lora_bases"])
    return model_source(engines.source(), engines.hash_cache(), lora_choices, kinds, on_base)


def saved_source(kinds: str = "both") -> CheckpointSource:
    """ComfyUI's models with the LoRA strengths and bases the Build node last saved (imports, routes)."""
    from . import settings

    return configured_source(settings.load(), kinds)
