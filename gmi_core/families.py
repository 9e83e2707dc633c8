"""Generation settings per checkpoint family: the one place for their defaults and limits.

A checkpoint's family comes from its own safetensors header (:func:`gmi_core.checkpoints.inspect_checkpoint`):

* ``sd1``  SD 1.x, trained at 512 px;
* ``sd2``  SD 2.x base (epsilon prediction), 512 px;
* ``sd2-v`` SD 2.x v-prediction models (768-v), 768 px. The rule, in order: the header's ``modelspec``
  metadata (``modelspec.architecture`` ending in ``-v`` or ``modelspec.prediction_type`` = ``v``), a ``v_pred``
  key, else the heuristic ComfyUI applies: the spread of one LayerNorm bias
  (``output_blocks.11.1.transformer_blocks.0.norm1.bias``, 1,280 values) is above 0.09 in v models;
* ``sdxl`` SDXL (``conditioner.embedders.*``), 1024 px;
* ``unknown`` a pickle file a host loads itself: treated as ``sd1``.

Sampler, scheduler and negative prompt are host-wide (each host names samplers its own way); size, steps and
CFG are per family and can be changed per family by the user (CLI ``--set sdxl.steps=30``, ComfyUI Build node,
A1111 settings).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .errors import InvalidInput
from .limits import MAX_CFG, MAX_SIZE, MAX_STEPS, MIN_SIZE, SIZE_STEP, check_number
from .protocols import GenerationSettings

FAMILIES = ("sd1", "sd2", "sd2-v", "sdxl")
FALLBACK_FAMILY = "sd1"
PER_FAMILY_FIELDS = ("width", "height", "steps", "cfg")
FAMILY_DEFAULTS: dict[str, dict] = {
    "sd1": {"width": 512, "height": 512, "steps": 20, "cfg": 7.0},
    "sd2": {"width": 512, "height": 512, "steps": 20, "cfg": 7.0},
    "sd2-v": {"width": 768, "height": 768, "steps": 20, "cfg": 7.0},
    "sdxl": {"width": 1024, "height": 1024, "steps": 25, "cfg": 6.0},
}
LIMITS: dict[str, tuple] = {  # the engine-wide limits of gmi_core.limits, per field
    "width": (MIN_SIZE, MAX_SIZE),
    "height": (MIN_SIZE, MAX_SIZE),
    "steps": (1, MAX_STEPS),
    "cfg": (0.0, MAX_CFG),
}
SIZE_MULTIPLE = SIZE_STEP


def family_key(family: str | None) -> str:
    """The settings row a checkpoint uses (unknown families use SD1's)."""
    return family if family in FAMILIES else FALLBACK_FAMILY


def check_value(name: str, value):
    """``value`` as the field's type, or InvalidInput naming its range (:data:`gmi_core.limits.NUMBERS`)."""
    number = check_number(name, value)
    return float(number) if isinstance(LIMITS[name][0], float) else number


@dataclass(frozen=True)
class FamilySettings:
    """GenerationSettings per family; hashable, so hosts can key engines by it."""

    rows: tuple[tuple[str, GenerationSettings], ...]

    @classmethod
    def defaults(cls, base: GenerationSettings | None = None, overrides: dict | None = None) -> FamilySettings:
        """The family defaults on top of ``base`` (sampler, scheduler, negative prompt), then ``overrides``:
        ``{family: {field: value}}``, where family ``"*"`` means every family."""
        base = base or GenerationSettings()
        overrides = overrides or {}
        unknown = set(overrides) - set(FAMILIES) - {"*"}
        if unknown:
            raise InvalidInput(f"unknown checkpoint family {sorted(unknown)[0]!r}; families: {', '.join(FAMILIES)}")
        rows = []
        for family in FAMILIES:
            values = dict(FAMILY_DEFAULTS[family])
            for scope in ("*", family):
                for name, value in (overrides.get(scope) or {}).items():
                    if name not in PER_FAMILY_FIELDS:
                        raise InvalidInput(f"{name!r} is not a per-family setting ({', '.join(PER_FAMILY_FIELDS)})")
                    values[name] = check_value(name, value)
            rows.append((family, replace(base, **values)))
        return cls(tuple(rows))

    @classmethod
    def uniform(cls, settings: GenerationSettings) -> FamilySettings:
        """The same settings for every family (tests, tiny checkpoints, benchmarks)."""
        return cls(tuple((family, settings) for family in FAMILIES))

    def for_family(self, family: str | None) -> GenerationSettings:
        return dict(self.rows)[family_key(family)]

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
