"""LoRA specs: a LoRA applied to a base checkpoint at a strength is one more model to identify.

A combination goes through the one spec path: its model key (:func:`combination_key`, the sha256 of
``base|lora|strength``) stands where a checkpoint's file sha256 stands, so the store, manifest, budget, resume,
locks, status, export/import and the index treat it as any checkpoint; the spec records the three parts in its
metadata (``extra["model"]``) and listings and rankings carry ``model_kind`` "checkpoint" / "lora" and the parts.

:class:`LoraSource` is the :class:`~gmi_core.protocols.CheckpointSource` of a host with LoRAs: the host's checkpoints
plus one combination per LoRA and strength, on the base chosen per LoRA (:func:`choose_base`): a base the LoRA's own
metadata names (kohya ``ss_sd_model_hash`` / ``ss_new_sd_model_hash`` / ``ss_sd_model_name``) if installed, else the
user's base for that family, else the family's first checkpoint. A LoRA no installed base fits is listed as skipped
with that reason, as is a file the host cannot load. Only the safetensors header of a LoRA is read.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePath

from .errors import InvalidInput
from .hashing import HashCache
from .limits import DEFAULT_LORA_STRENGTH, MAX_LORA_STRENGTH
from .paths import one_line
from .protocols import CheckpointInfo, CheckpointListing, CheckpointSource, LoraPart, SkippedCheckpoint
from .safetensors_header import read_header

MODEL_KINDS = ("checkpoints", "loras", "both")  # the identify / build filter
LORA_SUFFIXES = (".safetensors",)
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lycoris_")
DIFFUSERS_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.", "transformer.")
# File formats by the tensors they hold; each host says which it loads (ALL_FORMATS: ComfyUI and A1111 load all).
FORMAT_MARKS = (("loha", ".hada_w1_a"), ("lokr", ".lokr_w1"), ("oft", ".oft_"), ("lora", ".lora_down.weight"))
ALL_FORMATS = frozenset({"lora", "locon", "loha", "lokr", "oft", "diffusers"})
DIFFUSERS_FORMATS = frozenset({"lora", "locon", "diffusers"})
FAMILY_MATCHES = {"sd1": ("sd1",), "sd2": ("sd2", "sd2-v"), "sdxl": ("sdxl",)}
LEGACY_HASH_OFFSET, LEGACY_HASH_BYTES = 0x100000, 0x10000


# -- strengths and keys ------------------------------------------------------------------------
def parse_strength(value) -> float:
    """A strength as a number within +-MAX_LORA_STRENGTH, rounded to 3 decimals (the key's precision)."""
    try:
        strength = float(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"LoRA strength must be a number, not {str(value)[:40]!r}") from None
    if not abs(strength) <= MAX_LORA_STRENGTH:
        raise InvalidInput(f"LoRA strength must be between -{MAX_LORA_STRENGTH:g} and {MAX_LORA_STRENGTH:g}")
    return round(strength, 3) + 0.0  # + 0.0: -0.0 becomes 0.0


def format_strength(strength: float) -> str:
    return f"{parse_strength(strength):g}"


def combination_key(base_sha256: str, lora_sha256: str, strength: float) -> str:
    """The model key of a LoRA on a base at a strength: where a checkpoint's sha256 stands in the spec store."""
    return hashlib.sha256(f"gmi-lora|{base_sha256}|{lora_sha256}|{format_strength(strength)}".encode()).hexdigest()


def combination_name(lora_name: str, strength: float, base_name: str) -> str:
    return f"{lora_name} @ {format_strength(strength)} on {base_name}"


def combination(base: CheckpointInfo, lora: LoraInfo, strength: float) -> CheckpointInfo:
    """The model a LoRA spec renders: ``base`` with ``lora`` at ``strength``."""
    strength = parse_strength(strength)
    return CheckpointInfo(
        combination_name(lora.name, strength, base.name),
        base.path,
        combination_key(base.sha256, lora.sha256, strength),
        family=base.family,
        lora=LoraPart(lora.name, lora.path, lora.sha256, strength, base),
    )


def model_metadata(checkpoint: CheckpointInfo) -> dict:
    """What a spec records about its model (``extra["model"]``): the kind, and for a LoRA its three parts."""
    if checkpoint.lora is None:
        return {"kind": "checkpoint"}
    part = checkpoint.lora
    return {
        "kind": "lora",
        "lora_name": part.name,
        "lora_sha256": part.sha256,
        "strength": part.strength,
        "base_name": part.base.name,
        "base_sha256": part.base.sha256,
    }


def model_of(extra: dict) -> dict:
    """A spec's ``extra["model"]`` (specs without one are checkpoints)."""
    model = extra.get("model")
    return model if isinstance(model, dict) and model.get("kind") == "lora" else {"kind": "checkpoint"}


# -- reading LoRA files ------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraInfo:
    """One LoRA file: ``family`` of the checkpoints it fits; ``base_hints`` what its metadata says about its base."""

    name: str
    path: Path
    sha256: str
    family: str
    format: str
    base_hints: dict = field(default_factory=dict, hash=False, compare=False)


def lora_format(keys: list[str], shapes: dict[str, list[int]]) -> str | None:
    """The LoRA format of these tensors, None when they are not a LoRA's."""
    if not any(k.startswith(KOHYA_PREFIXES + DIFFUSERS_PREFIXES) for k in keys):
        return None
    for name, mark in FORMAT_MARKS:
        if any(mark in k for k in keys):
            if name == "lora" and any(len(shapes.get(k, ())) == 4 for k in keys if k.endswith(".lora_down.weight")):
                return "locon"  # kohya LoRA with convolution modules (LyCORIS LoCon)
            return name
    if any(k.endswith((".lora_A.weight", ".lora.down.weight")) for k in keys):
        return "diffusers"
    return None


def lora_family(keys: list[str], shapes: dict[str, list[int]], meta: dict[str, str]) -> tuple[str | None, str | None]:
    """(family, None) of the checkpoints a LoRA fits, from its metadata, else its keys and cross-attention width."""
    architecture = meta.get("modelspec.architecture", "").lower()
    version = meta.get("ss_base_model_version", "").lower()
    for text in (architecture, version):
        if not text:
            continue
        if "xl" in text:
            return "sdxl", None
        if "v2" in text or "sd_2" in text:
            return "sd2", None
        if "v1" in text or "sd_1" in text:
            return "sd1", None
        return None, f"a LoRA for {text}, not for SD1.x, SD2.x or SDXL"
    if meta.get("ss_v2", "").lower() == "true":
        return "sd2", None
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in keys):
        return "sdxl", None
    widths = {shapes[k][-1] for k in keys if "attn2_to_k" in k.replace(".", "_") and "down" in k and k in shapes}
    if 2048 in widths:
        return "sdxl", None
    if 1024 in widths:
        return "sd2", None
    return "sd1", None


def inspect_lora(path: Path) -> dict:
    """{"family", "format", "base_hints"} of a LoRA file, or {"reason"} why it is none gmi can use (header only)."""
    path = Path(path)
    if path.suffix.lower() not in LORA_SUFFIXES:
        return {"reason": "pickle-based LoRA (.pt/.ckpt) is not read by gmi for safety; convert it to .safetensors"}
    try:
        with open(path, "rb") as handle:
            header, _ = read_header(handle)
    except (OSError, ValueError) as exc:
        return {"reason": f"unreadable or truncated safetensors file ({one_line(exc)[:200]})"}
    meta = header.pop("__metadata__", None) or {}
    keys = list(header)
    shapes = {k: v.get("shape", []) for k, v in header.items() if isinstance(v, dict)}
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return {"reason": "a checkpoint, not a LoRA (put it in the checkpoints folder)"}
    fmt = lora_format(keys, shapes)
    if fmt is None:
        return {"reason": "not a LoRA (no lora_unet_*/lora_te_* or unet.*/text_encoder.* LoRA modules)"}
    family, reason = lora_family(keys, shapes, meta)
    if reason:
        return {"reason": reason}
    hints = {
        k: str(meta[k])[:300] for k in ("ss_sd_model_name", "ss_sd_model_hash", "ss_new_sd_model_hash") if meta.get(k)
    }
    return {"family": family, "format": fmt, "base_hints": hints}


def legacy_model_hash(path: Path) -> str:
    """The 8-hex model hash kohya writes as ``ss_sd_model_hash`` (A1111's old hash: 64 KiB at offset 1 MiB)."""
    with open(path, "rb") as handle:
        handle.seek(LEGACY_HASH_OFFSET)
        return hashlib.sha256(handle.read(LEGACY_HASH_BYTES)).hexdigest()[:8]


def list_lora_files(
    files: Iterable[tuple[str, Path]],
    hash_cache: Path | None = None,
    formats: frozenset[str] = ALL_FORMATS,
    host: str = "this host",
    on_hashing: Callable[[Path], None] | None = None,
) -> tuple[list[LoraInfo], list[SkippedCheckpoint]]:
    """Every ``(name, path)`` the host names as a LoRA, read by its header and hashed; what the host cannot load
    (``formats``) or gmi cannot use is skipped with the reason."""
    cache = HashCache(hash_cache)
    loras, skipped = [], []
    for name, path in files:
        try:
            facts = cache.remember(path, "lora", lambda p=path: inspect_lora(p))
            reason = facts.get("reason")
            if reason is None and facts["format"] not in formats:
                reason = f"{facts['format']} LoRA files are not loaded by {host}"
            if reason is None:
                sha = cache.sha256(path, on_hashing)
                loras.append(LoraInfo(name, Path(path), sha, facts["family"], facts["format"], facts["base_hints"]))
        except OSError as exc:
            reason = f"unreadable ({exc.strerror or one_line(exc)})"
        if reason:
            skipped.append(SkippedCheckpoint(name, Path(path), f"LoRA: {reason}"))
    cache.save()
    return loras, skipped


def lora_files_in(folder: Path | None) -> list[tuple[str, Path]]:
    """(name relative to the folder, path) of the LoRA files in a folder tree (the CLI's LoRA folder)."""
    if folder is None or not Path(folder).is_dir():
        return []
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in (".safetensors", ".pt"))
    return [(str(p.relative_to(folder)), p) for p in files]


# -- choosing bases and strengths --------------------------------------------------------------
@dataclass(frozen=True)
class LoraChoices:
    """The user's LoRA settings: strengths (default for all, per LoRA name) and base checkpoints (per family, per
    LoRA name), each naming a checkpoint by its name or its sha256 / short hash."""

    strengths: tuple[float, ...] = (DEFAULT_LORA_STRENGTH,)
    strengths_per_lora: dict[str, tuple[float, ...]] = field(default_factory=dict, hash=False)
    base_per_family: dict[str, str] = field(default_factory=dict, hash=False)
    base_per_lora: dict[str, str] = field(default_factory=dict, hash=False)

    def strengths_for(self, lora: LoraInfo) -> tuple[float, ...]:
        for key in (lora.name, PurePath(lora.name).stem):
            if key in self.strengths_per_lora:
                return self.strengths_per_lora[key]
        return self.strengths

    def to_dict(self) -> dict:
        return {
            "strengths": list(self.strengths),
            "strengths_per_lora": {k: list(v) for k, v in self.strengths_per_lora.items()},
            "base_per_family": dict(self.base_per_family),
            "base_per_lora": dict(self.base_per_lora),
        }


def parse_strengths(text: str) -> tuple[float, ...]:
    """``"1"`` or ``"0.5,1"``: one spec per strength."""
    values = tuple(dict.fromkeys(parse_strength(part) for part in str(text).split(",") if part.strip()))
    if not values:
        raise InvalidInput("give at least one LoRA strength")
    return values


def parse_choices(strengths: Iterable[str] = (), bases: Iterable[str] = ()) -> LoraChoices:
    """From the CLI's ``--lora-strength [NAME=]W[,W]`` and ``--lora-base FAMILY|NAME=CHECKPOINT`` (a key that is a
    family sets that family's base, any other key one LoRA's)."""
    default, per_lora, per_family, per_name = (DEFAULT_LORA_STRENGTH,), {}, {}, {}
    for item in strengths:
        name, sep, values = item.rpartition("=")
        if sep and name.strip():
            per_lora[name.strip()] = parse_strengths(values)
        else:
            default = parse_strengths(values)
    for item in bases:
        key, sep, checkpoint = item.partition("=")
        if not sep or not key.strip() or not checkpoint.strip():
            raise InvalidInput(f"--lora-base wants FAMILY=CHECKPOINT or LORA=CHECKPOINT, not {item[:80]!r}")
        (per_family if key.strip() in FAMILY_MATCHES else per_name)[key.strip()] = checkpoint.strip()
    return LoraChoices(default, per_lora, per_family, per_name)


def _names(checkpoint: CheckpointInfo) -> set[str]:
    name = PurePath(checkpoint.name.replace("\\", "/"))
    return {checkpoint.name, name.name, name.stem, checkpoint.sha256, checkpoint.sha256[:10]}


def choose_base(
    lora: LoraInfo, checkpoints: list[CheckpointInfo], choices: LoraChoices, cache: HashCache | None = None
) -> tuple[CheckpointInfo | None, str]:
    """(base, why it was chosen) or (None, why there is none)."""
    fitting = [c for c in checkpoints if c.lora is None and c.family in FAMILY_MATCHES.get(lora.family, ())]
    if not fitting:
        return None, f"LoRA: no installed {lora.family} checkpoint to apply this {lora.family} LoRA to"
    wanted = choices.base_per_lora.get(lora.name) or choices.base_per_lora.get(PurePath(lora.name).stem)
    chosen = next((c for c in fitting if wanted in _names(c)), None) if wanted else None
    if chosen:
        return chosen, "your base for this LoRA"
    chosen, why = _named_by_metadata(lora.base_hints, fitting, cache)
    if chosen:
        return chosen, why
    wanted = choices.base_per_family.get(lora.family)
    chosen = next((c for c in fitting if wanted in _names(c)), None) if wanted else None
    if chosen:
        return chosen, f"your base for {lora.family} LoRAs"
    return fitting[0], f"the first {lora.family} checkpoint"


def _named_by_metadata(
    hints: dict, fitting: list[CheckpointInfo], cache: HashCache | None
) -> tuple[CheckpointInfo | None, str]:
    """The installed checkpoint kohya's training metadata names: full sha256, file name, else the legacy hash."""
    full = hints.get("ss_new_sd_model_hash", "").lower()
    named = PurePath(hints.get("ss_sd_model_name", "").replace("\\", "/")).stem
    for c in fitting:
        if full and c.sha256 == full:
            return c, "named by the LoRA's metadata (ss_new_sd_model_hash)"
        if named and named in _names(c):
            return c, "named by the LoRA's metadata (ss_sd_model_name)"
    legacy = hints.get("ss_sd_model_hash", "").lower()
    for c in fitting if legacy and cache is not None else ():
        try:
            if cache.remember(c.path, "legacy_model_hash", lambda p=c.path: legacy_model_hash(p)) == legacy:
                return c, "named by the LoRA's metadata (ss_sd_model_hash)"
        except OSError:
            continue
    return None, ""


def combinations(
    checkpoints: list[CheckpointInfo], loras: list[LoraInfo], choices: LoraChoices, cache: HashCache | None = None
) -> tuple[list[CheckpointInfo], list[SkippedCheckpoint]]:
    """Every (LoRA, strength) on its chosen base, grouped by base (a build loads each base once)."""
    found, skipped = [], []
    order = {c.sha256: i for i, c in enumerate(checkpoints)}
    for lora in loras:
        base, why = choose_base(lora, checkpoints, choices, cache)
        if base is None:
            skipped.append(SkippedCheckpoint(lora.name, lora.path, why))
            continue
        found += [combination(base, lora, w) for w in choices.strengths_for(lora)]
    found.sort(key=lambda c: (order[c.lora.base.sha256], c.lora.name.lower(), c.lora.strength))
    return found, skipped


class LoraSource:
    """A host's checkpoints plus its checkpoint + LoRA combinations, as one :class:`CheckpointSource`.

    ``kinds``: which rows it lists (``checkpoints``, ``loras`` or ``both``); ``on_base``: only the LoRAs on this
    checkpoint (name or sha256: "LoRAs on the current checkpoint"). ``lora_files`` names the host's LoRA files;
    ``formats`` are the LoRA formats the host loads.
    """

    def __init__(
        self,
        checkpoints: CheckpointSource,
        lora_files: Callable[[], Iterable[tuple[str, Path]]],
        choices: LoraChoices | None = None,
        hash_cache: Path | None = None,
        kinds: str = "both",
        on_base: str | None = None,
        formats: frozenset[str] = ALL_FORMATS,
        host: str = "this host",
        on_hashing: Callable[[Path], None] | None = None,
    ):
        if kinds not in MODEL_KINDS:
            raise InvalidInput(f"models must be one of {', '.join(MODEL_KINDS)}, not {str(kinds)[:40]!r}")
        self.checkpoints, self.lora_files = checkpoints, lora_files
        self.choices = choices or LoraChoices()
        self.hash_cache, self.kinds, self.on_base = hash_cache, kinds, on_base
        self.formats, self.host, self.on_hashing = formats, host, on_hashing

    def list_checkpoints(self) -> CheckpointListing:
        base = self.checkpoints.list_checkpoints()
        listing = CheckpointListing()
        if self.kinds != "loras":
            listing.checkpoints += base.checkpoints
            listing.skipped += base.skipped
        if self.kinds == "checkpoints":
            return listing
        loras, skipped = list_lora_files(self.lora_files(), self.hash_cache, self.formats, self.host, self.on_hashing)
        cache = HashCache(self.hash_cache)
        found, unmatched = combinations(base.checkpoints, loras, self.choices, cache)
        cache.save()
        if self.on_base:
            found = [c for c in found if self.on_base in _names(c.lora.base)]
        listing.checkpoints += found
        listing.skipped += skipped + unmatched
        return listing


# -- A1111 prompt tags -------------------------------------------------------------------------
LORA_TAG = re.compile(r"\s*<lora:([^:>]+)(?::[^>]*)?>")


def prompt_tag(lora_name: str, strength: float) -> str:
    """``<lora:name:w>`` as A1111's built-in Lora network reads it (the network name is the file's stem)."""
    return f"<lora:{PurePath(lora_name.replace(chr(92), '/')).stem}:{format_strength(strength)}>"


def with_lora_tag(prompt: str, tag: str, replace: str | None = None) -> str:
    """``prompt`` with ``tag`` at its end. Taken out first: ``replace`` (the tag gmi put there before) and any tag of
    the same LoRA (a second tag would apply it twice)."""
    name = LORA_TAG.match(tag).group(1)
    if replace:
        prompt = prompt.replace(replace, "")
    prompt = LORA_TAG.sub(lambda m: "" if m.group(1) == name else m.group(0), prompt)
    prompt = prompt.rstrip(" ,")
    return f"{prompt} {tag}" if prompt else tag


def prompt_for(checkpoint: CheckpointInfo, prompt: str) -> str:
    """The prompt a host whose LoRAs are prompt tags (A1111) renders ``checkpoint`` with."""
    if checkpoint.lora is None:
        return prompt
    return with_lora_tag(prompt, prompt_tag(checkpoint.lora.name, checkpoint.lora.strength))


# -- LoRAs an image records (observed LoRA specs) ----------------------------------------------
def infotext_loras(prompt: str | None, lora_hashes: str | None) -> list[dict]:
    """[{"name", "strength", "hash"}] from an A1111 infotext: the prompt's ``<lora:name:w>`` tags (A1111 applies a
    tag without a weight at 1) and ``Lora hashes: "name: 0123456789ab, ..."`` (the addnet hash of each file)."""
    hashes = {}
    for item in (lora_hashes or "").split(","):
        name, sep, value = item.rpartition(":")
        if sep and name.strip():
            hashes[name.strip()] = value.strip().lower()
    found = {}
    for match in re.finditer(r"<lora:([^:>]+)(?::([^:>]*))?[^>]*>", prompt or ""):
        name = match.group(1).strip()
        try:
            strength = parse_strength(match.group(2) if match.group(2) not in (None, "") else 1.0)
        except InvalidInput:
            continue
        found[name] = {"name": name, "strength": strength, "hash": hashes.get(name)}
    return list(found.values())


def comfy_graph_loras(graph: dict) -> list[dict]:
    """[{"name", "strength", "hash": None}] of the LoRA loader nodes of a ComfyUI API graph (``lora_name`` with
    ``strength_model``; model-only loaders too)."""
    found = []
    for node in graph.values():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if not isinstance(inputs, dict) or not isinstance(inputs.get("lora_name"), str):
            continue
        strength = inputs.get("strength_model", inputs.get("strength", 1.0))
        if isinstance(strength, (int, float)) and strength != 0:
            found.append({"name": inputs["lora_name"], "strength": parse_strength(strength), "hash": None})
    return found


def comfy_workflow_loras(nodes: list[dict]) -> list[dict]:
    """The same for the active nodes of a ComfyUI editor graph (saved when no API graph was): LoRA loader widgets
    ``[lora_name, strength_model, ...]``."""
    found = []
    for node in nodes:
        values = node.get("widgets_values") or []
        if "LoraLoader" not in str(node.get("type", "")) or not values or not isinstance(values[0], str):
            continue
        strength = values[1] if len(values) > 1 and isinstance(values[1], (int, float)) else 1.0
        if strength != 0:
            found.append({"name": values[0], "strength": parse_strength(strength), "hash": None})
    return found


def addnet_hash(path: Path) -> str:
    """The hash A1111 records for a LoRA (``Lora hashes``): sha256 of the safetensors data after the header."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        handle.seek(8 + size)
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def observed_model(
    base: CheckpointInfo, recorded: list[dict], installed: list[LoraPart], hash_of: Callable[[Path], str]
) -> tuple[CheckpointInfo | None, str]:
    """The model an image was made with: ``base``, or ``base`` with the one LoRA it records at its strength, the
    LoRA found among the ``installed`` ones by its A1111 hash, else its name; (None, why) when that is not possible."""
    if not recorded:
        return base, ""
    if len(recorded) > 1:
        names = ", ".join(r["name"] for r in recorded)
        return None, f"{len(recorded)} LoRAs ({names}): ambiguous, a LoRA spec is one LoRA on a base"
    wanted = recorded[0]
    stem = PurePath(wanted["name"].replace("\\", "/")).stem
    found = None
    for part in installed:
        if wanted["hash"]:
            try:
                if hash_of(part.path).startswith(wanted["hash"]):
                    found = part
                    break
            except OSError:
                continue
        elif stem in (part.name, PurePath(part.name.replace("\\", "/")).stem):
            found = part
            break
    if found is None:
        return None, f"LoRA {wanted['name']!r} is not installed (or not listed as a LoRA spec)"
    lora = LoraInfo(found.name, found.path, found.sha256, base.family or "", "")
    return combination(base, lora, wanted["strength"]), ""
