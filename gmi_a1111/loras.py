"""The WebUI's LoRAs for gmi: the built-in Lora network's files as LoRA specs, rendered with ``<lora:name:w>``.

Which LoRAs, strengths and bases: :mod:`gmi_core.loras`, with Settings > GMI's ``gmi_models``,
``gmi_lora_strengths`` and ``gmi_lora_bases``; here only the WebUI's side (its LoRA list and folder).
"""

from __future__ import annotations

from pathlib import Path

from modules import shared

from gmi_core.loras import LoraSource, lora_files_in, parse_choices, prompt_tag, with_lora_tag
from gmi_core.protocols import CheckpointSource

OPTIONS: dict[str, tuple[object, str, str]] = {
    "gmi_models": (
        "checkpoints",
        "Models gmi builds and ranks",
        "checkpoints, loras (each LoRA on its base checkpoint at each strength) or both",
    ),
    "gmi_lora_strengths": (
        "1",
        "LoRA strengths",
        "for every LoRA (1, or 0.5,1: one spec each); per LoRA: name=0.8; ...",
    ),
    "gmi_lora_bases": (
        "",
        "LoRA base checkpoints",
        "sd1=checkpoint.safetensors; name=checkpoint (default: the base the LoRA's metadata names, else the first)",
    ),
}


def lora_files() -> list[tuple[str, Path]]:
    """(name, path) of the WebUI's LoRAs: the built-in Lora network's list, else its folder (--lora-dir)."""
    try:
        import networks  # extensions-builtin/Lora, on sys.path in the WebUI

        networks.list_available_networks()
        return sorted((name, Path(net.filename)) for name, net in networks.available_networks.items())
    except ImportError:
        folder = getattr(shared.cmd_opts, "lora_dir", None)
        return lora_files_in(Path(folder)) if folder else []


def model_source(checkpoints: CheckpointSource, hash_cache: Path, options) -> CheckpointSource:
    """The WebUI's checkpoints, plus its LoRA combinations when Settings > GMI asks for them."""
    kinds = str(options("gmi_models") or "checkpoints")
    if kinds == "checkpoints":
        return checkpoints
    split = [part.strip() for part in str(options("gmi_lora_strengths") or "1").split(";") if part.strip()]
    bases = [part.strip() for part in str(options("gmi_lora_bases") or "").split(";") if part.strip()]
    return LoraSource(checkpoints, lora_files, parse_choices(split, bases), hash_cache, kinds=kinds, host="the WebUI")


def row_target(row: dict, titles: dict[str, str]) -> tuple[str, str]:
    """(checkpoint title, ``<lora:name:w>`` tag or "") a ranking row switches to: a LoRA row's base and its tag."""
    part = row.get("lora")
    if row.get("model_kind") != "lora" or not part:
        return row["title"], ""
    return titles.get(part["base_sha256"], part["base_name"]), prompt_tag(part["lora_name"], part["strength"])


def choice_value(row: dict, titles: dict[str, str]) -> str:
    """The "Use this checkpoint" choice: the title, and for a LoRA row its tag after it (SWITCH_JS splits them)."""
    title, tag = row_target(row, titles)
    return f"{title} {tag}" if tag else title


def apply_to_generation(p, row: dict, titles: dict[str, str]) -> str:
    """Auto-select: ``p`` renders with the row's checkpoint and, for a LoRA row, its tag in the prompt. The title."""
    title, tag = row_target(row, titles)
    if tag:
        p.prompt = with_lora_tag(p.prompt, tag)
    return title
