"""Unit tests of the ComfyUI nodes without a running ComfyUI: ComfyUI's own V3 node API (``comfy_api.latest``) from
the tree the integration tests use, fakes of what needs a server or a GPU (folder_paths' folders, model management,
the progress bar, the sampler list, the server), a fake generator.

The real thing is tested in test_comfyui_integration.py.
"""

from __future__ import annotations

import ast
import asyncio
import functools
import hashlib
import importlib.util
import io
import json
import subprocess
import sys
import types
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfyui_support import comfy_env

REPO = Path(__file__).resolve().parents[1]
PACK = "gmi_pack_under_test"
NODE_IDS = ["GMILoadEncoder", "GMIBuildSpecs", "GMIIdentify", "GMIInterrogate"]
COMFYUI_MODULES = ("comfy", "comfy_api", "comfy_execution", "comfy_extras", "folder_paths", "server", "nodes")
COLOURS = [(200, 60, 60), (60, 190, 70), (60, 80, 200), (210, 200, 50)]


class Interrupted(Exception):
    """Stands in for comfy.model_management.InterruptProcessingException."""


@functools.cache
def comfyui_on_path() -> Path:
    """ComfyUI's tree (the integration tests' one) appended to sys.path once per session: last, so it only adds
    ComfyUI's own modules. Imported as a library, ComfyUI parses no command line (``comfy.options.args_parsing``
    stays False: cli_args parses ``[]``, not pytest's argv), and ``comfy_api.latest`` imports neither model
    management nor the server."""
    tree = comfy_env.comfyui_dir()
    sys.path.append(str(tree))
    import comfy.cli_args  # argparse would exit on pytest's options if it parsed sys.argv
    import comfy.options

    assert not comfy.options.args_parsing and not comfy.cli_args.args.cpu
    return tree


def _fake_comfy(state: dict):
    """What needs a GPU or a running prompt: model management, model patcher, progress bar, the sampler list."""
    mm = types.ModuleType("comfy.model_management")
    mm.processing_interrupted = lambda: state["interrupt"]

    def throw():
        if state["interrupt"]:
            state["interrupt"] = False
            raise Interrupted()

    mm.throw_exception_if_processing_interrupted = throw
    mm.interrupt_current_processing = lambda value=True: state.__setitem__("interrupt", value)
    mm.InterruptProcessingException = Interrupted
    mm.text_encoder_device = mm.text_encoder_offload_device = lambda: torch.device("cpu")
    mm.should_use_fp16 = lambda device=None, prioritize_performance=True: False
    mm.load_models_gpu = lambda patchers: state.setdefault("loaded_models", []).extend(patchers)
    patcher = types.ModuleType("comfy.model_patcher")

    class ModelPatcher:
        def __init__(self, model, load_device, offload_device):
            self.model, self.load_device, self.offload_device = model, load_device, offload_device

    patcher.ModelPatcher = ModelPatcher
    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total, self.current = total, 0
            state["bars"].append(self)

        def update(self, value):
            self.current += value

        def update_absolute(self, value, total=None):
            self.current = value

    utils.ProgressBar = ProgressBar
    samplers = types.ModuleType("comfy.samplers")
    samplers.KSampler = types.SimpleNamespace(
        SAMPLERS=["euler", "euler_ancestral", "dpmpp_2m", "ddim"],
        SCHEDULERS=["normal", "karras", "simple", "sgm_uniform", "beta"],
    )
    return {"model_management": mm, "utils": utils, "model_patcher": patcher, "samplers": samplers}


def _fake_server():
    """ComfyUI's server module with no server running (its real import builds the whole app)."""
    server = types.ModuleType("server")
    server.PromptServer = types.SimpleNamespace(instance=None)
    return server


def _fake_folder_paths(base: Path):
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(base / "models")
    fp.folder_names_and_paths = {
        "checkpoints": ([str(base / "models" / "checkpoints")], {".safetensors", ".ckpt"}),
        "clip_vision": ([str(base / "models" / "clip_vision")], {".safetensors"}),
        "embeddings": ([str(base / "models" / "embeddings")], {".safetensors"}),
        "loras": ([str(base / "models" / "loras")], {".safetensors"}),
    }
    fp.get_user_directory = lambda: str(base / "user")
    fp.get_folder_paths = lambda kind: list(fp.folder_names_and_paths[kind][0])

    def get_filename_list(kind):
        folders, exts = fp.folder_names_and_paths[kind]
        out = []
        for folder in folders:
            root = Path(folder)
            if root.is_dir():
                out += [str(p.relative_to(root)) for p in sorted(root.rglob("*")) if p.suffix in exts]
        return out

    def get_full_path(kind, name):
        for folder in fp.folder_names_and_paths[kind][0]:
            path = Path(folder) / name
            if path.is_file() and Path(folder).resolve() in path.resolve().parents:
                return str(path)
        return None

    fp.get_filename_list, fp.get_full_path = get_filename_list, get_full_path
    return fp


def write_fake_checkpoint(path: Path, index: int) -> Path:
    """Header-valid SD1 single-file checkpoint (tiny tensors); the fake generator reads its index."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            "model.diffusion_model.out.2.bias": torch.full((4,), float(index)),
            "first_stage_model.decoder.conv_out.bias": torch.zeros(3),
            "cond_stage_model.transformer.text_model.final_layer_norm.bias": torch.zeros(8),
        },
        str(path),
        metadata={"index": str(index)},
    )
    return path


def fake_image(index: int, prompt: str, seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed * 1000 + int(hashlib.md5(prompt.encode()).hexdigest()[:6], 16) % 997)
    base = np.array(COLOURS[index % len(COLOURS)], dtype=np.float64)
    img = base + rng.normal(0, 25, (size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


class FakeGenerator:
    calls: ClassVar[list] = []
    sizes: ClassVar[dict] = {}
    interrupt_after: int | None = None
    state: ClassVar[dict] = {}

    def __init__(self, on_image=None, hash_cache=None):
        self.on_image = on_image

    def generate(self, checkpoint, prompt, seeds, settings):
        from safetensors import safe_open

        with safe_open(str(checkpoint.path), "pt") as f:
            index = int(f.metadata()["index"])
        FakeGenerator.calls.append((checkpoint.name, prompt, list(seeds)))
        FakeGenerator.sizes[checkpoint.name] = (settings.width, settings.height, settings.steps)
        if FakeGenerator.interrupt_after is not None and len(FakeGenerator.calls) > FakeGenerator.interrupt_after:
            FakeGenerator.state["interrupt"] = True
        images = []
        for s in seeds:
            images.append(fake_image(index, prompt, s, settings.width))
            if self.on_image:
                self.on_image()
        return images

    def release(self):
        pass


@pytest.fixture
def env(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    comfyui_on_path()
    state = {"interrupt": False, "bars": []}
    monkeypatch.setitem(sys.modules, "folder_paths", _fake_folder_paths(tmp_path))
    monkeypatch.setitem(sys.modules, "server", _fake_server())
    import comfy

    for name, mod in _fake_comfy(state).items():
        monkeypatch.setitem(sys.modules, f"comfy.{name}", mod)
        monkeypatch.setattr(comfy, name, mod, raising=False)
    for name in [m for m in sys.modules if m == PACK or m.startswith(PACK + ".")]:
        monkeypatch.delitem(sys.modules, name)
    spec = importlib.util.spec_from_file_location(PACK, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    pack = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, PACK, pack)
    spec.loader.exec_module(pack)

    nodes = importlib.import_module(PACK + ".nodes")  # imported when ComfyUI calls the pack's comfy_entrypoint
    importlib.import_module(PACK + ".nodes.routes")  # ComfyUI imports it in comfy_entrypoint; the tests call it
    monkeypatch.setattr(nodes.build_node, "ComfyGenerator", FakeGenerator)
    loaded = []

    def fake_load(path):
        loaded.append(Path(path).name)
        return (f"MODEL<{Path(path).name}>", f"CLIP<{Path(path).name}>", f"VAE<{Path(path).name}>")

    monkeypatch.setattr(
        nodes.identify_node, "load_winner", lambda engine, name, sha: fake_load(nodes.host.checkpoint_path(name))
    )
    FakeGenerator.calls, FakeGenerator.interrupt_after, FakeGenerator.state, FakeGenerator.sizes = [], None, state, {}

    ckpts = tmp_path / "models" / "checkpoints"
    names = [write_fake_checkpoint(ckpts / f"ck{i}.safetensors", i).name for i in range(4)]
    (ckpts / "broken.safetensors").write_bytes(b"not a safetensors file")
    save_file({"lora_unet_down.weight": torch.zeros(2)}, str(ckpts / "some-lora.safetensors"))
    gmi_core = sys.modules[PACK + ".gmi_core.encoders"]
    gmi_core.save_encoder(gmi_core.tiny_encoder(seed=0), tmp_path / "models" / "gmi" / "tiny.safetensors")
    return types.SimpleNamespace(pack=pack, nodes=nodes, base=tmp_path, names=names, loaded=loaded, state=state)


def load_encoder(env, name="tiny.safetensors", allow_download=True):
    return env.nodes.GMILoadEncoder.execute(name, allow_download).result[0]


def node_info(cls) -> dict:
    """The node as GET /object_info shows it (V1 compatible JSON)."""
    return json.loads(json.dumps(cls.GET_NODE_INFO_V1()))


def widgets(cls) -> dict:
    info = node_info(cls)["input"]
    return {**info["required"], **info.get("optional", {})}


def build(env, which="missing", max_prompts=4, budget="allx2", checkpoints=""):
    """A Build Specs run; its output as ComfyUI records it ({"ui": ..., "result": ...}) and the encoder."""
    encoder = load_encoder(env)
    out = env.nodes.GMIBuildSpecs.execute(
        encoder,
        which,
        "platform",
        budget,
        "steps=3 width=64 height=64",
        "euler",
        "normal",
        0,
        max_prompts=max_prompts,
        checkpoints=checkpoints,
    )
    return {"ui": out.ui, "result": out.result}, encoder


def to_tensor(images):
    return torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) / 255.0 for i in images]))


def _imported_modules(path: Path) -> set[str]:
    """Top-level names of the absolute imports in a source file (relative imports stay inside their package)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_engine_imports_without_comfyui_and_the_hosts_stay_apart():
    """The engine imports with every ComfyUI module blocked; no engine or A1111 file imports ComfyUI or nodes/; the
    nodes use the pack's own gmi_core (relative imports: inside ComfyUI the pack has a mangled package name)."""
    code = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {COMFYUI_MODULES!r}: raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import gmi_core.cli, gmi_core.engine, gmi_core.service\n"
        "from gmi_core.interrogator import load_vocabulary\n"
        "print(len(load_vocabulary()) > 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0 and out.stdout.split() == ["True"], out.stderr
    for folder in ("gmi_core", "gmi_a1111", "scripts"):
        for path in (REPO / folder).rglob("*.py"):
            assert not _imported_modules(path) & set(COMFYUI_MODULES), path
    for path in (REPO / "nodes").glob("*.py"):
        assert "gmi_core" not in _imported_modules(path), path
    script = subprocess.run([sys.executable, str(REPO / "__init__.py")], capture_output=True, text=True, timeout=60)
    assert script.returncode == 0, script.stderr  # run as a plain script, the pack file registers nothing
    as_package = (  # pytest imports the checkout as the tests' parent package: that must not need ComfyUI
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('pack', {str(REPO / '__init__.py')!r}, "
        f"submodule_search_locations=[{str(REPO)!r}])\n"
        "pack = importlib.util.module_from_spec(spec); sys.modules['pack'] = pack; spec.loader.exec_module(pack)\n"
        "print(callable(pack.comfy_entrypoint), any(m.startswith(('comfy', 'pack.nodes')) for m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", as_package], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.split() == ["True", "False"], out.stderr


def test_extension_lists_the_v3_nodes_as_object_info_shows_them(env):
    from comfy_api.latest import ComfyExtension

    assert (REPO / env.pack.WEB_DIRECTORY / "gmi.js").is_file()
    assert not hasattr(env.pack, "NODE_CLASS_MAPPINGS"), "ComfyUI would load V1 mappings instead of the entrypoint"
    extension = asyncio.run(env.pack.comfy_entrypoint())
    assert isinstance(extension, ComfyExtension)
    assert "gmi" in sys.modules["folder_paths"].folder_names_and_paths, "the entrypoint registers models/gmi"
    node_classes = asyncio.run(extension.get_node_list())
    assert [cls.GET_SCHEMA().node_id for cls in node_classes] == NODE_IDS  # saved workflows name these ids
    for cls in node_classes:
        info = node_info(cls)
        assert info["name"] == cls.__name__ and info["display_name"].startswith("GMI ") and info["category"] == "gmi"
        assert len(info["description"]) > 40
        assert all(spec[1].get("tooltip") for spec in widgets(cls).values()), cls
        assert len(info["output_name"]) == len(info["output"]) == len(info["output_tooltips"])
        assert all(info["output_tooltips"]), cls
    identify = node_info(env.nodes.GMIIdentify)
    assert identify["output"] == ["MODEL", "CLIP", "VAE", "STRING", "STRING", "STRING", "FLOAT"]
    assert identify["output_node"]
    assert identify["output_name"] == [
        "model",
        "clip",
        "vae",
        "checkpoint_name",
        "ranking_json",
        "lora_name",
        "lora_strength",
    ]
    assert identify["input_order"] == {
        "required": ["encoder", "image", "method", "top_k", "pick_rank"],
        "optional": [
            "prompt",
            "prompt_set",
            "max_prompts",
            "include_not_installed",
            "models",
            "on_checkpoint",
            "refine",
            "refine_max_images",
        ],
        "hidden": ["prompt", "extra_pnginfo"],
    }
    assert node_info(env.nodes.GMILoadEncoder)["output"] == ["GMI_ENCODER"]
    assert widgets(env.nodes.GMIBuildSpecs)["seed"][1]["control_after_generate"] is False
    kind, options = widgets(env.nodes.GMILoadEncoder)["encoder"]
    assert kind == "COMBO" and options["options"][0] == options["default"] == "ViT-L-14/openai"
    assert "tiny.safetensors" in options["options"]
    sampler = widgets(env.nodes.GMIBuildSpecs)["sampler_name"][1]
    assert sampler["options"] == ["euler", "euler_ancestral", "dpmpp_2m", "ddim"] and sampler["default"] == "euler"


def test_non_gmi_clip_files_in_models_gmi_are_not_offered_and_encoders_are_model_managed(env):
    gmi_dir = env.base / "models" / "gmi"
    save_file(
        {
            "vision_model.embeddings.patch_embedding.weight": torch.zeros(8, 3, 2, 2),
            "visual_projection.weight": torch.zeros(2, 8),
        },
        str(gmi_dir / "clip-vit-large-patch14.safetensors"),
    )
    options = widgets(env.nodes.GMILoadEncoder)["encoder"][1]
    assert "clip-vit-large-patch14.safetensors" not in options["options"] and options["default"] == "ViT-L-14/openai"
    encoder = load_encoder(env)
    encoder.encode_texts(["a cat"])
    patcher = env.state["loaded_models"][-1]
    assert patcher.model is encoder.model and patcher.load_device == encoder.device


def test_combos_offer_no_symlink_the_loaders_refuse(env, tmp_path_factory):
    """Issue 18 class 9: a symlink in models/gmi or gmi/prompt_sets that points outside is refused when picked, so
    the encoder and prompt set combos do not list it (the same function decides both); links inside stay offered."""
    outside = tmp_path_factory.mktemp("outside")
    gmi_core = sys.modules[PACK + ".gmi_core.encoders"]
    gmi_core.save_encoder(gmi_core.tiny_encoder(seed=1), outside / "elsewhere.safetensors")
    (outside / "elsewhere.txt").write_text("a red apple\n")
    gmi_dir = env.base / "models" / "gmi"
    (gmi_dir / "linked-out.safetensors").symlink_to(outside / "elsewhere.safetensors")
    (gmi_dir / "linked-in.safetensors").symlink_to(gmi_dir / "tiny.safetensors")
    sets = env.nodes.engines.prompt_set_dir()
    sets.mkdir(parents=True, exist_ok=True)
    (sets / "mine.txt").write_text("a blue car\n")
    (sets / "linked-out.txt").symlink_to(outside / "elsewhere.txt")
    (sets / ".hidden.txt").write_text("a cat\n")

    encoders = widgets(env.nodes.GMILoadEncoder)["encoder"][1]["options"]
    assert "tiny.safetensors" in encoders and "linked-in.safetensors" in encoders
    assert "linked-out.safetensors" not in encoders
    with pytest.raises(Exception, match=r"no encoder 'linked-out\.safetensors'"):
        load_encoder(env, "linked-out.safetensors")
    load_encoder(env, "linked-in.safetensors")
    for node in (env.nodes.GMIBuildSpecs, env.nodes.GMIIdentify):
        options = widgets(node)["prompt_set"][1]["options"]
        assert "mine.txt" in options and "linked-out.txt" not in options and ".hidden.txt" not in options, options
    for refused in ("linked-out.txt", ".hidden.txt"):
        with pytest.raises(Exception, match="prompt set"):
            env.nodes.engines.get_prompt_set(refused)


def test_clip_download_moves_the_node_bar_and_a_console_bar(env, capfd):
    """Issue 18 class 10: a CLIP weights download (ProgressFn callbacks from gmi_core.encoder_files) moves the node's
    progress bar and a byte bar on the console as bytes arrive."""
    update = env.nodes.host.download_progress()
    total = 8 * 2**20
    for done in (2**20, 4 * 2**20):
        update(done, total)
        assert env.state["bars"][-1].current == done and env.state["bars"][-1].total == total
    assert "CLIP weights:  50%" in capfd.readouterr().err.replace("\r", "\n").splitlines()[-1]
    update(total, total)
    assert len(env.state["bars"]) == 1 and env.state["bars"][0].current == total
    assert "CLIP weights: 100%" in capfd.readouterr().err


def test_missing_clip_weights_give_a_clear_message(env):
    from importlib import import_module

    errors = import_module(PACK + ".gmi_core.errors")
    with pytest.raises(errors.EncoderUnavailable) as err:
        load_encoder(env, "ViT-L-14/openai", allow_download=False)
    text = str(err.value)
    assert "ViT-L-14" in text and "models/gmi/" in text and "clip_vision" in text
    assert str(env.base) not in text  # folders by their last components, no server path (issue 18)
    # class 9: one line that starts with exactly what to do: which file, from where, into which folder
    fix = text.split("Fix: ", 1)[1].split(". Tried:")[0]
    assert "\n" not in text and text.index("Fix: ") < 120, text
    url = "https://huggingface.co/timm/vit_large_patch14_clip_224.openai/resolve/main/open_clip_model.safetensors"
    assert fix.startswith(f"download {url} and save it as ") and "models/gmi/ViT-L-14-openai.safetensors" in fix, fix
    assert "allow downloads" in fix


def test_build_reports_skips_and_progress(env):
    out, _ = build(env)
    report = out["ui"]["gmi_build"][0]
    assert sorted(report["built"]) == env.names
    skipped = {s["name"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"broken.safetensors", "some-lora.safetensors"}
    assert "LoRA" in skipped["some-lora.safetensors"] and "unreadable" in skipped["broken.safetensors"]
    assert json.loads(out["result"][0]) == report
    assert len(FakeGenerator.calls) == 4 * 4 and all(len(c[2]) == 2 for c in FakeGenerator.calls)
    bar = env.state["bars"][-1]
    assert bar.total == 4 * 4 * 2 and bar.current == bar.total
    specs = list((env.base / "user" / "gmi" / "specs").glob("*/*.safetensors"))
    assert len(specs) == 4  # the spec store lives under ComfyUI's user directory
    panel = json.loads((env.base / "user" / "gmi" / "panel.json").read_text())
    assert panel["encoder"] == "tiny.safetensors" and panel["max_prompts"] == 4
    # nothing left to do
    FakeGenerator.calls = []
    again, _ = build(env)
    assert again["ui"]["gmi_build"][0]["built"] == [] and FakeGenerator.calls == []
    # a listed checkpoint is rebuilt only when asked for "all"; unknown names are an error
    listed, _ = build(env, which="listed", checkpoints="ck1.safetensors\n")
    assert listed["ui"]["gmi_build"][0]["built"] == ["ck1.safetensors"]
    with pytest.raises(Exception, match="nope"):
        build(env, which="listed", checkpoints="nope.safetensors")


def test_interrupted_build_raises_and_resumes(env):
    FakeGenerator.interrupt_after = 2
    with pytest.raises(Interrupted):
        build(env)
    done_before = len(FakeGenerator.calls)
    FakeGenerator.interrupt_after, FakeGenerator.calls = None, []
    out, _ = build(env)
    assert sorted(out["ui"]["gmi_build"][0]["built"]) == env.names
    assert len(FakeGenerator.calls) == 16 - done_before  # every prompt finished before the interrupt is reused


def test_identify_picks_the_generating_checkpoint(env):
    _, encoder = build(env)
    node = env.nodes.GMIIdentify
    before = node.fingerprint_inputs()
    for index, name in enumerate(env.names):
        image = to_tensor([fake_image(index, "an unseen prompt about a harbour", 99_000 + index)])
        out = node.execute(encoder, image, "gmi", 3, 1, prompt="", prompt_set="platform", max_prompts=4)
        model, clip, vae, chosen, text, lora_name, lora_strength = out.result
        assert (lora_name, lora_strength) == ("", 0.0)  # a checkpoint row: no LoRA applied
        assert chosen == name and model == f"MODEL<{name}>" and clip == f"CLIP<{name}>" and vae == f"VAE<{name}>"
        ui = out.ui["gmi_ranking"][0]
        assert ui["ranking"][0]["name"] == name and ui["chosen"] == name and len(ui["ranking"]) == 3
        assert json.loads(text) == ui and out.ui["text"] == [name]
        thumb = ui["ranking"][0]["top_prompts"][0]["thumbnail"]
        assert thumb.startswith("/gmi/thumbnail?sha256=") and ui["prompt_source"] == "interrogator"
    # several reference images, a user prompt, another rank, another method
    images = to_tensor([fake_image(2, "a cat", 5), fake_image(2, "a dog", 6)])
    out = node.execute(encoder, images, "rkme_clip", 0, 2, prompt="a cat", max_prompts=4)
    assert out.result[3] != "ck2.safetensors" and out.ui["gmi_ranking"][0]["ranking"][0]["name"] == "ck2.safetensors"
    assert len(out.ui["gmi_ranking"][0]["ranking"]) == 4
    with pytest.raises(Exception, match="pick_rank"):
        node.execute(encoder, images, "gmi", 0, 9, max_prompts=4)
    assert node.fingerprint_inputs() == before  # identify does not touch the store
    build(env, which="all")
    assert node.fingerprint_inputs() != before


def test_identify_without_specs_says_so(env):
    encoder = load_encoder(env)
    with pytest.raises(Exception, match="build specs first"):
        env.nodes.GMIIdentify.execute(encoder, to_tensor([fake_image(0, "x", 1)]), "gmi", 5, 1)


def test_interrogate_node(env):
    encoder = load_encoder(env)
    out = env.nodes.GMIInterrogate.execute(encoder, to_tensor([fake_image(0, "x", 1)]))
    (text,) = out.result
    assert isinstance(text, str) and text and json.loads(json.dumps(out.ui.as_dict())) == {"text": [text]}


def test_tensor_to_pils_handles_batches_and_range(env):
    host = env.nodes.host
    t = torch.rand(3, 16, 24, 3) * 1.4 - 0.2
    pils = host.tensor_to_pils(t)
    assert len(pils) == 3 and pils[0].size == (24, 16) and pils[0].mode == "RGB"
    assert host.tensor_to_pils(torch.rand(8, 8, 3))[0].size == (8, 8)


def test_checkpoint_names_resolve_only_through_folder_paths(env):
    host = env.nodes.host
    assert host.checkpoint_path("ck0.safetensors").name == "ck0.safetensors"
    for bad in ("../user/gmi/panel.json", "/etc/passwd", "missing.safetensors"):
        with pytest.raises(Exception, match="no checkpoint named"):
            host.checkpoint_path(bad)


def test_routes(env):
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    build(env)
    routes_mod = env.nodes.routes
    server = types.SimpleNamespace(routes=web.RouteTableDef())
    routes_mod.register(server)
    app = web.Application()
    app.add_routes(server.routes)

    async def scenario():
        async with TestClient(TestServer(app)) as client:
            r = await client.get("/gmi/status")
            data = await r.json()
            assert r.status == 200, data
            assert {c["name"]: c["state"] for c in data["checkpoints"]} == {n: "ready" for n in env.names}
            assert len(data["skipped"]) == 2
            r = await client.get("/gmi/options")
            options = await r.json()
            assert "tiny.safetensors" in options["encoders"]
            # the panel queues the Build node with exactly these inputs: every widget, last used values
            build_widgets = widgets(env.nodes.GMIBuildSpecs)
            assert set(options["build_inputs"]) == set(build_widgets) - {"encoder"}
            assert options["build_inputs"]["max_prompts"] == 4 and options["build_inputs"]["which"] == "missing"
            r = await client.get("/gmi/defaults")
            defaults = await r.json()
            assert defaults["limits"]["seed"]["max"] == build_widgets["seed"][1]["max"]
            assert defaults["limits"]["max_prompts"]["max"] == build_widgets["max_prompts"][1]["max"]
            assert defaults["generation"]["sampler"] == build_widgets["sampler_name"][1]["default"]

            form = {"encoder": "tiny.safetensors", "max_prompts": "4", "top_k": "2"}
            import io

            import aiohttp

            buf = io.BytesIO()
            fake_image(3, "a harbour", 4242).save(buf, "PNG")
            data = aiohttp.FormData(form)
            data.add_field("image", buf.getvalue(), filename="q.png", content_type="image/png")
            r = await client.post("/gmi/identify", data=data)
            result = await r.json()
            assert r.status == 200, result
            assert result["ranking"][0]["name"] == "ck3.safetensors" and len(result["ranking"]) == 2
            r = await client.get(result["ranking"][0]["top_prompts"][0]["thumbnail"])
            assert r.status == 200 and (await r.read())[:4] == b"\x89PNG"

            bad = aiohttp.FormData({"encoder": "tiny.safetensors"})
            bad.add_field("image", b"not an image", filename="x.png", content_type="image/png")
            r = await client.post("/gmi/identify", data=bad)
            assert r.status == 400 and "not an image" in (await r.json())["error"]
            for q in (
                "sha256=../../x&encoder_id=a&prompt_set_hash=ab&prompt=0",
                "sha256=" + "a" * 64 + "&encoder_id=../../etc&prompt_set_hash=ab&prompt=0",
                "sha256=" + "a" * 64 + "&encoder_id=x&prompt_set_hash=ab&prompt=0",
            ):
                r = await client.get("/gmi/thumbnail?" + q)
                assert r.status in (400, 404)

    asyncio.run(scenario())


def test_build_announces_its_plan_reports_eta_and_ends_on_interrupt(env, monkeypatch):
    sent = []
    monkeypatch.setattr(env.nodes.events, "send", lambda event, data: sent.append((event, data)))
    FakeGenerator.interrupt_after = 3
    with pytest.raises(Interrupted):
        build(env, budget="allx1")
    assert sent[0] == (
        "gmi.build.plan",
        {
            "budget": "4x1",
            "images": 16,
            "generate_calls": 16,
            "checkpoints": [{"name": n, "images": 4} for n in env.names],
        },
    ), "the plan is announced before anything renders"
    progress = [data for event, data in sent if event == "gmi.build.progress"]
    assert progress[0]["images_planned"] == 16 and progress[0]["eta_s"] is None
    assert progress[0]["eta"] == "ETA after the first images" and progress[-1]["eta"].startswith("ETA 0m")
    assert progress[-1]["images_rendered"] == 4 and progress[-1]["seconds_per_image"] > 0 and progress[-1]["eta_s"] > 0
    assert sent[-1][0] == "gmi.build.done" and sent[-1][1]["cancelled"], "the panel's progress ends on interrupt"

    FakeGenerator.interrupt_after, FakeGenerator.calls, sent[:] = None, [], []
    build(env, budget="allx2")  # a larger budget: only the missing images
    assert sent[0][1]["images"] == 4 * 4 * 2 - 4
    assert sum(len(seeds) for _, _, seeds in FakeGenerator.calls) == 28


def test_batched_noise_equals_each_seed_alone(env, monkeypatch):
    sample = types.ModuleType("comfy.sample")
    sample.prepare_noise = lambda latent, seed: torch.randn(latent.size(), generator=torch.manual_seed(seed))
    monkeypatch.setitem(sys.modules, "comfy.sample", sample)
    monkeypatch.setattr(sys.modules["comfy"], "sample", sample, raising=False)
    host = env.nodes.host
    latent = torch.zeros(3, 4, 8, 8)
    batch = host.per_seed_noise(latent, [5, 6, 7])
    assert torch.equal(batch[1:2], sample.prepare_noise(latent[:1], 6))
    assert host.batches_exactly("euler") and host.batches_exactly("dpmpp_2m")
    assert not host.batches_exactly("euler_ancestral") and not host.batches_exactly("dpmpp_2m_sde_gpu")


def test_each_family_renders_at_its_own_size(env):
    """An SDXL-layout header gets SDXL's 1024 px and steps; SD1 keeps 512 px; the node's text changes one family."""
    ckpts = env.base / "models" / "checkpoints"
    save_file(
        {
            "model.diffusion_model.out.2.bias": torch.full((4,), 1.0),
            "first_stage_model.decoder.conv_out.bias": torch.zeros(3),
            "conditioner.embedders.0.transformer.text_model.final_layer_norm.bias": torch.zeros(8),
        },
        str(ckpts / "xl.safetensors"),
        metadata={"index": "1"},
    )
    encoder = load_encoder(env)
    node = env.nodes.GMIBuildSpecs
    node.execute(
        encoder, "listed", "platform", "1x1", "", "euler", "normal", 0, checkpoints="xl.safetensors\nck0.safetensors"
    )
    assert FakeGenerator.sizes == {"xl.safetensors": (1024, 1024, 25), "ck0.safetensors": (512, 512, 20)}
    status = env.nodes.routes.status_payload(env.nodes.settings.load())
    assert {c["name"]: c["family"] for c in status["checkpoints"]}["xl.safetensors"] == "sdxl"
    assert status["family_settings"]["sdxl"]["width"] == 1024 and status["budget"]["images"] == 1

    FakeGenerator.sizes = {}
    node.execute(
        encoder,
        "listed",
        "platform",
        "1x2",
        "sdxl.width=768 sdxl.height=768",
        "euler",
        "normal",
        0,
        checkpoints="xl.safetensors",
    )
    assert FakeGenerator.sizes == {"xl.safetensors": (1024, 1024, 25)}, "a spec is topped up with its own settings"
    status = env.nodes.routes.status_payload(env.nodes.settings.load())
    xl = {c["name"]: c for c in status["checkpoints"]}["xl.safetensors"]
    assert xl["state"] == "ready" and not xl["current"] and "width 1024 (now 768)" in xl["detail"]


class SamplerLikeGenerator(FakeGenerator):
    """FakeGenerator that checks the interrupt as ComfyUI's sampler does, before and while it renders: raising, and
    clearing the flag as it raises (a Cancel during a render loses that prompt's images)."""

    def generate(self, checkpoint, prompt, seeds, settings):
        import comfy.model_management as mm

        mm.throw_exception_if_processing_interrupted()
        images = super().generate(checkpoint, prompt, seeds, settings)  # interrupt_after: Cancel pressed meanwhile
        mm.throw_exception_if_processing_interrupted()
        return images


def test_identify_route_refines_outside_the_queue(env, monkeypatch):
    """POST /gmi/identify with refine=contenders (routes.identify_payload): refused (Busy, 409) while ComfyUI's queue
    holds a prompt; when it is idle a Cancel pressed earlier does not stop it, it renders only the contenders' missing
    images, sends the panel's progress and done events; ComfyUI's Cancel during it (the sampler raises and clears the
    flag) keeps the images and still answers; bad refine values are InvalidInput."""
    from types import SimpleNamespace

    monkeypatch.setattr(env.nodes.route_refine, "ComfyGenerator", SamplerLikeGenerator)
    twin = write_fake_checkpoint(env.base / "models" / "checkpoints" / "ck0-twin.safetensors", len(COLOURS)).name
    build(env, budget="4x1")
    bars, FakeGenerator.calls = len(env.state["bars"]), []
    sent, waiting = [], [1]
    queue = SimpleNamespace(get_tasks_remaining=lambda: waiting[0])
    server = SimpleNamespace(prompt_queue=queue, send_sync=lambda event, data: sent.append((event, data)))
    monkeypatch.setattr(sys.modules["server"].PromptServer, "instance", server)
    png = io.BytesIO()
    fake_image(0, "an unseen prompt about a harbour", 99_000).save(png, format="PNG")
    upload = [("q.png", png.getvalue())]
    fields = {"encoder": "tiny.safetensors", "max_prompts": "4", "refine": "contenders", "refine_max_images": "0"}
    routes, service = env.nodes.routes, env.nodes.routes.service
    for bad in ({"refine": "yes"}, {"refine_max_images": "-2"}, {"models": "all"}):
        with pytest.raises(env.nodes.routes.InvalidInput):
            routes.identify_payload(upload, {**fields, **bad})

    with pytest.raises(service.Busy) as busy:
        routes.identify_payload(upload, fields)
    assert service.http_status(busy.value) == 409 and FakeGenerator.calls == []

    waiting[0], env.state["interrupt"] = 0, True  # an earlier Cancel, with nothing running
    FakeGenerator.interrupt_after = 1  # the user presses Cancel during the second prompt's render
    stopped = routes.identify_payload(upload, fields)
    assert stopped["refine"]["cancelled"] is True and stopped["refine"]["images_rendered"] == 3, stopped["refine"]
    event, done = sent[-1]
    assert event == "gmi.build.done" and done["cancelled"] and len(done["built"]) == 1, sent[-1]
    FakeGenerator.interrupt_after, FakeGenerator.calls, sent[:] = None, [], []

    data = routes.identify_payload(upload, fields)
    assert {name for name, _, _ in FakeGenerator.calls} == {"ck0.safetensors", twin}, "only the contenders"
    rendered = sum(len(seeds) for _, _, seeds in FakeGenerator.calls)
    assert rendered == 2 * (4 * 4 - 4) - 3 == data["refine"]["images_rendered"] and not data["refine"]["cancelled"]
    assert data["refine"]["before"]["ambiguous"] is True and {r["name"] for r in data["ranking"]} == {*env.names, twin}
    progress = [d for event, d in sent if event == "gmi.build.progress"]
    assert progress[-1]["images_rendered"] == progress[-1]["images_planned"] == rendered and progress[-1]["eta"]
    assert sent[-1][0] == "gmi.build.done" and len(env.state["bars"]) == bars, "no node progress bar outside a node"


def test_identify_node_refines_the_contenders(env, monkeypatch):
    """refine = contenders: a query between a near-duplicate pair renders just that pair's missing spec images with
    the host's generator, shows the ranking before and after; off renders nothing; an interrupt still answers."""
    monkeypatch.setattr(env.nodes.identify_node, "ComfyGenerator", FakeGenerator)
    twin = write_fake_checkpoint(env.base / "models" / "checkpoints" / "ck0-twin.safetensors", len(COLOURS)).name
    _, encoder = build(env, budget="4x1")  # the panel's budget: identify ranks at 4 prompts x 1 image
    node = env.nodes.GMIIdentify
    assert widgets(node)["refine"][1]["options"] == ["off", "contenders"]
    image = to_tensor([fake_image(0, "an unseen prompt about a harbour", 99_000)])

    FakeGenerator.calls = []
    plain = node.execute(encoder, image, "gmi", 0, 1, max_prompts=4, refine="off").ui["gmi_ranking"][0]
    assert FakeGenerator.calls == [] and "refine" not in plain
    assert plain["ambiguous"] is True and set(plain["contenders"]) == {"ck0.safetensors", twin}

    FakeGenerator.interrupt_after = 1  # the user interrupts during the second refine prompt (3 images each)
    stopped = node.execute(encoder, image, "gmi", 0, 1, max_prompts=4, refine="contenders").ui["gmi_ranking"][0]
    assert stopped["refine"]["cancelled"] is True and stopped["refine"]["images_rendered"] == 6
    assert {r["name"] for r in stopped["ranking"]} == {*env.names, twin}
    env.state["interrupt"], FakeGenerator.interrupt_after, FakeGenerator.calls = False, None, []

    out = node.execute(encoder, image, "gmi", 0, 1, max_prompts=4, refine="contenders", refine_max_images=0)
    ui = out.ui["gmi_ranking"][0]
    assert {name for name, _, _ in FakeGenerator.calls} == {"ck0.safetensors", twin}, "only the contenders"
    rendered = sum(len(seeds) for _, _, seeds in FakeGenerator.calls)
    assert rendered == 2 * (4 * 4 - 4) - 6 == ui["refine"]["images_rendered"], "the full budget's missing cells"
    assert ui["refine"]["before"]["ambiguous"] is True and len(ui["refine"]["before"]["ranking"]) == 5
    assert json.loads(out.result[4]) == ui and out.result[3] in ("ck0.safetensors", twin)
    assert env.state["bars"][-1].current == rendered
