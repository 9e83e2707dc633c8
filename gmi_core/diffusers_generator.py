"""A Generator through diffusers, so the engine works without any UI (the CLI, the demo, benchmarks).

Single-file checkpoints load with ``from_single_file``. Offline, diffusers needs the pipeline's
config locally: pass ``config`` (a diffusers-format folder); online it resolves the usual repo.
A LoRA spec's model (``checkpoint.lora``) is its base with the LoRA loaded by ``load_lora_weights`` (kohya files
included; needs ``peft``) at its strength; the base stays loaded from one LoRA to the next.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from .checkpoints import inspect_model, renders_sd_single_files
from .errors import CheckpointError, GmiError
from .protocols import CheckpointInfo, GenerationSettings

SCHEDULERS = {
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
}


class DiffusersGenerator:
    def __init__(
        self,
        config: Path | None = None,
        device: str | None = None,
        local_files_only: bool = True,
        show_progress: bool = False,
    ):
        try:
            import diffusers
        except ImportError as exc:
            raise GmiError("standalone generation needs diffusers: pip install 'gmi[diffusers]'") from exc
        if not show_progress:
            diffusers.utils.logging.set_verbosity_error()
            diffusers.utils.logging.disable_progress_bar()
        self.config = Path(config) if config else None
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.local_files_only = local_files_only
        self.show_progress = show_progress
        self._loaded: tuple[str, object] | None = None
        self._lora: tuple[str, float] | None = None  # (LoRA sha256, strength) loaded into the pipeline
        self.base_loads = 0  # checkpoint loads so far (the LoRA benchmark reports them)

    def _pipeline(self, checkpoint: CheckpointInfo):
        """The loaded pipeline of the checkpoint (a LoRA's: its base's) with the model's LoRA, if any."""
        pipe = self._base_pipeline(checkpoint.lora.base if checkpoint.lora else checkpoint)
        self._apply_lora(pipe, checkpoint)
        return pipe

    def _base_pipeline(self, checkpoint: CheckpointInfo):
        if self._loaded and self._loaded[0] == checkpoint.sha256:
            return self._loaded[1]
        self.release()
        import diffusers

        found = renders_sd_single_files(inspect_model(checkpoint.path), checkpoint.path)  # the truth for Flux, SD3
        if found.reason:
            raise CheckpointError(f"{checkpoint.name}: {found.reason}")
        family = found.family
        cls = diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline
        kwargs = {"local_files_only": self.local_files_only, "torch_dtype": self.dtype}
        if self.config:
            kwargs["config"] = str(self.config)
        if family != "sdxl":
            kwargs |= {"safety_checker": None, "requires_safety_checker": False}
        try:
            pipe = cls.from_single_file(str(checkpoint.path), **kwargs)
        except Exception as exc:
            hint = "" if self.config else " (offline? pass a local diffusers config folder with --config)"
            raise CheckpointError(
                f"{checkpoint.name}: diffusers could not load it{hint}: {str(exc).splitlines()[0]}"
            ) from exc
        pipe.set_progress_bar_config(disable=not self.show_progress)
        self._loaded = (checkpoint.sha256, pipe.to(self.device))
        self.base_loads += 1
        return self._loaded[1]

    def _apply_lora(self, pipe, checkpoint: CheckpointInfo) -> None:
        """Make ``checkpoint.lora`` (None: no LoRA) the one LoRA of the loaded base pipeline."""
        part = checkpoint.lora
        wanted = (part.sha256, part.strength) if part else None
        if self._lora == wanted:
            return
        if self._lora is not None and (part is None or self._lora[0] != part.sha256):
            pipe.unload_lora_weights()
            self._lora = None
        if part is None:
            return
        if self._lora is None:
            try:
                pipe.load_lora_weights(str(part.path), adapter_name="gmi")
            except ImportError as exc:
                raise GmiError("LoRA specs with diffusers need peft: pip install 'gmi[diffusers]'") from exc
            except Exception as exc:
                pipe.unload_lora_weights()
                raise CheckpointError(
                    f"{part.name}: diffusers could not load this LoRA: {str(exc).splitlines()[0]}"
                ) from exc
        pipe.set_adapters(["gmi"], adapter_weights=[part.strength])
        self._lora = wanted

    def generate(
        self, checkpoint: CheckpointInfo, prompt: str, seeds: Sequence[int], settings: GenerationSettings
    ) -> list[Image.Image]:
        import diffusers

        pipe = self._pipeline(checkpoint)
        scheduler_cls = getattr(diffusers, SCHEDULERS.get(settings.sampler, "EulerDiscreteScheduler"))
        if type(pipe.scheduler) is not scheduler_cls:
            pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
        generators = [torch.Generator(self.device).manual_seed(int(seed)) for seed in seeds]
        with torch.inference_mode():
            result = pipe(
                [prompt] * len(seeds),
                negative_prompt=[settings.negative_prompt] * len(seeds) if settings.negative_prompt else None,
                num_inference_steps=settings.steps,
                guidance_scale=settings.cfg,
                width=settings.width,
                height=settings.height,
                generator=generators,
            )
        return list(result.images)

    def release(self) -> None:
        if self._loaded is not None:
            self._loaded, self._lora = None, None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
