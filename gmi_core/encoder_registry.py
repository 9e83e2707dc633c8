"""The CLIP encoders gmi knows by name, and where their weights live on the Hugging Face hub.

One table for every host and the CLI (in the spirit of open_clip's ``parse_model_name``): a name such as
``ViT-L-14/openai`` (or ``ViT-L-14``, or the transformers repo ``openai/clip-vit-large-patch14``) means the
same model everywhere, and is also the ``encoder_id`` stored in specs. gmi keeps the hub files itself
because the open_clip 2.20 that A1111 pins has no hub id for the OpenAI weights.
"""

from __future__ import annotations

from dataclasses import dataclass

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
OPEN_CLIP_FILE = "open_clip_model.safetensors"
TRANSFORMERS_FILE = "model.safetensors"


@dataclass(frozen=True)
class HubFile:
    repo: str
    filename: str
    layout: str  # "open_clip" or "transformers"

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo}/resolve/main/{self.filename}"


@dataclass(frozen=True)
class Geometry:
    """What a weights file must match, read from its safetensors header before anything is loaded."""

    embed_dim: int
    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    text_width: int
    text_layers: int
    context_length: int

    def describe(self) -> str:
        return (
            f"image {self.image_size}px/{self.patch_size} x{self.vision_width} {self.vision_layers} layers, "
            f"text x{self.text_width} {self.text_layers} layers, joint {self.embed_dim}"
        )


@dataclass(frozen=True)
class KnownEncoder:
    model: str  # open_clip model config name
    pretrained: str
    hub: tuple[HubFile, ...]  # download order
    quick_gelu: bool = True
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD

    @property
    def name(self) -> str:
        """The encoder id of every spec built with it, and the name every UI shows."""
        return f"{self.model}/{self.pretrained}"

    @property
    def slug(self) -> str:
        """The file/folder name gmi suggests and downloads into: ``ViT-L-14-openai``."""
        return f"{self.model}-{self.pretrained}"

    def local_names(self) -> list[str]:
        """Relative paths checked in each model folder, most specific first."""
        names = [
            f"{self.slug}.safetensors",
            f"{self.slug}/{OPEN_CLIP_FILE}",
            f"{self.slug}/{TRANSFORMERS_FILE}",
            f"{self.model}/{self.pretrained}/{OPEN_CLIP_FILE}",
            f"{self.model}/{OPEN_CLIP_FILE}",
            f"{self.model}.safetensors",
        ]
        for item in self.hub:
            folder = item.repo.split("/")[-1]
            names += [f"{folder}/{item.filename}", f"{folder}.safetensors"]
        return list(dict.fromkeys(names))

    def geometry(self) -> Geometry:
        """From open_clip's shipped model config (present in every open_clip version gmi supports)."""
        import open_clip

        cfg = open_clip.get_model_config(self.model)
        if cfg is None:
            raise ValueError(f"open_clip has no model config {self.model!r}")
        return geometry_from_config(cfg)


def geometry_from_config(cfg: dict) -> Geometry:
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    return Geometry(
        embed_dim=int(cfg["embed_dim"]),
        image_size=int(vision["image_size"]),
        patch_size=int(vision["patch_size"]),
        vision_width=int(vision["width"]),
        vision_layers=int(vision["layers"]),
        text_width=int(text["width"]),
        text_layers=int(text["layers"]),
        context_length=int(text.get("context_length", 77)),
    )


def _openai(model: str, timm_name: str, transformers_repo: str) -> KnownEncoder:
    return KnownEncoder(
        model,
        "openai",
        (
            HubFile(f"timm/{timm_name}.openai", OPEN_CLIP_FILE, "open_clip"),
            HubFile(transformers_repo, TRANSFORMERS_FILE, "transformers"),
        ),
    )


KNOWN_ENCODERS: tuple[KnownEncoder, ...] = (
    _openai("ViT-L-14", "vit_large_patch14_clip_224", "openai/clip-vit-large-patch14"),
    _openai("ViT-B-16", "vit_base_patch16_clip_224", "openai/clip-vit-base-patch16"),
    _openai("ViT-B-32", "vit_base_patch32_clip_224", "openai/clip-vit-base-patch32"),
)
DEFAULT_ENCODER = KNOWN_ENCODERS[0].name  # the CLIP A1111's interrogator uses


def encoder_names() -> list[str]:
    return [entry.name for entry in KNOWN_ENCODERS]


def parse_encoder_name(name: str) -> KnownEncoder | None:
    """The known encoder a name means (``ViT-L-14/openai``, ``ViT-L-14``, ``ViT-L-14-openai``, a hub repo), else None."""
    wanted = str(name).strip().strip("/").lower()
    if wanted.endswith(".safetensors"):
        return None
    for entry in KNOWN_ENCODERS:
        aliases = {entry.name.lower(), entry.slug.lower(), *(item.repo.lower() for item in entry.hub)}
        if entry.pretrained == "openai":
            aliases.add(entry.model.lower())  # a bare model name means OpenAI's weights, as in A1111
        if wanted in aliases:
            return entry
    return None
