"""Start the real A1111 WebUI on CPU (127.0.0.1, a private --data-dir) with gmi installed as an extension."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

LAUNCH_FLAGS = [
    "--skip-prepare-environment",
    "--skip-torch-cuda-test",
    "--skip-version-check",
    "--use-cpu",
    "all",
    "--no-half",
    "--no-download-sd-model",
    "--api",
    "--server-name",
    "127.0.0.1",
]

# printed by the WebUI (and Forge) after its API routes, middleware and app_started callbacks are added; a request
# that arrives after Gradio's launch but before then makes the WebUI exit with "Cannot add middleware after an
# application has started" (Starlette builds its middleware stack on the first request)
STARTED = "Startup time:"


def webui_python(webui: Path) -> Path:
    explicit = os.environ.get("GMI_A1111_PYTHON")
    candidates = [Path(explicit)] if explicit else []
    candidates += [
        webui / "venv" / "bin" / "python",
        webui.parent / "venv" / "bin" / "python",
        webui / "venv" / "Scripts" / "python.exe",
    ]
    for c in candidates:
        if c.is_file():
            return c
    return Path(sys.executable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebuiServer:
    def __init__(
        self,
        webui: Path,
        data_dir: Path,
        extension_root: Path,
        log_path: Path,
        extra_env: dict | None = None,
        api_auth: str | None = None,
        launch_flags: list[str] | None = None,
        python: Path | None = None,
    ):
        """``api_auth`` ("user:password") starts the WebUI with --api-auth; requests then send those credentials.
        ``launch_flags`` and ``python`` default to the A1111 WebUI's (Forge passes its own)."""
        self.webui, self.data_dir, self.log_path = Path(webui), Path(data_dir), Path(log_path)
        self.api_auth = api_auth
        self.launch_flags = list(LAUNCH_FLAGS if launch_flags is None else launch_flags)
        self.python = Path(python) if python else webui_python(self.webui)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        ext = self.data_dir / "extensions" / "gmi"
        ext.parent.mkdir(parents=True, exist_ok=True)
        if not ext.exists():
            ext.symlink_to(Path(extension_root).resolve(), target_is_directory=True)
        self.env = dict(
            os.environ,
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            OMP_NUM_THREADS="1",
            GRADIO_ANALYTICS_ENABLED="False",
            PYTHONUNBUFFERED="1",  # start() waits for the STARTED line in the log
            # Gradio's uploads go with the test's data, not to /tmp/gradio, which would outlive the test and, as a
            # namespace package, shadow `gradio` for a checkout cloned into /tmp (pytest puts its parent on sys.path)
            GRADIO_TEMP_DIR=str(self.data_dir / "gradio-tmp"),
            **(extra_env or {}),
        )
        self.env.pop("PYTHONPATH", None)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 600) -> None:
        cmd = [
            str(self.python),
            "launch.py",
            *self.launch_flags,
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
        ]
        if self.api_auth:
            cmd += ["--api-auth", self.api_auth]
        self.log = open(self.log_path, "w")  # noqa: SIM115 - the server writes to it until stop() closes it
        self.proc = subprocess.Popen(
            cmd, cwd=self.webui, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"WebUI exited with {self.proc.returncode}:\n{self.tail()}")
            if STARTED not in self.log_path.read_text(errors="replace"):
                time.sleep(1)  # a request before the WebUI has added its API middleware makes that fail: no request yet
                continue
            try:  # 404 until the API routes are added (Forge serves the UI a few seconds before them)
                if self.get("/gmi/v1/defaults", expect_error=True)[0] != 404:
                    return
            except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                pass
            time.sleep(1)
        raise TimeoutError(f"WebUI did not start in {timeout}s:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if getattr(self, "log", None):
            self.log.close()

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def request(
        self,
        method: str,
        path: str,
        body=None,
        expect_error: bool = False,
        timeout: float = 600,
        credentials: str | None = None,
    ):
        """``credentials``: "user:password" to send instead of the server's own, "" to send none."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else None
        headers = {"content-type": "application/json"}
        credentials = self.api_auth if credentials is None else credentials
        if credentials:
            headers["authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            if not expect_error:
                raise AssertionError(f"{method} {path} -> {exc.code}: {exc.read()[:2000]!r}") from None
            return exc.code, json.loads(exc.read() or b"null")

    def build_specs(self, checkpoints="missing", timeout: float = 900) -> dict:
        """POST /gmi/v1/build and poll the job until it leaves queued/running (or timeout); returns the job."""
        _, job = self.post("/gmi/v1/build", {"checkpoints": checkpoints})
        deadline = time.time() + timeout
        while job["state"] in ("queued", "running") and time.time() < deadline:
            time.sleep(1)
            _, job = self.get(f"/gmi/v1/build/{job['id']}")
        return job

    def specs(self, timeout: float = 300) -> dict:
        """GET /gmi/v1/specs once the encoder is loaded (the route answers "loading" rather than wait)."""
        deadline = time.time() + timeout
        while True:
            _, specs = self.get("/gmi/v1/specs")
            if specs.get("encoder_state") != "loading" or time.time() > deadline:
                return specs
            time.sleep(0.5)

    def get(self, path: str, **kw):
        return self.request("GET", path, **kw)

    def post(self, path: str, body, **kw):
        return self.request("POST", path, body, **kw)

    def near_duplicate(self, name: str) -> Path:
        """A copy of checkpoint ``name`` (and its .yaml) with one byte of its last tensor changed: another sha256,
        almost the same images. The WebUI's checkpoint list is refreshed; the caller removes both files."""
        import shutil

        models = self.data_dir / "models" / "Stable-diffusion"
        twin = models / f"{Path(name).stem}_twin.safetensors"
        shutil.copyfile(models / name, twin)
        shutil.copyfile((models / name).with_suffix(".yaml"), twin.with_suffix(".yaml"))
        with open(twin, "r+b") as f:
            f.seek(-2, os.SEEK_END)
            byte = f.read(1)[0]
            f.seek(-2, os.SEEK_END)
            f.write(bytes([byte ^ 1]))
        self.post("/sdapi/v1/refresh-checkpoints", {})
        return twin
