"""UI-format workflows (as the ComfyUI front end saves them, e.g. example_workflows/*.json) to the API prompt
that POST /prompt takes, for the node types the examples use.

The rules are the front end's: every input that is a widget takes one entry of ``widgets_values``, in the order
of /object_info's ``input_order``; an INT with ``control_after_generate`` (explicitly, or by default when it is
named seed or noise_seed) takes a second entry (the control mode), and so does an input with an upload button
(``image_upload``). Links become ``[origin node id, origin slot]``. Anything else (muted or bypassed nodes,
reroutes, primitive nodes, subgraphs, dict-form widget values) is refused rather than guessed.
"""

from __future__ import annotations

UI_ONLY_NODES = {"Note", "MarkdownNote"}  # annotations that live in the front end only
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def widget_values_taken(name: str, spec: list) -> int:
    """How many entries of ``widgets_values`` the input ``name`` with /object_info spec ``spec`` takes."""
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if options.get("forceInput") or not (isinstance(kind, list) or kind in WIDGET_TYPES):
        return 0
    taken = 1
    control = options.get("control_after_generate")
    if control is None:
        control = kind == "INT" and name in ("seed", "noise_seed")
    if control:
        taken += 1
    if options.get("image_upload"):
        taken += 1
    return taken


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API prompt of a saved UI workflow; ``object_info`` is the server's GET /object_info."""
    if workflow.get("definitions", {}).get("subgraphs"):
        raise ValueError("subgraphs are not supported")
    links = {link[0]: link for link in workflow["links"]}  # [id, origin id, origin slot, target id, target slot, type]
    ui_only = {node["id"] for node in workflow["nodes"] if node["type"] in UI_ONLY_NODES}
    prompt = {}
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind in UI_ONLY_NODES:
            continue
        if node.get("mode", 0) != 0:
            raise ValueError(f"node {node['id']} ({kind}) is muted or bypassed: not supported")
        if kind not in object_info:
            raise ValueError(f"node {node['id']}: the server has no node type {kind!r}")
        info = object_info[kind]
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        order = info.get("input_order") or {
            section: list(info["input"].get(section, {})) for section in ("required", "optional")
        }
        values = node.get("widgets_values") or []
        if isinstance(values, dict):
            raise ValueError(f"node {node['id']} ({kind}): dict-form widgets_values are not supported")
        values = list(values)
        inputs = {}
        for name in order.get("required", []) + order.get("optional", []):
            taken = widget_values_taken(name, specs[name])
            if taken:
                if len(values) < taken:
                    raise ValueError(f"node {node['id']} ({kind}): no widget value left for {name!r}")
                inputs[name] = values[0]
                values = values[taken:]
        if values:
            raise ValueError(f"node {node['id']} ({kind}): {len(values)} widget value(s) left over: {values!r}")
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, origin, origin_slot, target, _, _ = links[slot["link"]]
                if target != node["id"] or origin in ui_only:
                    raise ValueError(f"node {node['id']} ({kind}): link {slot['link']} of {slot['name']!r} is broken")
                inputs[slot["name"]] = [str(origin), origin_slot]
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs}
    return prompt


def nodes_of(prompt: dict, class_type: str) -> list[str]:
    return [node_id for node_id, node in prompt.items() if node["class_type"] == class_type]


def build_specs_prompt(
    encoder: str, max_prompts: int, images: int, steps: int, size: int, which: str = "missing", **inputs
) -> dict:
    """The API prompt of GMILoadEncoder -> GMIBuildSpecs as the tests queue it: a small budget of ``max_prompts`` x
    ``images`` at ``steps`` and ``size`` for every family; ``inputs`` adds or replaces Build Specs inputs."""
    return {
        "enc": {"class_type": "GMILoadEncoder", "inputs": {"encoder": encoder, "allow_download": False}},
        "build": {
            "class_type": "GMIBuildSpecs",
            "inputs": {
                "encoder": ["enc", 0],
                "which": which,
                "prompt_set": "platform",
                "max_prompts": max_prompts,
                "budget": f"allx{images}",
                "family_settings": f"steps={steps} cfg=7 width={size} height={size}",
                "sampler_name": "euler",
                "scheduler": "normal",
                "seed": 0,
                **inputs,
            },
        },
    }


def txt2img_prompt(ckpt: str, text: str, seed: int, steps: int, size: int) -> dict:
    """A plain txt2img API prompt (checkpoint loader, prompts, KSampler euler/normal at cfg 7, VAE decode as node
    ``dec``) for the caller to add its SaveImage or gmi nodes to."""
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "lat": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "ks": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["ckpt", 0],
                "positive": ["pos", 0],
                "negative": ["neg", 0],
                "latent_image": ["lat", 0],
                "seed": seed,
                "steps": steps,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["ks", 0], "vae": ["ckpt", 2]}},
    }
