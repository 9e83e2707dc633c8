"""Bad or unusual input: clear errors or skips with reasons, and nothing lost."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from gmi_core.checkpoints import FolderCheckpointSource, inspect_checkpoint
from gmi_core.errors import ImageError, NoSpecsError
from gmi_core.images import load_image


def _png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_unreadable_and_non_image_files_are_rejected_with_the_reason(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    with pytest.raises(ImageError, match="not an image file"):
        load_image(text)
    truncated = tmp_path / "half.png"
    data = _png_bytes(Image.new("RGB", (64, 64), (10, 200, 30)))
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated"):
        load_image(truncated)
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.new("L", (48, 40), 128),
        lambda: Image.new("RGBA", (64, 64), (255, 0, 0, 0)),
        lambda: Image.fromarray(np.full((32, 32), 65535, dtype=np.uint16)),
        lambda: Image.new("P", (20, 20), 3),
        lambda: Image.new("RGB", (6000, 5000), (0, 0, 255)),
    ],
    ids=["grayscale", "rgba", "16-bit", "palette", "very-large"],
)
def test_unusual_images_load_as_rgb_and_identify(tiny_world, tmp_path, make):
    source_image = make()
    path = tmp_path / "query.png"
    source_image.save(path)
    image = load_image(path)
    assert image.mode == "RGB" and max(image.size) <= 1024
    result = tiny_world.gmi().identify([image], source=tiny_world.source())
    assert len(result.ranking) == 4


def test_sixteen_bit_is_rescaled_not_clipped(tmp_path):
    path = tmp_path / "gray16.png"
    Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16)).save(path)  # 50 % grey
    assert load_image(path).getpixel((0, 0)) == (128, 128, 128)


def test_transparent_pixels_become_white(tmp_path):
    path = tmp_path / "clear.png"
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(path)
    assert load_image(path).getpixel((0, 0)) == (255, 255, 255)


def test_bad_checkpoints_are_skipped_with_a_reason(tiny_world, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    good = next(tiny_world.models.glob("*.safetensors"))
    (models / "good.safetensors").write_bytes(good.read_bytes())
    (models / "truncated.safetensors").write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    save_file({"lora_unet_down.lora_down.weight": torch.zeros(4, 4)}, str(models / "a-lora.safetensors"))
    save_file({"encoder.conv_in.weight": torch.zeros(4, 4)}, str(models / "vae.safetensors"))
    (models / "old.ckpt").write_bytes(b"PK\x03\x04 pickle inside")
    listing = FolderCheckpointSource(models).list_checkpoints()
    assert [c.name for c in listing.checkpoints] == ["good.safetensors"]
    reasons = {s.name: s.reason for s in listing.skipped}
    assert "truncated" in reasons["truncated.safetensors"]
    assert "not a diffusion model" in reasons["a-lora.safetensors"] and "LoRA" in reasons["a-lora.safetensors"]
    assert "not a diffusion model" in reasons["vae.safetensors"]
    assert "pickle" in reasons["old.ckpt"]
    assert good.exists() and (models / "truncated.safetensors").stat().st_size == good.stat().st_size // 3


def test_checkpoint_families(tmp_path):
    path = tmp_path / "xl.safetensors"
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
            "first_stage_model.y": torch.zeros(1),
            "conditioner.embedders.0.transformer.z": torch.zeros(1),
        },
        str(path),
    )
    assert inspect_checkpoint(path) == ("sdxl", None)
    save_file(
        {"model.diffusion_model.joint_blocks.0": torch.zeros(1), "first_stage_model.y": torch.zeros(1)}, str(path)
    )
    assert inspect_checkpoint(path) == ("other", None)  # a diffusion model of a family gmi does not name
    assert "this host renders single-file SD" in FolderCheckpointSource(tmp_path).list_checkpoints().skipped[0].reason


def test_empty_models_folder(tiny_world, tmp_path):
    from gmi_core.checkpoints import FolderCheckpointSource

    empty = FolderCheckpointSource(tmp_path / "empty")
    gmi = tiny_world.gmi(spec_root=tmp_path / "specs")
    assert gmi.status(empty) == ([], [])
    report = gmi.build(empty, tiny_world.generator())
    assert report.built == [] and report.failed == []
    with pytest.raises(NoSpecsError, match="build specs first"):
        gmi.identify([Image.new("RGB", (64, 64))], source=empty)
