"""A faithful fake of the few A1111 ``modules.*`` names gmi's WebUI adapter uses (tests only).

Signatures and behaviour follow stable-diffusion-webui v1.10.1:
- ``sd_models.CheckpointInfo``: name relative to the checkpoint folder, ``title`` gains " [shorthash]" only after
  hashing, ``checkpoints_list`` keyed by title, ``checkpoint_aliases`` by every id, ``calculate_shorthash()``.
- ``hashes.sha256(filename, title)``: cached; None under ``--no-hashing``.
- ``processing.StableDiffusionProcessingTxt2Img``: a dataclass with the real field names (a wrong keyword fails);
  ``process_images`` applies ``override_settings`` after ``scripts.before_process`` (checkpoint reloaded), restores
  the options afterwards but leaves the override model loaded, honours ``state.interrupted`` and calls
  ``state.nextjob()`` once per batch.
- ``shared.opts.set`` runs the option's ``onchange``; for sd_model_checkpoint that reloads the weights.
- ``call_queue.queue_lock`` is not re-entrant (the real FIFOLock is not either); ``sd_models.model_data.lock``
  guards the first model load; ``sd_models.get_closet_checkpoint_match`` is the real function.
- ``modules.api.api.Api``: registers /sdapi/v1/ routes on a FastAPI app, each with ``Depends(self.auth)`` (HTTP
  Basic against ``--api-auth``) when ``cmd_opts.api_auth`` is set, like the real one.

Images: a checkpoint "renders" its own colour (from its file bytes) plus prompt- and seed-dependent noise.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import threading
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

try:  # the fake Api needs FastAPI (a test extra), like the real one
    from secrets import compare_digest

    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic, HTTPBasicCredentials

    _BASIC = Depends(HTTPBasic())
except ImportError:  # pragma: no cover
    Depends = HTTPException = HTTPBasicCredentials = _BASIC = None


class FakeWebui:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.models_path = self.root / "models"
        self.ckpt_dir = self.models_path / "Stable-diffusion"
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.config_filename = str(self.root / "config.json")
        self.hash_calls: list[str] = []
        self.process_calls: list[Any] = []
        self.reloads: list[str] = []
        self.interrupt_after: int | None = None  # interrupt during the n-th process_images call
        self.modules = self._build()

    # -- install into sys.modules -------------------------------------------------------------
    def install(self, monkeypatch) -> None:
        for name, module in self.modules.items():
            monkeypatch.setitem(sys.modules, name, module)
        monkeypatch.delitem(sys.modules, "modules_forge", raising=False)

    def _build(self) -> dict[str, types.ModuleType]:
        fake = self
        m = {
            name: types.ModuleType(name)
            for name in (
                "modules",
                "modules.shared",
                "modules.sd_models",
                "modules.hashes",
                "modules.processing",
                "modules.call_queue",
                "modules.paths",
                "modules.progress",
                "modules.script_callbacks",
                "modules.scripts",
                "modules.api",
                "modules.api.api",
                "modules.devices",
            )
        }
        pkg = m["modules"]
        pkg.__path__ = []
        for name, module in m.items():
            if name.count(".") == 1:
                setattr(pkg, name.split(".", 1)[1], module)
        m["modules.api"].__path__ = []
        m["modules.api"].api = m["modules.api.api"]

        # ---- shared ----
        shared = m["modules.shared"]

        class OptionInfo:
            def __init__(
                self,
                default=None,
                label="",
                component=None,
                component_args=None,
                onchange=None,
                section=None,
                refresh=None,
                comment_before="",
                comment_after="",
                infotext=None,
                restrict_api=False,
                category_id=None,
            ):
                self.default, self.label, self.component, self.component_args = (
                    default,
                    label,
                    component,
                    component_args,
                )
                self.onchange, self.section, self.restrict_api = onchange, section, restrict_api
                self.comment_after = comment_after
                self.do_not_save = False

            def info(self, info):  # as modules/options.py: help text after the label
                self.comment_after += f"<span class='info'>({info})</span>"
                return self

        class Options:
            def __init__(self):
                object.__setattr__(self, "data", {"sd_model_checkpoint": None})
                object.__setattr__(
                    self,
                    "data_labels",
                    {
                        "sd_model_checkpoint": OptionInfo(
                            None, "Stable Diffusion checkpoint", onchange=lambda: fake.reload_model_weights()
                        ),
                    },
                )
                object.__setattr__(self, "saved", [])

            def __getattr__(self, item):
                if item in self.data:
                    return self.data[item]
                if item in self.data_labels:
                    return self.data_labels[item].default
                raise AttributeError(item)

            def __setattr__(self, key, value):
                self.data[key] = value

            def set(self, key, value, is_api=False, run_callbacks=True):
                oldval = self.data.get(key, None)
                if oldval == value:
                    return False
                option = self.data_labels[key]
                setattr(self, key, value)
                if run_callbacks and option.onchange is not None:
                    option.onchange()
                return True

            def add_option(self, key, info):
                self.data_labels[key] = info
                if key not in self.data:
                    self.data[key] = info.default

            def save(self, filename):
                self.saved.append(filename)

        class State:
            skipped = interrupted = stopping_generation = False
            job = ""
            job_no = job_count = 0
            textinfo = None
            sampling_step = 0

            def begin(self, job="(unknown)"):
                self.job_count, self.job_no, self.job = -1, 0, job
                self.skipped = self.interrupted = self.stopping_generation = False
                self.textinfo = None
                fake.state_log.append(("begin", job))

            def end(self):
                self.job, self.job_count = "", 0
                fake.state_log.append(("end", None))

            def interrupt(self):
                self.interrupted = True

            def nextjob(self):
                self.job_no += 1

        self.state_log: list = []
        shared.OptionInfo = OptionInfo
        shared.opts = Options()
        shared.state = State()
        shared.cmd_opts = types.SimpleNamespace(
            ckpt_dir=None,
            no_hashing=False,
            use_cpu=["all"],
            clip_models_path=None,
            freeze_settings=False,
            api=False,
            api_auth=None,
            nowebui=False,
        )
        shared.config_filename = self.config_filename
        shared.sd_model = None
        self.shared = shared

        # ---- hashes ----
        hashes = m["modules.hashes"]
        cache: dict[str, str] = {}

        def sha256_from_cache(filename, title, use_addnet_hash=False):
            return cache.get(title)

        def sha256(filename, title, use_addnet_hash=False):
            if title in cache:
                return cache[title]
            if shared.cmd_opts.no_hashing:
                return None
            fake.hash_calls.append(title)
            cache[title] = hashlib.sha256(Path(filename).read_bytes()).hexdigest()
            return cache[title]

        hashes.sha256 = sha256
        hashes.sha256_from_cache = sha256_from_cache

        # ---- sd_models ----
        sd_models = m["modules.sd_models"]
        sd_models.checkpoints_list = {}
        sd_models.checkpoint_aliases = {}

        class CheckpointInfo:
            def __init__(self, filename):
                self.filename = str(filename)
                name = os.path.relpath(self.filename, fake.ckpt_dir).replace("\\", "/")
                self.name = name
                self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
                self.model_name = os.path.splitext(name.replace("/", "_"))[0]
                self.hash = hashlib.sha256(name.encode()).hexdigest()[:8]  # the old colliding 8-hex hash
                self.sha256 = sha256_from_cache(self.filename, f"checkpoint/{name}")
                self.shorthash = self.sha256[:10] if self.sha256 else None
                self.title = name if self.shorthash is None else f"{name} [{self.shorthash}]"
                self.ids = [self.hash, self.model_name, self.title, name, self.name_for_extra]
                if self.shorthash:
                    self.ids += [self.shorthash, self.sha256, f"{name} [{self.shorthash}]"]

            def register(self):
                sd_models.checkpoints_list[self.title] = self
                for i in self.ids:
                    sd_models.checkpoint_aliases[i] = self

            def calculate_shorthash(self):
                self.sha256 = sha256(self.filename, f"checkpoint/{self.name}")
                if self.sha256 is None:
                    return None
                shorthash = self.sha256[:10]
                if self.shorthash == shorthash:
                    return shorthash
                self.shorthash = shorthash
                if shorthash not in self.ids:
                    self.ids += [shorthash, self.sha256, f"{self.name} [{shorthash}]"]
                old_title = self.title
                self.title = f"{self.name} [{shorthash}]"
                sd_models.checkpoints_list.pop(old_title, None)
                self.register()
                return shorthash

        def list_models():
            sd_models.checkpoints_list.clear()
            sd_models.checkpoint_aliases.clear()
            for path in sorted(fake.ckpt_dir.rglob("*")):
                if path.suffix.lower() in (".safetensors", ".ckpt"):
                    CheckpointInfo(path).register()

        re_strip_checksum = re.compile(r"\s*\[[^]]+]\s*$")

        def get_closet_checkpoint_match(search_string):
            if not search_string:
                return None
            checkpoint_info = sd_models.checkpoint_aliases.get(search_string, None)
            if checkpoint_info is not None:
                return checkpoint_info
            found = sorted(
                [i for i in sd_models.checkpoints_list.values() if search_string in i.title], key=lambda x: len(x.title)
            )
            if found:
                return found[0]
            without_checksum = re.sub(re_strip_checksum, "", search_string)
            found = sorted(
                [i for i in sd_models.checkpoints_list.values() if without_checksum in i.title],
                key=lambda x: len(x.title),
            )
            return found[0] if found else None

        sd_models.CheckpointInfo = CheckpointInfo
        sd_models.list_models = list_models
        sd_models.get_closet_checkpoint_match = get_closet_checkpoint_match
        sd_models.model_data = types.SimpleNamespace(
            sd_model=None, lock=threading.Lock(), was_loaded_at_least_once=False
        )
        sd_models.reload_model_weights = lambda sd_model=None, info=None, forced_reload=False: (
            fake.reload_model_weights()
        )
        self.sd_models = sd_models

        # ---- processing ----
        processing = m["modules.processing"]

        @dataclass
        class Processed:
            images: list
            infotexts: list = field(default_factory=list)

        @dataclass(repr=False)
        class StableDiffusionProcessingTxt2Img:
            sd_model: object = None
            outpath_samples: str = None
            outpath_grids: str = None
            prompt: Any = ""
            negative_prompt: Any = ""
            styles: list = None
            seed: Any = -1
            subseed: int = -1
            subseed_strength: float = 0
            sampler_name: str = None
            scheduler: str = None
            batch_size: int = 1
            n_iter: int = 1
            steps: int = 50
            cfg_scale: float = 7.0
            width: int = 512
            height: int = 512
            do_not_save_samples: bool = False
            do_not_save_grid: bool = False
            extra_generation_params: dict = None
            override_settings: dict = None
            override_settings_restore_afterwards: bool = True
            enable_hr: bool = False
            scripts: object = None
            script_args: list = None

            def __post_init__(self):
                self.override_settings = dict(self.override_settings or {})
                self.extra_generation_params = dict(self.extra_generation_params or {})
                self.comments = []

            def comment(self, text):
                self.comments.append(text)

            def close(self):
                pass

        def process_images(p):
            fake.process_calls.append(p)
            if p.scripts is not None:
                p.scripts.before_process(p)
            opts = shared.opts
            stored = {k: opts.data.get(k) for k in p.override_settings if k in opts.data}
            try:
                if sd_models.checkpoint_aliases.get(p.override_settings.get("sd_model_checkpoint")) is None:
                    p.override_settings.pop("sd_model_checkpoint", None)
                    fake.reload_model_weights()
                for k, v in p.override_settings.items():
                    opts.set(k, v, is_api=True, run_callbacks=False)
                    if k == "sd_model_checkpoint":
                        fake.reload_model_weights()
                if fake.interrupt_after is not None and len(fake.process_calls) >= fake.interrupt_after:
                    shared.state.interrupted = True
                if shared.state.job_count == -1:
                    shared.state.job_count = p.n_iter
                images = []
                if not shared.state.interrupted:
                    prompts = p.prompt if isinstance(p.prompt, list) else [p.prompt] * p.batch_size
                    seeds = p.seed if isinstance(p.seed, list) else [p.seed + i for i in range(p.batch_size)]
                    info = shared.sd_model.sd_checkpoint_info
                    images = [fake.render(info.filename, pr, sd, p.width, p.height) for pr, sd in zip(prompts, seeds)]
                    shared.state.nextjob()
                return Processed(images, [""] * len(images))
            finally:
                if p.override_settings_restore_afterwards:
                    for k, v in stored.items():
                        opts.data[k] = v

        processing.Processed = Processed
        processing.StableDiffusionProcessingTxt2Img = StableDiffusionProcessingTxt2Img
        processing.process_images = process_images

        # ---- call_queue, paths, progress, callbacks, scripts ----
        call_queue = m["modules.call_queue"]
        call_queue.queue_lock = threading.Lock()
        m["modules.paths"].models_path = str(self.models_path)
        m["modules.devices"].device_interrogate = torch.device("cpu")  # as with --use-cpu all
        m["modules.paths"].data_path = str(self.root)
        progress = m["modules.progress"]
        progress.tasks = []
        progress.add_task_to_queue = lambda id_job: progress.tasks.append(("queued", id_job))
        progress.start_task = lambda id_task: progress.tasks.append(("start", id_task))
        progress.finish_task = lambda id_task: progress.tasks.append(("finish", id_task))
        callbacks = m["modules.script_callbacks"]
        callbacks.registered = {"app_started": [], "ui_tabs": [], "ui_settings": []}
        callbacks.on_app_started = lambda fn: callbacks.registered["app_started"].append(fn)
        callbacks.on_ui_tabs = lambda fn: callbacks.registered["ui_tabs"].append(fn)
        callbacks.on_ui_settings = lambda fn: callbacks.registered["ui_settings"].append(fn)
        scripts = m["modules.scripts"]
        scripts.AlwaysVisible = object()

        class Script:
            pass

        scripts.Script = Script

        class Api:
            """modules/api/api.py's Api: its auth dependency and add_api_route, a few of its routes."""

            def __init__(self, app, queue_lock):
                if shared.cmd_opts.api_auth:
                    self.credentials = {}
                    for auth in shared.cmd_opts.api_auth.split(","):
                        user, password = auth.split(":")
                        self.credentials[user] = password
                self.app, self.queue_lock = app, queue_lock
                self.add_api_route("/sdapi/v1/options", lambda: dict(shared.opts.data), methods=["GET"])
                self.add_api_route(
                    "/sdapi/v1/sd-models", lambda: [{"title": t} for t in sd_models.checkpoints_list], methods=["GET"]
                )

            def add_api_route(self, path, endpoint, **kwargs):
                if shared.cmd_opts.api_auth:
                    return self.app.add_api_route(path, endpoint, dependencies=[Depends(self.auth)], **kwargs)
                return self.app.add_api_route(path, endpoint, **kwargs)

            def auth(self, credentials: HTTPBasicCredentials = _BASIC):
                if credentials.username in self.credentials and compare_digest(
                    credentials.password, self.credentials[credentials.username]
                ):
                    return True
                raise HTTPException(
                    status_code=401, detail="Incorrect username or password", headers={"WWW-Authenticate": "Basic"}
                )

        m["modules.api.api"].Api = Api
        return m

    # -- behaviour ------------------------------------------------------------------------------
    def reload_model_weights(self) -> None:
        title = self.shared.opts.data.get("sd_model_checkpoint")
        info = self.sd_models.checkpoint_aliases.get(title) if title else None
        if info is None:
            info = next(iter(self.sd_models.checkpoints_list.values()), None)
        loaded = self.shared.sd_model
        if loaded is not None and loaded.sd_checkpoint_info is info:
            return
        model = types.SimpleNamespace(sd_checkpoint_info=info)
        self.shared.sd_model = model
        self.sd_models.model_data.sd_model = model
        if info is not None:
            info.calculate_shorthash()  # the real load_model hashes the file it loads
            self.reloads.append(info.name)

    @staticmethod
    def colour_of(filename: str) -> np.ndarray:
        digest = hashlib.sha256(Path(filename).read_bytes()).digest()
        return np.array([digest[0], digest[1], digest[2]], dtype=np.float64)

    def render(self, filename: str, prompt: str, seed: int, width: int, height: int) -> Image.Image:
        base = self.colour_of(filename)
        rng = np.random.default_rng(
            [int(seed) & 0xFFFFFFFF, int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "little")]
        )
        noise = rng.normal(0, 12, (height, width, 3))
        return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")

    # -- checkpoints on disk ------------------------------------------------------------------
    def add_checkpoint(self, name: str, seed: int, kind: str = "sd1") -> Path:
        """A small safetensors file with the key layout gmi_core.checkpoints recognises."""
        import torch
        from safetensors.torch import save_file

        g = torch.Generator().manual_seed(seed)
        keys = {
            "sd1": [
                "model.diffusion_model.input_blocks.0.0.weight",
                "first_stage_model.decoder.conv_out.bias",
                "cond_stage_model.transformer.text_model.final_layer_norm.bias",
            ],
            "lora": ["lora_unet_down_blocks_0.lora_down.weight", "lora_te_text_model.lora_up.weight"],
        }[kind]
        path = self.ckpt_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: torch.randn(4, 4, generator=g) for k in keys}, str(path))
        return path

    def refresh(self) -> None:
        self.sd_models.list_models()
