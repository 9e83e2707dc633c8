"""Random-weight CLIP models of a real architecture, written in every layout gmi reads.

Used by ``bench identify`` and the tests (no pretrained weights exist on these machines): the
architectures are the real ones (from open_clip's and transformers' configs), only the values are random.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..encoder_registry import KnownEncoder

LAYOUTS = ("open_clip_flat", "open_clip_hub", "transformers_flat", "transformers_hub")
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


def _save(state: dict, path: Path, dtype: torch.dtype) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}, str(path))
    return path


def open_clip_state(entry: KnownEncoder, seed: int = 0) -> dict:
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(**open_clip.get_model_config(entry.model), quick_gelu=entry.quick_gelu)
    return model.state_dict()


def transformers_config(entry: KnownEncoder) -> dict:
    """The config.json of a transformers CLIPModel snapshot of ``entry``'s architecture."""
    from ..encoders import transformers_config as config_args

    return {"architectures": ["CLIPModel"], "model_type": "clip", **config_args(entry.geometry())}


def transformers_state(entry: KnownEncoder, seed: int = 0, vision_only: bool = False) -> dict:
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPConfig(
        **{k: v for k, v in transformers_config(entry).items() if k not in ("architectures", "model_type")}
    )
    if vision_only:  # what ComfyUI keeps in models/clip_vision
        return CLIPVisionModelWithProjection(config.vision_config).state_dict()
    return CLIPModel(config).state_dict()


def hub_snapshot_path(hub_cache: Path, repo: str, filename: str) -> Path:
    """Where huggingface_hub keeps ``repo``'s ``filename`` in its cache (and records the ``main`` ref)."""
    root = Path(hub_cache) / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(SNAPSHOT)
    return root / "snapshots" / SNAPSHOT / filename


def write_layout(
    layout: str,
    entry: KnownEncoder,
    target: Path,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
    state: dict | None = None,
) -> Path:
    """Write ``entry``'s architecture with random weights in ``layout``.

    ``target``: a model folder for the flat layouts, the hub cache folder for the ``_hub`` ones.
    ``state``: reuse an already built state dict of the layout's kind (saves building it again).
    """
    hub = {item.layout: item for item in entry.hub}
    if layout.startswith("open_clip"):
        state = state if state is not None else open_clip_state(entry, seed)
        if layout == "open_clip_flat":
            return _save(state, Path(target) / f"{entry.slug}.safetensors", dtype)
        item = hub["open_clip"]
        return _save(state, hub_snapshot_path(target, item.repo, item.filename), dtype)
    state = state if state is not None else transformers_state(entry, seed)
    if layout == "transformers_flat":
        return _save(state, Path(target) / f"{entry.hub[-1].repo.split('/')[-1]}.safetensors", dtype)
    item = hub["transformers"]
    path = _save(state, hub_snapshot_path(target, item.repo, item.filename), dtype)
    (path.parent / "config.json").write_text(json.dumps(transformers_config(entry)))
    return path
