"""A lock per spec across processes and threads: the second build skips; no duplicate rendering; temp files cleaned.

Moved from tests/test_faults.py (issue 11's fault suite, split by class in issue 19); each test name still
starts with its class."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading

import torch

from gmi_core.paths import FILE_MODE
from tests.faults.harness import (
    REPO,
    PaintingGenerator,
    hold_lock_in_another_process,
)

torch.set_num_threads(1)


# ===================================================================================================================
# Faults: a lock per spec across processes; the second build skips; no duplicate rendering; temp files cleaned
# ===================================================================================================================
def test_faults_lock_second_process_skips_and_renders_nothing(core):
    target = core.spec_path("m1.safetensors")
    target.unlink()
    holder = hold_lock_in_another_process(target)
    try:
        generator = PaintingGenerator()
        report = core.gmi().build(core.source(), generator, "missing")
        assert report.built == [] and generator.calls == []
        skipped = {s.name: s.reason for s in report.skipped}
        assert skipped == {"m1.safetensors": f"being built by pid {holder.pid}"}
    finally:
        holder.kill()
        holder.wait()
    # kill -9 released the lock: the next build proceeds and leaves no temp file
    (target.parent / f"{target.name}.abc123.tmp").write_bytes(b"half a spec from a killed writer")
    report = core.gmi().build(core.source(), PaintingGenerator(), "missing")
    assert report.built == ["m1.safetensors"]
    assert not list(target.parent.glob("*.tmp")) and set(core.states().values()) == {"ready"}


def test_faults_lock_two_real_builds_at_once_render_each_prompt_once(core, tmp_path):
    for name in ("m0.safetensors", "m1.safetensors", "m2.safetensors"):
        core.spec_path(name).unlink()
    script = f"""
import sys, json
sys.path.insert(0, {str(REPO)!r})
from pathlib import Path
from tests.faults.harness import World, PaintingGenerator
w = World.__new__(World)
root = Path({str(core.root)!r})
w.root, w.models, w.home = root, root / "models", root / "home"
from gmi_core.encoders import tiny_encoder
from gmi_core.prompts import load_prompt_set
w.encoder, w.prompts = tiny_encoder(0), load_prompt_set("platform").head(3)
g = PaintingGenerator()
r = w.gmi().build(w.source(), g, "missing")
print(json.dumps({{"built": r.built, "calls": len(g.calls), "skipped": [s.name for s in r.skipped]}}))
"""
    env_vars = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env_vars,
        )
        for _ in range(2)
    ]
    outs = [json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in procs]
    built = sorted(n for o in outs for n in o["built"])
    # every spec built exactly once overall; a process that met a lock skipped, the other rendered
    assert sorted(set(built)) == built
    calls = sum(o["calls"] for o in outs)
    assert calls == 3 * len(built)
    states = core.states()
    assert all(states[n] == "ready" for n in built)
    # whatever was skipped is simply built by the next run
    core.gmi().build(core.source(), PaintingGenerator(), "missing")
    assert set(core.states().values()) == {"ready"}


def test_faults_lock_spec_files_get_normal_permissions(core):
    mode = stat.S_IMODE(core.spec_path("m0.safetensors").stat().st_mode)
    assert mode == FILE_MODE and mode & 0o044  # not mkstemp's 0600: readable like any other new file
    assert stat.S_IMODE((core.home / "specs" / "manifest.json").stat().st_mode) == FILE_MODE


def test_faults_lock_two_threads_one_process_build_once(core):
    core.spec_path("m1.safetensors").unlink()
    started, release = threading.Event(), threading.Event()

    class SlowGenerator(PaintingGenerator):
        def generate(self, *args, **kwargs):
            started.set()
            release.wait(30)
            return super().generate(*args, **kwargs)

    first, second = SlowGenerator(), PaintingGenerator()
    reports = {}
    worker = threading.Thread(
        target=lambda: reports.setdefault("first", core.gmi().build(core.source(), first, "missing"))
    )
    worker.start()
    assert started.wait(30)
    reports["second"] = core.gmi().build(core.source(), second, "missing")
    release.set()
    worker.join(60)
    assert reports["first"].built == ["m1.safetensors"] and second.calls == []
    assert [s.name for s in reports["second"].skipped if "being built" in s.reason] == ["m1.safetensors"]
    assert set(core.states().values()) == {"ready"}
