"""A Generator through diffusers, so the engine works without any UI (the CLI, the demo, benchmarks).

Single-file checkpoints load with ``from_single_file``. Offline, diffusers needs the pipeline's
config locally: pass ``config`` (a diffusers-format folder); online it resolves the usual repo.
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

    def _pipeline(self, checkpoint: CheckpointInfo):
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
        return self._loaded[1]

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
            self._loaded = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
