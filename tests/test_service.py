"""The host service layer (gmi_core/service.py): the engine pool's bounds, and both hosts answering status and
identify with the same payloads, built by the same code, over one spec store."""

from __future__ import annotations

import gc
import io
import shutil
import weakref

import pytest
import torch

from gmi_core import service
from gmi_core.budgets import parse_budget
from gmi_core.encoders import tiny_encoder
from gmi_core.prompts import PromptSet
from tests.test_a1111_adapter import encoder_file, gmi, webui  # noqa: F401 - fixtures
from tests.test_comfyui_nodes import FakeGenerator, build, env, fake_image  # noqa: F401 - fixtures

torch.set_num_threads(1)


def test_pool_is_bounded_and_an_evicted_encoder_is_released(tmp_path):
    pool = service.EnginePool(max_encoders=2, max_engines=3)
    prompts = PromptSet("p", ("a red car", "a bowl of fruit"))
    loads = []

    def loader(seed):
        def load():
            loads.append(seed)
            return tiny_encoder(seed)

        return load

    first = pool.encoder("a", loader(0))
    assert pool.encoder("a", loader(0)) is first and loads == [0]
    engine = pool.engine(first, tmp_path, prompts, parse_budget("allx1"))
    assert pool.engine(first, tmp_path, prompts, parse_budget("allx1")) is engine
    gone = weakref.ref(first)
    del first, engine
    pool.encoder("b", loader(1))
    pool.encoder("c", loader(2))  # "a" is the least recently used: dropped with its engine
    gc.collect()
    assert gone() is None, "an evicted encoder must not be kept alive by a cached engine"
    pool.encoder("b", loader(1))
    assert loads == [0, 1, 2], "b and c are kept"
    encoder = pool.encoder("c", loader(2))
    assert loads == [0, 1, 2]
    engines = [pool.engine(encoder, tmp_path, prompts, parse_budget(f"allx{k}")) for k in (1, 2, 3, 4)]
    assert pool.engine(encoder, tmp_path, prompts, parse_budget("allx4")) is engines[-1]
    assert pool.engine(encoder, tmp_path, prompts, parse_budget("allx1")) is not engines[0], (
        "over max_engines: the oldest went"
    )


def test_both_hosts_answer_status_and_identify_from_the_same_code(env, webui, tmp_path):  # noqa: F811
    """The ComfyUI routes and the A1111 runtime over one spec store and the same checkpoint files: the same keys
    (top level, per checkpoint, per ranked row and matching spec image), the same states and the same ranking."""
    build(env, budget="4x1", max_prompts=0)  # the ComfyUI node builds the specs of ck0..ck3
    for name in env.names:
        shutil.copy(env.base / "models" / "checkpoints" / name, webui.ckpt_dir / name)
    webui.refresh()
    gmi("options").on_ui_settings()
    opts = webui.shared.opts
    webui.modules["modules.paths"].data_path = str(env.base)  # settings may name files in the WebUI's data folder
    opts.set("gmi_encoder", str(env.base / "models" / "gmi" / "tiny.safetensors"))
    opts.set("gmi_spec_dir", str(env.base / "user" / "gmi"))  # ComfyUI's store
    opts.set("gmi_budget", "4x1")
    calls = []
    comfy_service = env.nodes.routes.service  # the pack's own copy of gmi_core (relative imports)
    assert comfy_service.__file__ == service.__file__, "both hosts must run gmi_core/service.py"
    originals = {
        (m, name): getattr(m, name) for m in (comfy_service, service) for name in ("status_payload", "identify_payload")
    }

    def spy(original):
        def wrapped(*args, **kwargs):
            calls.append(original.__name__)
            return original(*args, **kwargs)

        return wrapped

    for (module, name), original in originals.items():
        setattr(module, name, spy(original))
    try:
        comfy = env.nodes.routes.status_payload(env.nodes.routes.status_config({}))
        a1111 = gmi("runtime").status()
        assert calls == ["status_payload", "status_payload"]
        assert comfy.keys() == a1111.keys()
        assert [c.keys() for c in comfy["checkpoints"]] == [c.keys() for c in a1111["checkpoints"]]
        states = {c["sha256"]: (c["state"], c["images_done"]) for c in comfy["checkpoints"]}
        assert states == {c["sha256"]: (c["state"], c["images_done"]) for c in a1111["checkpoints"]}
        assert {state for state, _ in states.values()} == {"ready"} and comfy["budget"] == a1111["budget"]

        image = fake_image(2, "a harbour", 4242)
        png = io.BytesIO()
        image.save(png, "PNG")
        comfy = env.nodes.routes.identify_payload([("q.png", png.getvalue())], {"prompt": "a harbour", "top_k": "4"})
        _, a1111 = gmi("runtime").identify([image], prompt="a harbour", top_k=4, thumbnails=True)
        assert calls[2:] == ["identify_payload", "identify_payload"]
    finally:
        for (module, name), original in originals.items():
            setattr(module, name, original)
    assert comfy.keys() == a1111.keys() and comfy["chosen"] == a1111["chosen"] == "ck2.safetensors"
    assert [r["name"] for r in comfy["ranking"]] == [r["name"] for r in a1111["ranking"]]
    assert [r["score"] for r in comfy["ranking"]] == pytest.approx([r["score"] for r in a1111["ranking"]], rel=1e-4)
    for c_row, a_row in zip(comfy["ranking"], a1111["ranking"]):
        assert c_row.keys() == a_row.keys()
        assert [m.keys() for m in c_row["top_prompts"]] == [m.keys() for m in a_row["top_prompts"]]
    match = comfy["ranking"][0]["top_prompts"][0]
    assert match["thumbnail"].startswith("/gmi/thumbnail?sha256=")  # ComfyUI: its thumbnail route
    assert a1111["ranking"][0]["top_prompts"][0]["thumbnail"].startswith("data:image/png;base64,")  # A1111: inline


def test_build_renders_its_plan_lists_once_and_counts_only_specs_that_render(env):  # noqa: F811
    """The plan a front end showed is what build() renders: one listing (and hashing) per build, and a checkpoint
    with nothing to render is reported built without counting in the progress."""
    build(env, which="listed", budget="2x1", checkpoints="ck0.safetensors")
    (encoder,) = env.nodes.GMILoadEncoder.execute("tiny.safetensors").result
    per_family = env.nodes.settings.family_settings("steps=3 width=64 height=64", "euler", "normal")
    engine = env.nodes.engines.get_engine(encoder, env.nodes.engines.get_prompt_set("platform", 4), "2x1", per_family)
    listings = []

    class CountingSource:
        def list_checkpoints(self):
            listings.append(1)
            return env.nodes.engines.source().list_checkpoints()

    plan = engine.plan(CountingSource(), ["ck0.safetensors", "ck1.safetensors"])
    assert plan.checkpoints == [("ck0.safetensors", 0), ("ck1.safetensors", 2)] and plan.images == 2
    progress = []
    report = engine.build(CountingSource(), FakeGenerator(), plan=plan, progress=progress.append)
    assert len(listings) == 1, "build() must not list (and hash) the checkpoints again"
    assert report.built == ["ck0.safetensors", "ck1.safetensors"] and not report.failed
    assert {(p.checkpoint, p.checkpoint_index, p.checkpoint_count) for p in progress} == {("ck1.safetensors", 0, 1)}
    assert progress[-1].images_rendered == progress[-1].images_planned == 2
