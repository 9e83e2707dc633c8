"""Shareable spec files: export specs from the store, import them into another store.

The format is specified in docs/spec-format.md. In short: one safetensors file (no pickle, no code)
holding one or more specs; JSON metadata under the header key ``gmi_spec_exchange``. The default
encoding is compact: image features as int8 with a power-of-two scale per row, pixel features as
int4 (two per byte) with the same kind of scale, prompt features left out when the prompt set is a
built-in one (the importer re-derives them from the encoder and checks the prompt-set hash), and no
thumbnails. A power-of-two scale makes decoding exact in fp16, so import -> export reproduces the
file byte for byte. ``lossless=True`` keeps the stored fp16 tensors as they are.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import Busy, GmiError, SpecError
from .families import RECIPE_SETTINGS, GenerationSettings
from .locks import spec_lock
from .observed import OBSERVED, spec_counts, spec_kind
from .paths import atomic_write, shown
from .prompts import BUILTIN_SETS, PromptSet, load_prompt_set
from .spec import THUMBNAIL_SIZE, Spec, SpecKey, _content_hash
from .store import SpecStore

FORMAT = "gmi-spec-exchange"
VERSION = 2  # 2: per-image mask image_done [N, S] (budgets); version 1 carried done [N]
HEADER_KEY = "gmi_spec_exchange"
MAX_FILE_BYTES = 256 * 1024 * 1024  # far above any real library export; refuses absurd files early
MAX_SPECS_PER_FILE = 100_000
_ENCODER_ID = re.compile(r"[A-Za-z0-9._/\-\[\]:]{1,200}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_EXP_RANGE = (-64, 16)  # power-of-two exponents a unit-vector row can need
INT8, INT4, FP16 = "int8-pow2-rowscale", "int4-pow2-rowscale", "fp16"


# -- quantisation ------------------------------------------------------------------------------
def quantise(x: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 in [-qmax, qmax], e int8) with x ~ q * 2**e per row (last dim). Idempotent on its output."""
    x = x.float()
    absmax = x.abs().amax(dim=-1)
    mantissa, exponent = torch.frexp(absmax / qmax)  # absmax/qmax = mantissa * 2**exponent, mantissa in [0.5, 1)
    e = torch.where(mantissa == 0.5, exponent - 1, exponent)  # smallest e with absmax/qmax <= 2**e
    e = torch.where(absmax > 0, e, torch.full_like(e, _EXP_RANGE[0])).clamp(*_EXP_RANGE)
    q = torch.round(x / torch.exp2(e.float())[..., None]).clamp(-qmax, qmax)
    return q.to(torch.int8), e.to(torch.int8)


def dequantise(q: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """fp16 values q * 2**e (exact in fp16 for the exponents unit vectors need)."""
    return (q.float() * torch.exp2(e.float())[..., None]).to(torch.float16)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    low, high = (packed & 0x0F).to(torch.int16) - 8, (packed >> 4).to(torch.int16) - 8
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], -1).to(torch.int8)


# -- export --------------------------------------------------------------------------------------
def builtin_prompt_set(name: str, count: int) -> PromptSet:
    """A built-in set, or its first ``count`` prompts (what a host's "max prompts" option builds)."""
    full = load_prompt_set(name)
    return full if count == len(full) else full.head(count)


def builtin_set_name(prompt_set_hash: str, count: int) -> str | None:
    for name in BUILTIN_SETS:
        if count <= len(load_prompt_set(name)) and builtin_prompt_set(name, count).hash == prompt_set_hash:
            return name
    return None


def encode_spec(spec: Spec, prefix: str, thumbnails: bool = False, lossless: bool = False) -> tuple[dict, dict]:
    """(tensors with ``prefix``, metadata entry) of one spec."""
    builtin = builtin_set_name(spec.prompt_set_hash, spec.n_prompts)
    tensors = {f"{prefix}image_done": spec.image_done.to(torch.uint8).contiguous()}
    encoding = {}
    if lossless:
        tensors[f"{prefix}image_features"] = spec.image_features.to(torch.float16).contiguous()
        tensors[f"{prefix}pixel_features"] = spec.pixel_features.to(torch.float16).contiguous()
        encoding.update(image_features=FP16, pixel_features=FP16)
    else:
        q, e = quantise(spec.image_features, 127)
        tensors[f"{prefix}image_q"], tensors[f"{prefix}image_exp"] = q, e
        pq, pe = quantise(spec.pixel_features, 7)
        tensors[f"{prefix}pixel_q4"], tensors[f"{prefix}pixel_exp"] = pack_int4(pq), pe
        encoding.update(image_features=INT8, pixel_features=INT4)
    if builtin:
        encoding["prompt_features"] = "omitted: built-in prompt set, re-derived by the importer"
    elif lossless:
        tensors[f"{prefix}prompt_features"] = spec.prompt_features.to(torch.float16).contiguous()
        encoding["prompt_features"] = FP16
    else:
        tensors[f"{prefix}prompt_q"], tensors[f"{prefix}prompt_exp"] = quantise(spec.prompt_features, 127)
        encoding["prompt_features"] = INT8
    if thumbnails:
        tensors[f"{prefix}thumbnails"] = spec.thumbnails.contiguous()
    encoding["thumbnails"] = "uint8" if thumbnails else "omitted"
    n, s = spec.n_prompts, spec.images_per_prompt
    done = int(spec.done.sum())
    images = sum(spec.image_counts)
    kind = spec_kind(spec)
    entry = {
        "prefix": prefix,
        "checkpoint": {"name": spec.checkpoint_name, "sha256": spec.sha256, "autov2": spec.sha256[:10]},
        "encoder_id": spec.encoder_id,
        "prompt_set": {
            "name": spec.prompt_set_name,
            "hash": spec.prompt_set_hash,
            "builtin": builtin,
            **({} if builtin else {"prompts": spec.prompts}),
        },
        "kind": kind,
        "counts": spec_counts(spec),
        "settings": spec.settings.to_dict(),
        "budget": {"prompts": n, "prompts_done": done, "images_per_prompt": s, "images": images},
        "seeds": spec.seeds,
        "encoding": encoding,
        "popularity": spec.extra.get("popularity"),
    }
    return tensors, entry


def write_exchange(specs: Sequence[Spec], out: Path, thumbnails: bool = False, lossless: bool = False) -> Path:
    if not specs:
        raise GmiError("no specs to export")
    tensors, entries = {}, []
    for index, spec in enumerate(specs):
        t, entry = encode_spec(spec, f"s{index}.", thumbnails, lossless)
        tensors.update(t)
        entries.append(entry)
    meta = {"format": FORMAT, "version": VERSION, "specs": entries}
    meta["content_sha256"] = _content_hash(tensors, meta)  # over the tensors and the metadata, as local spec files
    out = Path(out)
    with atomic_write(out) as tmp:
        save_file(tensors, tmp, metadata={HEADER_KEY: json.dumps(meta, sort_keys=True)})
    return out


def is_exchange_file(path: Path) -> bool:
    """A spec exchange file (``gmi export`` wrote it): its header names the format."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return HEADER_KEY in (handle.metadata() or {})
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False


def exportable_specs(
    store: SpecStore, encoder_id: str | None = None, prompt_set_hash: str | None = None, shas: set[str] | None = None
) -> list[Spec]:
    """Specs in the store (optionally of one encoder, one prompt set plus observed specs, some checkpoints)."""
    specs = []
    for entry in store.entries():
        if encoder_id and entry.encoder_id != encoder_id:
            continue
        if prompt_set_hash and entry.prompt_set_hash not in (prompt_set_hash, OBSERVED):
            continue
        if shas is not None and entry.sha256 not in shas:
            continue
        spec = store.load(entry.key)
        if spec is not None and spec.done.any():
            specs.append(spec)
    return specs


# -- import --------------------------------------------------------------------------------------
@dataclass
class ImportAction:
    file: str
    checkpoint: str
    sha256: str
    action: str  # added, replaced, kept-local, identical, rejected
    detail: str = ""


@dataclass
class ImportReport:
    actions: list[ImportAction] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "actions": [a.__dict__ for a in self.actions],
            "summary": {
                k: sum(a.action == k for a in self.actions)
                for k in ("added", "replaced", "kept-local", "identical", "rejected")
            },
        }


PromptFeatures = Callable[[str, PromptSet], "torch.Tensor | None"]


def read_exchange(path: Path, prompt_features: PromptFeatures) -> list[tuple[str, Spec | None, str]]:
    """(checkpoint label, spec or None, reason) for each spec in the file; GmiError if the file is unusable."""
    path = Path(path)
    meta, tensors = _read_checked(path)
    entries = meta.get("specs")
    if (
        not isinstance(entries, list)
        or not 0 < len(entries) <= MAX_SPECS_PER_FILE
        or not all(isinstance(e, dict) for e in entries)
    ):
        raise GmiError(f"{shown(path, 1)}: no spec list")
    prefixes = [e.get("prefix") for e in entries]
    if not all(isinstance(p, str) and p for p in prefixes) or len(set(prefixes)) != len(prefixes):
        raise GmiError(f"{shown(path, 1)}: spec prefixes missing or repeated")
    claimed = {name for name in tensors if any(name.startswith(p) for p in prefixes)}
    if claimed != set(tensors):
        raise GmiError(f"{shown(path, 1)}: tensors and spec list do not match")
    out = []
    for entry in entries:
        label = str(entry["checkpoint"].get("name", "?"))[:200] if isinstance(entry.get("checkpoint"), dict) else "?"
        try:
            out.append((label, decode_spec(entry, tensors, prompt_features), ""))
        except (SpecError, KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as exc:
            out.append((label, None, f"invalid spec: {exc}"))
    return out


def _read_checked(path: Path) -> tuple[dict, dict]:
    """(metadata, tensors) of an exchange file of this gmi's format and version whose checksum holds; else GmiError."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise GmiError(f"{shown(path, 1)}: cannot read ({exc})") from exc
    if size > MAX_FILE_BYTES:
        raise GmiError(f"{shown(path, 1)}: {size} bytes is more than a spec file may hold ({MAX_FILE_BYTES})")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise GmiError(f"{shown(path, 1)}: not a readable safetensors file ({str(exc).splitlines()[0][:200]})") from exc
    try:
        meta = json.loads(header[HEADER_KEY])
    except (KeyError, ValueError) as exc:
        raise GmiError(f"{shown(path, 1)}: not a gmi spec file (no {HEADER_KEY} metadata)") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise GmiError(
            f"{shown(path, 1)}: not a gmi spec file (format {meta.get('format') if isinstance(meta, dict) else None!r})"
        )
    if meta.get("version") != VERSION:
        raise GmiError(f"{shown(path, 1)}: spec file version {meta.get('version')!r}; this gmi reads version {VERSION}")
    try:
        intact = _content_hash(tensors, meta) == meta.get("content_sha256")
    except (TypeError, ValueError):  # metadata JSON cannot hold (NaN, odd types): not a file this gmi wrote
        intact = False
    if not intact:
        raise GmiError(f"{shown(path, 1)}: content checksum mismatch (file damaged or edited)")
    return meta, tensors


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise SpecError(what)


def _str(value, what: str) -> str:
    _need(isinstance(value, str), f"{what} is not a string")
    return value


def _tensor(tensors: dict, name: str, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    _need(name in tensors, f"missing tensor {name}")
    t = tensors[name]
    _need(t.dtype == dtype, f"{name} has dtype {t.dtype}, expected {dtype}")
    _need(
        len(t.shape) == len(shape) and all(w in (-1, g) for g, w in zip(t.shape, shape)),
        f"{name} has shape {tuple(t.shape)}, expected {shape}",
    )
    return t


def _exponents(t: torch.Tensor, name: str) -> torch.Tensor:
    _need(bool(((t >= _EXP_RANGE[0]) & (t <= _EXP_RANGE[1])).all()), f"{name} exponents out of range")
    return t


def decode_spec(entry: dict, tensors: dict, prompt_features: PromptFeatures) -> Spec:
    """One validated Spec from a metadata entry and the file's tensors."""
    prefix, ckpt = entry["prefix"], entry["checkpoint"]
    _need(isinstance(ckpt, dict), "checkpoint is not an object")
    sha, encoder_id = _str(ckpt["sha256"], "sha256"), _str(entry["encoder_id"], "encoder_id")
    _need(bool(_HEX64.fullmatch(sha)), "checkpoint sha256 is not 64 lower-case hex digits")
    _need(ckpt.get("autov2") == sha[:10], "AutoV2 short hash does not match the sha256")
    _need(bool(_ENCODER_ID.fullmatch(encoder_id)) and ".." not in encoder_id, f"bad encoder id {encoder_id!r}")
    name = _str(ckpt["name"], "checkpoint name")
    _need(0 < len(name) <= 300 and "\x00" not in name, "bad checkpoint name")
    kind = entry["kind"]
    _need(kind in ("generated", OBSERVED), f"unknown spec kind {kind!r}")
    ps, budget, enc = entry["prompt_set"], entry["budget"], entry["encoding"]
    _need(all(isinstance(x, dict) for x in (ps, budget, enc, entry["settings"], entry["counts"])), "malformed metadata")
    _str(ps["name"], "prompt set name"), _str(ps["hash"], "prompt set hash")
    n, s = int(budget["prompts"]), int(budget["images_per_prompt"])
    _need(0 < n <= 100_000 and 0 < s <= 1024, "budget out of range")
    done = _tensor(tensors, f"{prefix}image_done", torch.uint8, (n, s))
    _need(bool((done <= 1).all()), "image_done mask is not 0/1")
    if enc["image_features"] == FP16:
        image = _tensor(tensors, f"{prefix}image_features", torch.float16, (n, s, -1))
        pixel = _tensor(tensors, f"{prefix}pixel_features", torch.float16, (n, s, -1))
    else:
        _need(enc["image_features"] == INT8 and enc["pixel_features"] == INT4, "unknown feature encoding")
        q = _tensor(tensors, f"{prefix}image_q", torch.int8, (n, s, -1))
        _need(bool((q.abs() <= 127).all()), "image_q out of range")
        image = dequantise(q, _exponents(_tensor(tensors, f"{prefix}image_exp", torch.int8, (n, s)), "image"))
        p4 = _tensor(tensors, f"{prefix}pixel_q4", torch.uint8, (n, s, -1))
        pq = unpack_int4(p4)
        _need(bool((pq.abs() <= 7).all()), "pixel_q4 out of range")
        pixel = dequantise(pq, _exponents(_tensor(tensors, f"{prefix}pixel_exp", torch.int8, (n, s)), "pixel"))
    d = image.shape[-1]
    builtin = ps.get("builtin")
    if builtin:
        _need(builtin in BUILTIN_SETS, f"unknown built-in prompt set {builtin!r}")
        _need(n <= len(load_prompt_set(builtin)), "more prompts than the built-in set has")
        prompt_set = builtin_prompt_set(builtin, n)
        _need(
            prompt_set.hash == ps["hash"],
            f"prompt set {builtin!r} hash {ps['hash']} differs from this gmi's {prompt_set.hash}",
        )
        prompts = list(prompt_set.prompts)
        features = prompt_features(encoder_id, prompt_set)
        _need(
            features is not None,
            f"its prompt features need encoder {encoder_id} (not loaded here) or a local spec of it",
        )
        features = features.to(torch.float16)
    else:
        _need(isinstance(ps["prompts"], list), "prompts are not a list")
        prompts = [_str(p, "prompt") for p in ps["prompts"]]
        if kind == OBSERVED:
            _need(ps["hash"] == OBSERVED, "observed spec with a prompt-set hash")
        else:
            _need(
                PromptSet(ps["name"], tuple(prompts)).hash == ps["hash"], "prompt-set hash does not match its prompts"
            )
        if enc["prompt_features"] == FP16:
            features = _tensor(tensors, f"{prefix}prompt_features", torch.float16, (n, d))
        else:
            _need(enc["prompt_features"] == INT8, "unknown prompt feature encoding")
            features = dequantise(
                _tensor(tensors, f"{prefix}prompt_q", torch.int8, (n, d)),
                _exponents(_tensor(tensors, f"{prefix}prompt_exp", torch.int8, (n,)), "prompt"),
            )
    _need(len(prompts) == n and tuple(features.shape) == (n, d), "prompt count or feature size does not match")
    if f"{prefix}thumbnails" in tensors:
        thumbs = _tensor(tensors, f"{prefix}thumbnails", torch.uint8, (n, THUMBNAIL_SIZE, THUMBNAIL_SIZE, 3))
    else:
        thumbs = torch.zeros(n, THUMBNAIL_SIZE, THUMBNAIL_SIZE, 3, dtype=torch.uint8)
    seeds = [[int(x) for x in row] for row in entry["seeds"]]
    extra = {"imported": True, "kind": kind}
    if kind == OBSERVED:
        extra["counts"] = {k: int(v) for k, v in entry["counts"].items()}
    popularity = entry.get("popularity")
    _need(
        popularity is None
        or (isinstance(popularity, (int, float)) and not isinstance(popularity, bool) and popularity >= 0),
        "bad popularity",
    )
    if popularity is not None:
        extra["popularity"] = float(popularity)
    spec = Spec(
        checkpoint_name=name,
        sha256=sha,
        encoder_id=encoder_id,
        prompt_set_name=str(ps["name"]),
        prompt_set_hash=str(ps["hash"]),
        prompts=prompts,
        seeds=seeds,
        settings=_settings(entry["settings"]),
        image_features=image.contiguous(),
        prompt_features=features.contiguous(),
        pixel_features=pixel.contiguous(),
        thumbnails=thumbs.contiguous(),
        image_done=done.bool(),
        extra=extra,
    )
    _need(int(spec.done.sum()) == int(budget["prompts_done"]), "budget does not match the image_done mask")
    _need(int(budget["images"]) == sum(spec.image_counts), "budget images do not match the image_done mask")
    counts = entry["counts"]
    want = {
        "generated_images": int(budget["images"]) if kind == "generated" else 0,
        "observed_images": int(budget["images"]) if kind == OBSERVED else 0,
    }
    _need(counts == want, f"counts {counts} do not match the budget")
    spec.validate("imported spec")
    return spec


def _settings(data: dict) -> GenerationSettings:
    """Every field of GenerationSettings, each of its declared type (no silent defaults); later fields are ignored."""
    defaults = GenerationSettings().to_dict()
    required = set(defaults) - set(RECIPE_SETTINGS)  # specs exported before the family recipes lack those
    _need(required <= set(data), f"settings lack {sorted(required - set(data))}")
    for key, default in defaults.items():
        if key not in data:
            continue
        value = data[key]
        if default is None:  # an optional number
            ok = value is None or isinstance(value, (int, float))
        else:
            ok = isinstance(value, (int, float)) if isinstance(default, float) else isinstance(value, type(default))
        _need(ok and not isinstance(value, bool), f"setting {key} has the wrong type")
    return GenerationSettings.from_dict(data)


def _images(spec: Spec) -> int:
    return sum(spec.image_counts)


def import_files(store: SpecStore, paths: Sequence[Path], prompt_features: PromptFeatures) -> ImportReport:
    """Validate and add specs; a local spec is replaced only by one with more finished images."""
    report = ImportReport()
    for path in paths:
        try:
            decoded = read_exchange(Path(path), prompt_features)
        except GmiError as exc:
            report.actions.append(ImportAction(str(path), "", "", "rejected", str(exc)))
            continue
        for label, spec, reason in decoded:
            if spec is None:
                report.actions.append(ImportAction(str(path), label, "", "rejected", reason))
                continue
            key = SpecKey(spec.sha256, spec.encoder_id, spec.prompt_set_hash)
            try:
                with spec_lock(store.path_for(key)):  # a build of this spec in progress: compare after, not during
                    report.actions.append(_store_one(store, spec, str(path)))
            except Busy as exc:
                report.actions.append(ImportAction(str(path), spec.checkpoint_name, spec.sha256, "rejected", str(exc)))
    return report


def _store_one(store: SpecStore, spec: Spec, path: str) -> ImportAction:
    key = SpecKey(spec.sha256, spec.encoder_id, spec.prompt_set_hash)
    try:
        local = store.load(key)
    except SpecError as exc:
        store.quarantine(key, str(exc))
        local = None
    if local is not None:
        if _content_hash(local._tensors(), {}) == _content_hash(spec._tensors(), {}):
            return ImportAction(path, spec.checkpoint_name, spec.sha256, "identical", "the same spec is already here")
        if _images(local) >= _images(spec):
            return ImportAction(
                path,
                spec.checkpoint_name,
                spec.sha256,
                "kept-local",
                f"local spec has {_images(local)} images, imported {_images(spec)}",
            )
        spec.checkpoint_name = local.checkpoint_name
    store.save(spec)
    action = "replaced" if local is not None else "added"
    return ImportAction(path, spec.checkpoint_name, spec.sha256, action, f"{_images(spec)} images, {spec_kind(spec)}")


def local_prompt_features(store: SpecStore, encoder=None) -> PromptFeatures:
    """Prompt features from ``encoder`` when it is the spec's, else from a local spec of that encoder and set."""

    def derive(encoder_id: str, prompt_set: PromptSet):
        if encoder is not None and encoder.encoder_id == encoder_id:
            return encoder.encode_texts(list(prompt_set.prompts))
        for entry in store.entries():
            if entry.encoder_id == encoder_id and entry.prompt_set_hash == prompt_set.hash:
                try:
                    spec = store.load(entry.key)
                except SpecError:
                    continue
                if spec is not None:
                    return spec.prompt_features
        return None

    return derive
