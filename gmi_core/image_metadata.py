"""What an image file says about how it was made: the A1111 infotext and the ComfyUI graph.

Read without decoding pixels where the format allows (PNG text chunks before the image data,
EXIF in JPEG/WebP headers). Nothing here guesses: it returns what the file records.

* A1111 / Forge: PNG text chunk ``parameters``; JPEG and WebP: EXIF UserComment. The last line of
  the infotext holds ``Steps: 20, Sampler: ..., Seed: 1, Model hash: 0123456789, Model: name, ...``.
* ComfyUI: PNG text chunks ``prompt`` (the API graph that ran) and ``workflow`` (the editor graph);
  the checkpoint is the ``ckpt_name`` of its checkpoint loader node(s).
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .errors import ImageError
from .loras import comfy_graph_loras, comfy_workflow_loras, infotext_loras

_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # A1111's own pattern
_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286
_TEXT_INPUTS = ("text", "text_g", "text_l", "string", "value", "prompt")
_MAX_HOPS = 8


@dataclass
class ImageMetadata:
    source: str = ""  # "a1111", "comfyui-prompt", "comfyui-workflow" or "" (none)
    prompt: str | None = None
    seed: int | None = None
    model_hash: str | None = None  # A1111 "Model hash:" (10 hex AutoV2, 8 hex legacy, or 64 hex)
    model_name: str | None = None  # A1111 "Model:"
    checkpoint_names: list[str] = field(default_factory=list)  # ComfyUI loader ckpt_name values
    problem: str | None = None  # metadata present but unusable (e.g. a loader fed by a link)
    tile_size: tuple[int, int] | None = None  # A1111: one image's pixels per the infotext (Size, after hires fix)
    pixel_size: tuple[int, int] | None = None  # the file's own (width, height)
    loras: list[dict] = field(default_factory=list)  # [{"name", "strength", "hash"}] (gmi_core.loras)


def parse_infotext(text: str) -> ImageMetadata:
    """A1111 infotext: prompt lines, ``Negative prompt:`` lines, and the ``key: value`` last line."""
    lines = text.strip().split("\n")
    last = lines[-1] if lines else ""
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt_lines = []
    for line in lines[:-1]:
        if line.strip().startswith("Negative prompt:"):
            break
        prompt_lines.append(line.strip())
    params = {}
    for key, value in _PARAM.findall(last):
        value = value.strip()
        if len(value) > 1 and value[0] == '"' and value[-1] == '"':
            with contextlib.suppress(ValueError):
                value = json.loads(value)
        params[key.strip()] = value
    seed = params.get("Seed", "")
    meta = ImageMetadata(
        source="a1111",
        prompt="\n".join(prompt_lines).strip() or None,
        seed=int(seed) if str(seed).lstrip("-").isdigit() else None,
        model_hash=(params.get("Model hash") or "").strip().lower() or None,
        model_name=(params.get("Model") or "").strip() or None,
        tile_size=_tile_size(params),
    )
    meta.loras = infotext_loras(meta.prompt, params.get("Lora hashes"))
    # a refiner or a hires-fix checkpoint means a second checkpoint drew part of the image
    others = [params.get(k, "").strip() for k in ("Refiner", "Hires checkpoint")]
    others = [o for o in others if o and o.lower() != "use same checkpoint"]
    if others:
        meta.checkpoint_names = [meta.model_name or meta.model_hash or "?", *others]
    return meta


def _link(value) -> str | None:
    """A ComfyUI API-graph link is [node_id, output_index]."""
    if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
        return str(value[0])
    return None


def _text_from(graph: dict, node_id: str | None) -> str | None:
    """The first text found walking up the graph from ``node_id`` (through conditioning nodes)."""
    frontier, seen = [node_id], set()
    for _ in range(_MAX_HOPS):
        following = []
        for nid in frontier:
            node = graph.get(nid) if nid is not None else None
            if nid in seen or not isinstance(node, dict):
                continue
            seen.add(nid)
            inputs = node.get("inputs") or {}
            for key in _TEXT_INPUTS:
                if isinstance(inputs.get(key), str) and inputs[key].strip():
                    return inputs[key].strip()
            following += [_link(v) for v in inputs.values() if _link(v)]
        frontier = following
        if not frontier:
            break
    return None


def parse_comfy_prompt(graph: dict) -> ImageMetadata:
    """The API graph: checkpoint loaders' ``ckpt_name``; the positive prompt and seed of the first sampler."""
    meta = ImageMetadata(source="comfyui-prompt")
    nodes = {str(k): v for k, v in graph.items() if isinstance(v, dict)}
    names = []
    for node in nodes.values():
        value = (node.get("inputs") or {}).get("ckpt_name")
        if isinstance(value, str) and value not in names:
            names.append(value)
        elif value is not None and not isinstance(value, str):
            meta.problem = "a checkpoint loader takes its ckpt_name from another node"
    meta.checkpoint_names = names
    meta.loras = comfy_graph_loras(nodes)
    samplers = sorted((k for k, v in nodes.items() if "positive" in (v.get("inputs") or {})), key=_node_order)
    for nid in samplers:
        inputs = nodes[nid]["inputs"]
        meta.prompt = meta.prompt or _text_from(nodes, _link(inputs.get("positive")))
        for key in ("seed", "noise_seed"):
            if meta.seed is None and isinstance(inputs.get(key), int):
                meta.seed = inputs[key]
    return meta


def parse_comfy_workflow(workflow: dict) -> ImageMetadata:
    """The editor graph (when no API graph was saved): checkpoint and LoRA loader widgets only; the prompt is not
    linked reliably."""
    meta = ImageMetadata(source="comfyui-workflow")
    nodes = workflow.get("nodes") or []
    active = [n for n in nodes if isinstance(n, dict) and n.get("mode") not in (2, 4)]  # not muted or bypassed
    for node in active:
        if "CheckpointLoader" not in str(node.get("type", "")):
            continue
        values = node.get("widgets_values") or []
        if values and isinstance(values[0], str) and values[0] not in meta.checkpoint_names:
            meta.checkpoint_names.append(values[0])
    meta.loras = comfy_workflow_loras(active)
    return meta


def _node_order(node_id: str):
    return (0, int(node_id)) if node_id.isdigit() else (1, node_id)


def decode_user_comment(raw) -> str:
    """EXIF UserComment: an 8-byte charset prefix, then the text (A1111 writes UNICODE, UTF-16)."""
    if isinstance(raw, str):
        return raw.strip("\x00").strip()
    raw = bytes(raw)
    prefix, body = raw[:8], raw[8:]
    if prefix.startswith(b"UNICODE"):
        candidates = [body.decode(enc, errors="replace") for enc in ("utf-16-be", "utf-16-le")]
        return max(candidates, key=lambda t: sum(c.isascii() and c.isprintable() for c in t)).strip("\x00").strip()
    if prefix.startswith(b"ASCII"):
        return body.decode("ascii", errors="replace").strip("\x00").strip()
    return raw.decode("utf-8", errors="replace").strip("\x00").strip()


def _png_text_after_data(path: Path) -> bool:
    """Whether a PNG has text chunks after IDAT, found by walking chunk headers (nothing is decoded)."""
    seen_data = False
    with open(path, "rb") as handle:
        handle.seek(8)
        while True:
            header = handle.read(8)
            if len(header) < 8:
                return False
            length, kind = int.from_bytes(header[:4], "big"), header[4:]
            if kind == b"IDAT":
                seen_data = True
            elif seen_data and kind in (b"tEXt", b"zTXt", b"iTXt"):
                return True
            elif kind == b"IEND":
                return False
            handle.seek(length + 4, 1)


def _size(text) -> tuple[int, int] | None:
    match = re.fullmatch(r"\s*(\d{1,5})x(\d{1,5})\s*", str(text or ""))
    return (int(match[1]), int(match[2])) if match and int(match[1]) and int(match[2]) else None


def _tile_size(params: dict) -> tuple[int, int] | None:
    """The pixel size of one generated image as A1111 computes it (``Size``, then ``Hires resize`` or ``int(Size x
    Hires upscale)``); None where the infotext cannot tell (an upscaler ran after, a resize with a 0 side)."""
    if any("upscale" in key.lower() and not key.startswith("Hires") for key in params):
        return None  # Extras / upscaler scripts: the image is larger than Size on purpose
    size = _size(params.get("Size"))
    if size is None:
        return None
    if "Hires resize" in params:
        return _size(params["Hires resize"])
    if "Hires upscale" in params:
        try:
            scale = float(params["Hires upscale"])
        except ValueError:
            return None
        return (int(size[0] * scale), int(size[1] * scale))
    return size


def read_metadata(path: Path) -> ImageMetadata:
    """The generation metadata of one image file; ImageError when it is not a readable image.

    Metadata that cannot be parsed (odd graphs, wrong types) yields ``problem`` instead of an exception.
    """
    texts, comment, pixel_size = _raw_metadata(path)
    try:
        meta = _parse(texts, comment)
    except (AttributeError, TypeError, ValueError, KeyError, IndexError, RecursionError) as exc:
        meta = ImageMetadata(source="unparsable", problem=f"unparsable generation metadata ({type(exc).__name__})")
    meta.pixel_size = pixel_size
    return meta


def _raw_metadata(path: Path) -> tuple[dict, object, tuple[int, int]]:
    try:
        with Image.open(path) as image:
            pixel_size = tuple(image.size)
            texts = dict(getattr(image, "text", None) or {}) if image.format == "PNG" else {}
            if image.format == "PNG" and not texts and _png_text_after_data(path):
                image.load()  # text chunks after the image data are read only on load
                texts = dict(image.text or {})
            comment = None
            if image.format in ("JPEG", "WEBP", "MPO", "TIFF"):
                comment = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    except UnidentifiedImageError as exc:
        raise ImageError(f"{path.name}: not an image file PIL can read") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{path.name}: unreadable or truncated image ({exc})") from exc
    return texts, comment, pixel_size


def _parse(texts: dict, comment) -> ImageMetadata:
    if texts.get("prompt"):
        try:
            graph = json.loads(texts["prompt"])
            if isinstance(graph, dict):
                return parse_comfy_prompt(graph)
        except ValueError:
            pass
    if texts.get("parameters"):
        return parse_infotext(texts["parameters"])
    if texts.get("workflow"):
        try:
            return parse_comfy_workflow(json.loads(texts["workflow"]))
        except (ValueError, AttributeError):
            pass
    if comment:
        text = decode_user_comment(comment)
        if text:
            return parse_infotext(text)
    return ImageMetadata()
