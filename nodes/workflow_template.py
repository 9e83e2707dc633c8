"""The user's own workflow as the spec generator: a ComfyUI workflow (API format, or a saved UI workflow) with the
model loader, the positive prompt and the seed marked by node title (``gmi:model``, ``gmi:prompt``, ``gmi:seed``;
optionally ``gmi:image`` on the node whose IMAGE output is the picture). gmi runs it once per checkpoint, prompt and
seed, swapping only the model file name, the prompt text and the seed, so a family gmi does not know, a custom
sampler or a LoRA stack still gets specs rendered exactly as the user renders.

Each node runs through ComfyUI's own node call (``execution.get_output_data``: V1 and V3 nodes alike); output nodes
(SaveImage, PreviewImage) are not run. Nodes that do not depend on the prompt or seed run once per checkpoint.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ..gmi_core.errors import CheckpointError, InvalidInput
from ..gmi_core.families import FamilySettings
from ..gmi_core.paths import resolve_inside
from ..gmi_core.protocols import CheckpointInfo, GenerationSettings
from . import split_models

MARKS = ("gmi:model", "gmi:prompt", "gmi:seed")
IMAGE_MARK = "gmi:image"
MODEL_INPUTS = {"ckpt_name": "single", "unet_name": "split"}  # loader input -> the layout it loads
PROMPT_INPUTS = ("text", "prompt", "text_g")
SEED_INPUTS = ("seed", "noise_seed")
OUTPUT_NODES = {"SaveImage", "PreviewImage"}
UI_ONLY_NODES = {"Note", "MarkdownNote", "Reroute"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _title(node: dict) -> str:
    return str((node.get("_meta") or {}).get("title") or node.get("title") or "").strip().lower()


def _node_classes() -> dict:
    import nodes

    return nodes.NODE_CLASS_MAPPINGS


# -- reading a template --------------------------------------------------------------------------
def load_text(text: str) -> dict:
    """A workflow from the Build node's text: JSON, or the name of a workflow saved in ComfyUI's user workflows."""
    text = (text or "").strip()
    if not text.startswith("{"):
        import folder_paths

        folder = Path(folder_paths.get_user_directory()) / "default" / "workflows"
        name = text if text.endswith(".json") else text + ".json"
        try:
            text = resolve_inside(name, [folder], "workflow").read_text(encoding="utf-8")
        except (OSError, InvalidInput) as exc:
            raise InvalidInput(f"workflow template: no saved workflow {name!r} ({exc})") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise InvalidInput(f"workflow template is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InvalidInput("workflow template must be a JSON object (API format or a saved workflow)")
    return data


def _widget_values_taken(name: str, spec) -> int:
    """How many ``widgets_values`` entries an input takes in a saved UI workflow (the front end's rules)."""
    kind = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    options = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
    if options.get("forceInput") or not (isinstance(kind, list) or kind in WIDGET_TYPES):
        return 0
    control = options.get("control_after_generate")
    if control is None:
        control = kind == "INT" and name in SEED_INPUTS
    return 1 + bool(control) + bool(options.get("image_upload"))


def ui_to_api(workflow: dict) -> dict:
    """A saved UI workflow as API-format nodes (titles kept in ``_meta``), from the node classes' own inputs."""
    classes = _node_classes()
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt = {}
    for node in workflow.get("nodes", []):
        kind = node.get("type")
        if kind in UI_ONLY_NODES:
            continue
        if node.get("mode", 0) != 0:
            continue  # muted / bypassed: not part of the render
        if kind not in classes:
            raise InvalidInput(
                f"workflow template: node {node.get('id')} has type {kind!r}, which ComfyUI does not know"
            )
        types = classes[kind].INPUT_TYPES()
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for section in ("required", "optional"):
            for name, spec in (types.get(section) or {}).items():
                taken = _widget_values_taken(name, spec)
                if taken and values:
                    inputs[name] = values[0]
                    values = values[taken:]
        for slot in node.get("inputs", []):
            if slot.get("link") is not None and slot["link"] in links:
                _, origin, origin_slot, *_ = links[slot["link"]]
                inputs[slot["name"]] = [str(origin), origin_slot]
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs, "_meta": {"title": node.get("title", "")}}
    return prompt


@dataclass(frozen=True)
class Template:
    """A validated template: API-format nodes and where the model name, prompt, seed go and the image comes from."""

    nodes: dict
    model: tuple[str, str]  # (node id, input name)
    prompt: tuple[str, str]
    seed: tuple[str, str]
    image: tuple[str, int]  # (node id, output slot)
    digest: str

    @property
    def layout(self) -> str:
        return MODEL_INPUTS[self.model[1]]


def parse(text: str) -> Template:
    """The template from the Build node's text, validated: one clear error naming everything that is missing."""
    data = load_text(text)
    nodes = ui_to_api(data) if isinstance(data.get("nodes"), list) else data.get("prompt", data)
    return validate(nodes)


def _marked(nodes: dict, mark: str, inputs: Sequence[str]) -> tuple[str, str] | None:
    for node_id, node in nodes.items():
        if isinstance(node, dict) and _title(node) == mark:
            name = next((i for i in inputs if i in node.get("inputs", {})), None)
            return (node_id, name) if name else (node_id, "")
    return None


def validate(nodes: dict) -> Template:
    if not isinstance(nodes, dict) or not all(isinstance(n, dict) and "class_type" in n for n in nodes.values()):
        raise InvalidInput("workflow template: expected ComfyUI nodes (API format: {id: {class_type, inputs}})")
    classes = _node_classes()
    problems = [
        f"node {i} has unknown type {n['class_type']!r}" for i, n in nodes.items() if n["class_type"] not in classes
    ]
    found = {
        "gmi:model": (
            _marked(nodes, "gmi:model", tuple(MODEL_INPUTS)),
            "a checkpoint or UNet loader (ckpt_name/unet_name)",
        ),
        "gmi:prompt": (_marked(nodes, "gmi:prompt", PROMPT_INPUTS), "the positive prompt's text encode node (text)"),
        "gmi:seed": (_marked(nodes, "gmi:seed", SEED_INPUTS), "the sampler or noise node (seed/noise_seed)"),
    }
    for mark, (where, what) in found.items():
        if where is None:
            problems.append(f"no node titled {mark!r} ({what})")
        elif not where[1]:
            problems.append(f"node {where[0]} titled {mark!r} has no input for it ({what})")
    image = _image_source(nodes)
    if image is None:
        problems.append(
            f"no image to keep: title a node {IMAGE_MARK!r} or end the workflow in one SaveImage/PreviewImage"
        )
    if problems:
        raise InvalidInput("workflow template: " + "; ".join(problems))
    digest = hashlib.sha256(json.dumps(nodes, sort_keys=True).encode()).hexdigest()[:12]
    return Template(nodes, found["gmi:model"][0], found["gmi:prompt"][0], found["gmi:seed"][0], image, digest)


def _image_source(nodes: dict) -> tuple[str, int] | None:
    marked = [i for i, n in nodes.items() if _title(n) == IMAGE_MARK]
    if marked:
        return marked[0], 0
    outputs = [
        n for n in nodes.values() if n["class_type"] in OUTPUT_NODES and isinstance(n["inputs"].get("images"), list)
    ]
    if len(outputs) != 1:
        return None
    origin, slot = outputs[0]["inputs"]["images"]
    return str(origin), int(slot)


def with_template(settings: FamilySettings, template: Template | None) -> FamilySettings:
    """Every family's row records the template (its digest): specs of another generator are 'other settings'."""
    if template is None:
        return settings
    return FamilySettings(tuple((f, replace(row, workflow=f"template {template.digest}")) for f, row in settings.rows))


# -- running it ----------------------------------------------------------------------------------
def _run_node(node_id: str, class_type: str, inputs: dict) -> list:
    """One node through ComfyUI's own node call (V1/V3, async nodes), in a thread with its own event loop: the
    Build node itself runs inside ComfyUI's executor loop."""
    import execution

    obj = _node_classes()[class_type]()
    data = {name: [value] for name, value in inputs.items()}

    async def call():
        return await execution.get_output_data(f"gmi-template-{node_id}", node_id, obj, data)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        output, _, has_subgraph, pending = pool.submit(asyncio.run, call()).result()
    if has_subgraph or pending:
        raise CheckpointError(f"workflow template: node {node_id} ({class_type}) expands or defers; gmi cannot run it")
    return [values[0] if values else None for values in output]


class TemplateGenerator:
    """A Generator running the template per seed; nodes independent of prompt and seed are kept per checkpoint."""

    def __init__(self, template: Template, on_image=None):
        self.template = template
        self.on_image = on_image
        self._checkpoint: str | None = None
        self._kept: dict[str, list] = {}
        self._varying = self._downstream({template.prompt[0], template.seed[0]})

    def _downstream(self, roots: set[str]) -> set[str]:
        found, changed = set(roots), True
        while changed:
            changed = False
            for node_id, node in self.template.nodes.items():
                if node_id not in found and any(
                    isinstance(v, list) and str(v[0]) in found for v in node["inputs"].values()
                ):
                    found.add(node_id)
                    changed = True
        return found

    def _model_name(self, checkpoint: CheckpointInfo) -> str:
        if checkpoint.layout != self.template.layout:
            loader = "UNETLoader" if checkpoint.layout == "split" else "a checkpoint loader"
            raise CheckpointError(
                f"workflow template loads {'split diffusion models' if self.template.layout == 'split' else 'checkpoints'}"
                f"; {checkpoint.name} needs {loader} as its gmi:model node"
            )
        prefix = split_models.SPLIT_PREFIX
        return checkpoint.name[len(prefix) :] if checkpoint.name.startswith(prefix) else checkpoint.name

    def _value(self, node_id: str, slot: int, values: dict, cache: dict):
        import comfy.model_management as mm

        key = str(node_id)
        if key not in cache:
            node = values[key]
            inputs = {
                name: self._value(v[0], v[1], values, cache) if isinstance(v, list) and len(v) == 2 else v
                for name, v in node["inputs"].items()
            }
            mm.throw_exception_if_processing_interrupted()
            cache[key] = _run_node(key, node["class_type"], inputs)
            if key not in self._varying:
                self._kept[key] = cache[key]
        return cache[key][slot]

    def generate(self, checkpoint: CheckpointInfo, prompt: str, seeds: Sequence[int], settings: GenerationSettings):
        from .host import tensor_to_pils

        name = self._model_name(checkpoint)
        if self._checkpoint != checkpoint.name:
            self.release()
            self._checkpoint = checkpoint.name
        images = []
        for seed in seeds:
            values = json.loads(json.dumps(self.template.nodes))
            for (node_id, field), value in (
                (self.template.model, name),
                (self.template.prompt, prompt),
                (self.template.seed, int(seed)),
            ):
                values[node_id]["inputs"][field] = value
            cache = dict(self._kept)
            image = self._value(*self.template.image, values, cache)
            images += tensor_to_pils(image)[:1]
            if self.on_image:
                self.on_image(1)
        return images

    def release(self) -> None:
        if self._checkpoint is None:
            return
        self._checkpoint, self._kept = None, {}
        import gc

        import comfy.model_management as mm

        mm.unload_all_models()
        mm.soft_empty_cache()
        gc.collect()
