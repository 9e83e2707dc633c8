"""Hub build on Ray, in a local Ray on the CPU with tiny checkpoints and 2 workers: the specs are the local
builder's, byte for byte; a worker killed mid-checkpoint resumes without rendering finished prompts again."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
import time

import pytest
import torch

ray = pytest.importorskip("ray", reason="the hub extra is not installed (pip install 'gmi[hub]')")

from gmi_core.cli import build_parser, main  # noqa: E402
from gmi_core.demo import prepare_demo_models  # noqa: E402
from gmi_core.hub.build import HubBuild, engine_options, plan_build  # noqa: E402
from gmi_core.spec import Spec  # noqa: E402

torch.set_num_threads(1)  # as in each Ray worker (one CPU each): the same float results
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    models, config, encoder_file = prepare_demo_models(root, 2)
    prompts = root / "prompts.txt"
    prompts.write_text(
        "a red barn in a field\na portrait of an old sailor\na bowl of fruit on a table\n"
        "a city street at night\na mountain lake at dawn\na cat asleep on a sofa\n"
    )
    return {"models": models, "config": config, "encoder": encoder_file, "prompts": prompts}


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray whose session files (logs, sockets) go to a temp folder removed afterwards; a short path, as
    Ray's socket paths must fit in 107 characters."""
    temp = tempfile.mkdtemp(prefix="gmi-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
    try:
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp)
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def _args(world, home, budget="3x2"):
    return [
        "--models",
        str(world["models"]),
        "--home",
        str(home),
        "--encoder",
        str(world["encoder"]),
        "--prompt-set",
        str(world["prompts"]),
        "--budget",
        budget,
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--config",
        str(world["config"]),
    ]


def _spec_files(store):
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.glob("specs/*/*.safetensors"))}


def test_ray_build_is_the_local_build(world, local_ray, tmp_path, capsys):
    assert main(["build", *_args(world, tmp_path / "local")]) == 0
    capsys.readouterr()
    store = tmp_path / "hub-store"
    assert (
        main(["hub", "build", *_args(world, tmp_path / "hub"), "--store", str(store), "--workers", "2", "--json"]) == 0
    )
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert len(report["built"]) == 2 and report["images"] == 2 * 3 * 2 and report["workers"] == 2
    assert "2/2 checkpoints, 12/12 images" in out.err, "progress: checkpoints, images, ETA"
    local, hub = _spec_files(tmp_path / "local" / "specs"), _spec_files(store)
    assert len(hub) == 2 and hub.keys() == local.keys()
    assert all(hub[k] == local[k] for k in hub), "tensors and metadata byte for byte (specs hold no timestamps)"

    # a second job finds every spec ready and renders nothing
    assert main(["hub", "build", *_args(world, tmp_path / "hub"), "--store", str(store), "--workers", "2"]) == 0
    assert "nothing to build" in capsys.readouterr().out


def test_killed_worker_resumes_without_rendering_finished_prompts(world, local_ray, tmp_path):
    args = build_parser().parse_args(
        [
            "hub",
            "build",
            *_args(world, tmp_path / "home", budget="allx2"),
            "--store",
            str(tmp_path / "store"),
            "--workers",
            "2",
        ]
    )
    gmi, plan, _ = plan_build(args)
    first, images_first = plan[0]
    assert images_first == 6 * 2
    hub = HubBuild(engine_options(args), workers=2)
    try:
        results = []
        job = threading.Thread(target=lambda: results.append(hub.run(plan)))
        job.start()
        spec_path = gmi.store.path_for(gmi.key(first))
        deadline = time.monotonic() + 300
        while not spec_path.exists() and time.monotonic() < deadline:  # the first prompt is saved
            time.sleep(0.02)
        killed = hub.pids[hub.assignments[first.name]]
        os.kill(killed, signal.SIGKILL)
        saved = sum(Spec.load(spec_path).image_counts)
        assert 0 < saved < images_first, "killed after its first prompt and before its last"
        job.join(timeout=600)
        [report] = results
    finally:
        hub.close()
    result = next(r for r in report.results if r["name"] == first.name)
    assert result["state"] == "built" and result["pid"] != killed, "a restarted worker finished it"
    assert result["images"] == images_first - saved, "only the prompts not saved before the kill are rendered again"
    assert sorted(report.built) == sorted(c.name for c, _ in plan)
    assert Spec.load(spec_path).complete


def test_models_list_file(world, tmp_path):
    from gmi_core.hub.build import checkpoint_source

    listed = tmp_path / "models.txt"
    first = sorted(world["models"].glob("*.safetensors"))[0]
    listed.write_text(f"# the hub's checkpoints\n{first}\n\nmissing.safetensors\n")
    listing = checkpoint_source(listed, tmp_path / "hashes.json").list_checkpoints()
    assert [c.name for c in listing.checkpoints] == [first.name] and listing.checkpoints[0].family == "sd1"
    assert [(s.name, s.reason) for s in listing.skipped] == [("missing.safetensors", "file not found")]
    folder = checkpoint_source(world["models"], tmp_path / "hashes.json").list_checkpoints()
    assert folder.checkpoints[0].sha256 == listing.checkpoints[0].sha256
