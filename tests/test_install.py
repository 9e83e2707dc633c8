"""install.py checks before it installs, always pins the host's torch, is silent when nothing is missing and
honours --skip-install."""

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_installer():
    spec = importlib.util.spec_from_file_location("gmi_install", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_only_missing_requirements_are_installed_with_torch_pinned(tmp_path, monkeypatch):
    installer = _load_installer()
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("numpy>=1.0  # present\ngmi-surely-absent-package>=1\nsafetensors>=999\n")
    monkeypatch.setattr(installer, "REQUIREMENTS", requirements)
    assert installer.missing_requirements() == ["gmi-surely-absent-package>=1", "safetensors>=999"]
    calls = []
    monkeypatch.setattr(installer.subprocess, "check_call", calls.append)
    installer.install([])
    (command,) = calls
    assert command[-3:-1] == ["gmi-surely-absent-package>=1", "safetensors>=999"]
    assert command[-1].startswith("torch==") and "torch" not in " ".join(command[:-1])


def test_nothing_runs_when_everything_is_present(tmp_path, monkeypatch):
    installer = _load_installer()
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("numpy\n")
    monkeypatch.setattr(installer, "REQUIREMENTS", requirements)
    monkeypatch.setattr(installer.subprocess, "check_call", lambda *a: (_ for _ in ()).throw(AssertionError("pip ran")))
    installer.install([])


def test_skip_install_installs_nothing_and_says_so(tmp_path, monkeypatch, capsys):
    installer = _load_installer()
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("gmi-surely-absent-package>=1\n")
    monkeypatch.setattr(installer, "REQUIREMENTS", requirements)
    monkeypatch.setattr(installer.subprocess, "check_call", lambda *a: (_ for _ in ()).throw(AssertionError("pip ran")))
    installer.install(["--skip-install"])
    assert capsys.readouterr().out == "gmi: --skip-install, not installing: gmi-surely-absent-package>=1\n"


def test_the_webui_flag_is_honoured_too(tmp_path, monkeypatch, capsys):
    """Inside A1111 / Forge the script gets no arguments: their `launch.args` carries --skip-install."""
    installer = _load_installer()
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("gmi-surely-absent-package>=1\n")
    monkeypatch.setattr(installer, "REQUIREMENTS", requirements)
    fake_launch = type(sys)("launch")
    fake_launch.args = type("Args", (), {"skip_install": True})()
    fake_launch.run_pip = lambda *a: (_ for _ in ()).throw(AssertionError("pip ran"))
    monkeypatch.setitem(sys.modules, "launch", fake_launch)
    installer.install([])
    assert "not installing" in capsys.readouterr().out


def test_silent_when_nothing_is_missing():
    """As the hosts run it (a subprocess whose output they print): no output at all in this complete environment."""
    result = subprocess.run([sys.executable, str(ROOT / "install.py")], capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_requirements_never_name_torch():
    names = [
        line.split(">")[0].split("=")[0].strip().lower()
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.strip()
    ]
    assert names and not {"torch", "torchvision"} & set(names)
