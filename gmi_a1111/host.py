"""The gmi_core seams (checkpoint source, generator) and the checkpoint switch, with the WebUI's own modules.

Only these ``modules.*`` names are used (and faked in tests/a1111_support/fake_webui.py):

- ``sd_models.checkpoints_list`` / ``checkpoint_aliases`` (CheckpointInfo: filename, name, title, sha256,
  ``calculate_shorthash()``), ``sd_models.list_models()``
- ``hashes.sha256(filename, title)`` / ``hashes.sha256_from_cache`` (the WebUI's own hash cache)
- ``processing.StableDiffusionProcessingTxt2Img`` + ``processing.process_images``
- ``shared.state`` (interrupted, textinfo), ``shared.opts`` (set/save/sd_model_checkpoint), ``shared.config_filename``
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

from modules import hashes, processing, sd_models, shared

from gmi_core.checkpoints import list_checkpoint_files
from gmi_core.errors import Cancelled, CheckpointError, GmiError
from gmi_core.hashing import HashCache
from gmi_core.loras import prompt_for
from gmi_core.names import Named, resolve
from gmi_core.protocols import CheckpointInfo, CheckpointListing, GenerationSettings

from . import forge

log = logging.getLogger("gmi")


def webui_checkpoints() -> list:
    """The WebUI's CheckpointInfo objects, one per file (checkpoints_list is keyed by title)."""
    seen, out = set(), []
    for info in list(sd_models.checkpoints_list.values()):
        if info.filename in seen:
            continue
        seen.add(info.filename)
        out.append(info)
    return sorted(out, key=lambda i: i.name.lower())


def webui_sha256(info, fallback_cache: HashCache | None = None) -> str | None:
    """sha256 through the WebUI's own cache (and title update); gmi's cache when WebUI hashing is off."""
    sha = getattr(info, "sha256", None)
    if not sha:
        sha = hashes.sha256(info.filename, f"checkpoint/{info.name}")
        if sha and hasattr(info, "calculate_shorthash"):
            try:
                info.calculate_shorthash()  # registers the "[shorthash]" title the dropdown shows
            except Exception as exc:  # noqa: BLE001 - cosmetic only
                log.debug("gmi: calculate_shorthash failed for %s: %s", info.name, exc)
    if not sha and fallback_cache is not None:  # --no-hashing: hash ourselves, cached by size+mtime
        sha = fallback_cache.sha256(Path(info.filename))
    return sha


def _cached_sha(info) -> str | None:
    from_cache = getattr(hashes, "sha256_from_cache", None)
    return from_cache(info.filename, f"checkpoint/{info.name}") if from_cache else None


def resolve_checkpoint(name: object):
    """A WebUI CheckpointInfo named exactly (title, file name, sha256 or a unique prefix of >= 10 hex digits:
    :func:`gmi_core.names.resolve`); never a substring, never a file path."""
    candidates = [
        Named(info, info.name, info.title, getattr(info, "sha256", None) or _cached_sha(info))
        for info in webui_checkpoints()
    ]
    return resolve(name, candidates)


class WebuiCheckpointSource:
    """CheckpointSource over ``sd_models.checkpoints_list``; names are the WebUI's checkpoint names."""

    def __init__(self, hash_cache: Path | None = None, on_hashing=None):
        """``on_hashing(name)`` is called before a checkpoint is hashed for the first time (it can take minutes)."""
        self.hash_cache = hash_cache
        self.on_hashing = on_hashing

    def list_checkpoints(self) -> CheckpointListing:
        infos = {info.name: info for info in webui_checkpoints()}

        def sha256(name: str, path: Path, cache: HashCache) -> str | None:
            info = infos[name]
            if self.on_hashing and not getattr(info, "sha256", None) and not _cached_sha(info):
                self.on_hashing(name)
            return webui_sha256(info, cache)

        # the WebUI loads .ckpt itself, so gmi need not open pickles to accept them
        files = ((info.name, Path(info.filename)) for info in infos.values())
        return list_checkpoint_files(files, self.hash_cache, allow_pickle=True, sha256=sha256, renders=forge.renders)

    def title_for(self, checkpoint: CheckpointInfo) -> str:
        return self.webui_info(checkpoint).title

    def webui_info(self, checkpoint: CheckpointInfo):
        for info in webui_checkpoints():
            if Path(info.filename) == Path(checkpoint.path) or info.name == checkpoint.name:
                return info
        raise CheckpointError(f"checkpoint {checkpoint.name} is no longer in the WebUI's list")


def sampler_names() -> tuple[list[str] | None, list[str] | None]:
    """The sampler and schedule names (and aliases) the WebUI accepts; None where it cannot tell."""
    try:
        from modules import sd_samplers

        samplers = [n for s in sd_samplers.all_samplers for n in [s.name, *(s.aliases or [])]]
    except (ImportError, AttributeError):
        samplers = None
    try:
        from modules import sd_schedulers

        schedulers = [n for s in sd_schedulers.schedulers for n in (s.name, s.label)] + ["Automatic"]
    except (ImportError, AttributeError):
        schedulers = None
    return samplers, schedulers


def _webui_name(name: str, known: Sequence[str] | None) -> str:
    """The WebUI's spelling of a family recipe's sampler / schedule name (the table uses ComfyUI's: "euler",
    "sgm_uniform"), matched ignoring case, spaces and underscores; a name the WebUI lacks stays as it is."""
    if not known or name in known:
        return name

    def fold(text: str) -> str:
        return text.lower().replace(" ", "").replace("_", "")

    return next((n for n in known if fold(n) == fold(name)), name)  # the first spelling the WebUI lists


def webui_sampling(settings: GenerationSettings, names=None) -> GenerationSettings:
    """``settings`` with sampler and schedule type as this WebUI names them (``names``: :func:`sampler_names`)."""
    samplers, schedulers = names or sampler_names()
    return dataclasses.replace(
        settings,
        sampler=_webui_name(settings.sampler, samplers),
        scheduler=_webui_name(settings.scheduler, schedulers),
    )


class WebuiGenerator:
    """Generator through the WebUI pipeline: txt2img with ``override_settings['sd_model_checkpoint']``.

    The caller holds ``call_queue.queue_lock`` between ``shared.state.begin()`` and ``end()`` (the build job
    does); each call is one ``process_images`` with a batch of one prompt x len(seeds) images, so the WebUI's
    own progress (job_no/job_count, sampling steps) and Interrupt work as for txt2img.
    """

    def __init__(self, source: WebuiCheckpointSource | None = None):
        self.source = source or WebuiCheckpointSource()

    def generate(self, checkpoint: CheckpointInfo, prompt: str, seeds: Sequence[int], settings: GenerationSettings):
        state = shared.state
        if state.interrupted:
            raise Cancelled("interrupted")
        title = self.source.title_for(checkpoint)
        settings = webui_sampling(settings)
        n = len(seeds)
        state.textinfo = f"gmi: {checkpoint.name}: {prompt[:60]}"
        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=shared.sd_model,
            prompt=[prompt_for(checkpoint, prompt)] * n,  # a LoRA spec: <lora:name:w> for the built-in Lora network
            negative_prompt=settings.negative_prompt,
            seed=[int(s) for s in seeds],
            subseed=-1,
            subseed_strength=0,
            sampler_name=settings.sampler,
            scheduler=settings.scheduler,
            batch_size=n,
            n_iter=1,
            steps=settings.steps,
            cfg_scale=settings.cfg,
            width=settings.width,
            height=settings.height,
            do_not_save_samples=True,
            do_not_save_grid=True,
            override_settings={"sd_model_checkpoint": title},
            override_settings_restore_afterwards=True,
            **forge.processing_parameters(settings),
        )
        try:
            processed = processing.process_images(p)
        finally:
            close = getattr(p, "close", None)
            if close:
                close()
        if state.interrupted:
            raise Cancelled("interrupted")
        if checkpoint.lora is not None and "Lora hashes" not in (processed.infotexts or [""])[0]:
            raise CheckpointError(f"the WebUI did not apply the LoRA {checkpoint.lora.name} (see its console)")
        images = list(processed.images)[:n]
        if len(images) != n:
            raise GmiError(f"{forge.HOST_NAME} returned {len(images)} images for {n} seeds")
        loaded = getattr(getattr(shared, "sd_model", None), "sd_checkpoint_info", None)
        if loaded is not None and Path(loaded.filename) != Path(checkpoint.path):
            raise GmiError(f"{forge.HOST_NAME} rendered with {loaded.name}, not {checkpoint.name}")
        return images

    def release(self) -> None:
        """The WebUI keeps and frees models itself (sd_checkpoints_limit); nothing to do between checkpoints."""


def switch_to_title(title: str, modules: list[str] | None = None) -> str:
    """The host's own checkpoint switch (see gmi_a1111.forge for what differs in Forge)."""
    return forge.switch(title, modules)
