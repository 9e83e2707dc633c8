"""Run by test_encoders.py under a python with open_clip_torch 2.20.0 (as stock A1111 1.10.1 has it).

Writes ViT-L-14 with random weights (open_clip 2.20's own CLIP class) into the WebUI's models/gmi/clip,
resolves the default encoder through gmi's registry, loads it and checks both towers against open_clip's
own forward passes; then downloads ViT-B-32 from the local hub the test serves. Prints "OK" at the end.
"""

import importlib.metadata
import sys
from pathlib import Path

import open_clip
import torch
from PIL import Image

from gmi_core.bench.clip_layouts import write_layout
from gmi_core.encoder_registry import DEFAULT_ENCODER, parse_encoder_name
from gmi_core.encoders import load_encoder

torch.set_num_threads(1)
work = Path(sys.argv[1])
print(f"open_clip {importlib.metadata.version('open_clip_torch')}")
print(f"hf_hub {open_clip.get_pretrained_cfg('ViT-L-14', 'openai').get('hf_hub', '')!r}")
entry = parse_encoder_name(DEFAULT_ENCODER)
clip_dir = work / "models" / "gmi" / "clip"
torch.manual_seed(0)
reference = open_clip.CLIP(**open_clip.get_model_config(entry.model), quick_gelu=True).eval()
path = write_layout("open_clip_flat", entry, clip_dir, dtype=torch.float32, state=reference.state_dict())
encoder = load_encoder(DEFAULT_ENCODER, own_dirs=[clip_dir], search_dirs=[work / "models" / "CLIP"])
assert encoder.source == str(path) and encoder.encoder_id == "ViT-L-14/openai", encoder.source
image = Image.new("RGB", (256, 200), (120, 30, 200))
with torch.no_grad():
    want_image = torch.nn.functional.normalize(reference.encode_image(encoder.preprocess(image).unsqueeze(0)), dim=-1)
    want_text = torch.nn.functional.normalize(reference.encode_text(encoder.tokenizer(["a purple square"])), dim=-1)
assert torch.allclose(encoder.encode_images([image]), want_image, atol=1e-4)
assert torch.allclose(encoder.encode_texts(["a purple square"]), want_text, atol=1e-4)
path.unlink()
print("resolved and encoded")

# A download with the old huggingface_hub the WebUI brings (HF_ENDPOINT points at the test's local hub).
seen = []
downloaded = load_encoder(
    "ViT-B-32/openai",
    own_dirs=[clip_dir],
    allow_download=True,
    download_dir=clip_dir,
    progress=lambda done, total: seen.append((done, total)),
)
size = Path(downloaded.source).stat().st_size
assert downloaded.layout == "open_clip" and seen[-1] == (size, size) and len(seen) >= 3, seen
print("downloaded with progress", len(seen))
print("OK")
