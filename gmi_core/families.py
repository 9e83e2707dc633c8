"""Model families and their generation recipes: the one table every host renders spec images from.

A model's family comes from its own safetensors header (:func:`gmi_core.checkpoints.inspect_model`), single-file
checkpoints and split diffusion-model files alike:

* ``sd1``  SD 1.x, trained at 512 px;
* ``sd2``  SD 2.x base (epsilon prediction), 512 px;
* ``sd2-v`` SD 2.x v-prediction models (768-v), 768 px. The rule, in order: the header's ``modelspec``
  metadata (``modelspec.architecture`` ending in ``-v`` or ``modelspec.prediction_type`` = ``v``), a ``v_pred``
  key, else the heuristic ComfyUI applies: the spread of one LayerNorm bias
  (``output_blocks.11.1.transformer_blocks.0.norm1.bias``, 1,280 values) is above 0.09 in v models;
* ``sdxl`` SDXL base, 1024 px (refiner-shaped files are skipped: they only finish another model's image);
* ``sd3``  SD3 / SD3.5 (MMDiT), 16-channel latents, CFG, shift 3 (ComfyUI's ModelSamplingSD3);
* ``flux-dev`` / ``flux-schnell`` Flux.1: distilled guidance (FluxGuidance) instead of CFG, no negative prompt;
  schnell has no guidance input and renders in 4 steps (Fill / Depth / Canny files are skipped);
* ``chroma`` Chroma (Flux-shaped with a distilled guidance layer): real CFG with a negative prompt, T5 only;
* ``other`` a diffusion model of a family gmi does not name, which the host itself recognises (ComfyUI's
  model detection): rendered with the host's own loader and a generic recipe;
* ``unknown`` a pickle file a host loads itself: treated as ``sd1``.

Each row of :data:`RECIPES` says how spec images of that family are rendered (size, steps, CFG or distilled
guidance, sampler and scheduler where the family needs its own, negative prompt or none, latent channels, the
text encoders and VAE a split file needs). A recipe's ``sampler`` / ``scheduler`` of None means "the host-wide
choice"; every editable field can be changed per family by the user (CLI ``--set sdxl.steps=30``, ComfyUI Build
node ``flux-dev.guidance=3``, A1111 settings). The settings used are stored in every spec.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

from .errors import InvalidInput
from .limits import MAX_CFG, MAX_SIZE, MAX_STEPS, MIN_SIZE, SIZE_STEP, check_number

if TYPE_CHECKING:
    from .protocols import CheckpointInfo


@dataclass(frozen=True)
class Recipe:
    """How one family's spec images are rendered, host-neutral (hosts map names to their own nodes/samplers)."""

    label: str
    width: int
    height: int
    steps: int
    cfg: float
    guidance: float | None = None  # distilled guidance (Flux dev); None: none
    shift: float | None = (
        None  # flow-matching shift (ModelSamplingSD3 / ModelSamplingFlux max_shift); None: the model's
    )
    sampler: str | None = None  # None: the host-wide sampler
    scheduler: str | None = None  # None: the host-wide scheduler
    negative: bool = True  # False: the family has no negative prompt (CFG 1)
    latent_channels: int = 4
    text_encoders: tuple[str, ...] = ()  # encoder kinds a split file needs, in loader order (gmi_core.components)
    optional_encoders: tuple[str, ...] = ()  # kinds used when present (SD3: at least one of them)
    clip_type: str = "stable_diffusion"  # the host's text-encoder type name (ComfyUI CLIPType)
    hint: str = ""  # a word in file names of this family's VAE / encoders, preferred among equals


RECIPES: dict[str, Recipe] = {
    "sd1": Recipe("SD 1.x", 512, 512, 20, 7.0, text_encoders=("clip_l",), hint="sd15"),
    "sd2": Recipe("SD 2.x", 512, 512, 20, 7.0, text_encoders=("clip_h",), hint="sd2"),
    "sd2-v": Recipe("SD 2.x 768-v", 768, 768, 20, 7.0, text_encoders=("clip_h",), hint="sd2"),
    "sdxl": Recipe("SDXL", 1024, 1024, 25, 6.0, text_encoders=("clip_l", "clip_g"), clip_type="sdxl", hint="sdxl"),
    "sd3": Recipe(
        "SD3 / SD3.5",
        1024,
        1024,
        28,
        4.5,
        shift=3.0,
        sampler="euler",
        scheduler="sgm_uniform",
        latent_channels=16,
        optional_encoders=("clip_l", "clip_g", "t5xxl"),  # ComfyUI's SD3 text encoder takes any of them
        clip_type="sd3",
        hint="sd3",
    ),
    "flux-dev": Recipe(
        "Flux.1 dev",
        1024,
        1024,
        20,
        1.0,
        guidance=3.5,
        shift=1.15,
        sampler="euler",
        scheduler="simple",
        negative=False,
        latent_channels=16,
        text_encoders=("clip_l", "t5xxl"),
        clip_type="flux",
        hint="flux",
    ),
    "flux-schnell": Recipe(
        "Flux.1 schnell",
        1024,
        1024,
        4,
        1.0,
        sampler="euler",
        scheduler="simple",
        negative=False,
        latent_channels=16,
        text_encoders=("clip_l", "t5xxl"),
        clip_type="flux",
        hint="flux",
    ),
    "chroma": Recipe(
        "Chroma",
        1024,
        1024,
        26,
        4.0,
        sampler="euler",
        scheduler="beta",
        latent_channels=16,
        text_encoders=("t5xxl",),
        clip_type="chroma",
        hint="flux",
    ),
    "other": Recipe("other (host-detected)", 1024, 1024, 20, 5.0),
}
FAMILIES = tuple(RECIPES)
SD_FAMILIES = ("sd1", "sd2", "sd2-v", "sdxl")  # what a plain single-file SD runner (diffusers, A1111) renders
FALLBACK_FAMILY = "sd1"
PER_FAMILY_FIELDS = ("width", "height", "steps", "cfg")  # numeric fields every host shows per family
RECIPE_FIELDS = ("guidance", "shift", "sampler", "scheduler", "text_encoders", "vae")  # also editable per family
SPLIT_ONLY_FIELDS = ("text_encoders", "vae")  # recorded only for split files (a single file brings its own)
FAMILY_DEFAULTS: dict[str, dict] = {
    family: {"width": r.width, "height": r.height, "steps": r.steps, "cfg": r.cfg} for family, r in RECIPES.items()
}
LIMITS: dict[str, tuple] = {  # the engine-wide limits of gmi_core.limits, per field
    "width": (MIN_SIZE, MAX_SIZE),
    "height": (MIN_SIZE, MAX_SIZE),
    "steps": (1, MAX_STEPS),
    "cfg": (0.0, MAX_CFG),
    "guidance": (0.0, MAX_CFG),
    "shift": (0.0, MAX_CFG),
}
SIZE_MULTIPLE = SIZE_STEP
_FALLBACK_DEFAULTS = FAMILY_DEFAULTS[FALLBACK_FAMILY]


@dataclass(frozen=True)
class GenerationSettings:
    """How spec images are rendered. Stored in every spec so stale specs can be detected. The per-family fields
    default to the fallback family's row above; sampler, scheduler and negative prompt are host-wide."""

    steps: int = _FALLBACK_DEFAULTS["steps"]
    cfg: float = _FALLBACK_DEFAULTS["cfg"]
    sampler: str = "euler"
    scheduler: str = "normal"
    width: int = _FALLBACK_DEFAULTS["width"]
    height: int = _FALLBACK_DEFAULTS["height"]
    negative_prompt: str = ""
    guidance: float | None = None  # distilled guidance (Flux dev), instead of CFG
    shift: float | None = None  # flow-matching sampling shift; None: the model's own
    latent_channels: int = 4
    text_encoders: str = ""  # split files: the text-encoder files rendered with, "+"-joined host names
    vae: str = ""  # split files: the VAE file rendered with
    workflow: str = ""  # "template <digest>": rendered by the user's own workflow instead of the family recipe

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> GenerationSettings:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


# Added with the family recipes: specs written before them lack these and read as their defaults.
RECIPE_SETTINGS = ("guidance", "shift", "latent_channels", "text_encoders", "vae", "workflow")


def family_key(family: str | None) -> str:
    """The settings row a checkpoint uses (unknown families use SD1's)."""
    return family if family in FAMILIES else FALLBACK_FAMILY


def recipe(family: str | None) -> Recipe:
    return RECIPES[family_key(family)]


def check_value(name: str, value):
    """``value`` as the field's type, or InvalidInput naming its range (:data:`gmi_core.limits.NUMBERS`). Text
    fields (sampler, file names) are checked for length here and against the host's names by the host; guidance
    and shift also take "none" (the family has none / the model's own)."""
    if name not in LIMITS:
        text = str(value).strip()
        if len(text) > 500:
            raise InvalidInput(f"{name} is too long")
        return text
    if name in ("guidance", "shift") and str(value).strip().lower() in ("", "none", "off"):
        return None
    number = check_number(name, value)
    return float(number) if isinstance(LIMITS[name][0], float) else number


def recipe_settings(family: str, base: GenerationSettings) -> GenerationSettings:
    """A family's recipe on top of the host-wide ``base`` (sampler, scheduler, negative prompt)."""
    r = RECIPES[family]
    return replace(
        base,
        width=r.width,
        height=r.height,
        steps=r.steps,
        cfg=r.cfg,
        guidance=r.guidance,
        shift=r.shift,
        sampler=r.sampler or base.sampler,
        scheduler=r.scheduler or base.scheduler,
        negative_prompt=base.negative_prompt if r.negative else "",
        latent_channels=r.latent_channels,
    )


@dataclass(frozen=True)
class FamilySettings:
    """GenerationSettings per family; hashable, so hosts can key engines by it."""

    rows: tuple[tuple[str, GenerationSettings], ...]

    @classmethod
    def defaults(
        cls,
        base: GenerationSettings | None = None,
        overrides: dict | None = None,
        components: dict | None = None,
    ) -> FamilySettings:
        """The family recipes on top of ``base`` (sampler, scheduler, negative prompt), then the host's
        ``components`` (``{family: {"text_encoders": ..., "vae": ...}}``: what its folders hold for split files),
        then ``overrides``: ``{family: {field: value}}``, where family ``"*"`` means every family."""
        base = base or GenerationSettings()
        overrides = overrides or {}
        unknown = set(overrides) - set(FAMILIES) - {"*"}
        if unknown:
            raise InvalidInput(f"unknown checkpoint family {sorted(unknown)[0]!r}; families: {', '.join(FAMILIES)}")
        rows = []
        for family in FAMILIES:
            values = {k: v for k, v in (components or {}).get(family, {}).items() if k in SPLIT_ONLY_FIELDS}
            for scope in ("*", family):
                for name, value in (overrides.get(scope) or {}).items():
                    if name not in PER_FAMILY_FIELDS + RECIPE_FIELDS:
                        fields = ", ".join(PER_FAMILY_FIELDS + RECIPE_FIELDS)
                        raise InvalidInput(f"{name!r} is not a per-family setting ({fields})")
                    values[name] = check_value(name, value)
            rows.append((family, replace(recipe_settings(family, base), **values)))
        return cls(tuple(rows))

    @classmethod
    def uniform(cls, settings: GenerationSettings) -> FamilySettings:
        """The same settings for every family (tests, tiny checkpoints, benchmarks)."""
        return cls(tuple((family, settings) for family in FAMILIES))

    def for_family(self, family: str | None) -> GenerationSettings:
        return dict(self.rows)[family_key(family)]

    def for_checkpoint(self, checkpoint: CheckpointInfo) -> GenerationSettings:
        """The family's row; a single-file checkpoint brings its own text encoders and VAE, so none are recorded."""
        settings = self.for_family(checkpoint.family)
        if checkpoint.layout != "split":
            settings = replace(settings, text_encoders="", vae="")
        return settings

    def to_dict(self) -> dict:
        return {family: settings.to_dict() for family, settings in self.rows}


def parse_overrides(items) -> dict:
    """``["sdxl.steps=30", "cfg=6"]`` -> ``{"sdxl": {"steps": "30"}, "*": {"cfg": "6"}}`` (checked later)."""
    out: dict[str, dict] = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        if not sep or not value.strip():
            raise InvalidInput(f"setting {item!r}: write FAMILY.FIELD=VALUE, e.g. sdxl.steps=30")
        family, _, name = key.strip().rpartition(".")
        out.setdefault(family or "*", {})[name] = value.strip()
    return out
