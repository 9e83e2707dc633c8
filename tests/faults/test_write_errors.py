"""Class 4 (issue 18): OS errors on every write path are one-line errors. Writers go through paths.atomic_write,
which turns a library's wrapped OS error (safetensors' SafetensorError "Os { code: 28 }") into the OSError it is;
``--out`` refuses a folder and asks for ``--force`` before replacing a file gmi did not write."""

from __future__ import annotations

import errno

import pytest
import torch
from safetensors import SafetensorError

from gmi_core.encoders import save_encoder
from gmi_core.paths import atomic_write, one_line
from tests.faults.harness import PaintingGenerator, query, run_gmi

torch.set_num_threads(1)
DISK_FULL = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


def _safetensors_disk_full(*args, **kwargs):
    raise SafetensorError(DISK_FULL)


def test_write_errors_atomic_write_reports_a_wrapped_os_error_as_one(tmp_path):
    target = tmp_path / "x.bin"
    with pytest.raises(OSError) as info, atomic_write(target):
        _safetensors_disk_full()
    assert info.value.errno == errno.ENOSPC and one_line(info.value) == "No space left on device"
    assert not target.exists() and not list(tmp_path.glob("*.tmp"))  # nothing half-written left behind
    with pytest.raises(ValueError), atomic_write(target):  # other errors pass unchanged
        raise ValueError("not an OS error")


def test_write_errors_build_disk_full_from_safetensors_is_one_line(core, monkeypatch):
    import gmi_core.spec as spec_module

    core.spec_path("m2.safetensors").unlink()
    monkeypatch.setattr(spec_module, "save_file", _safetensors_disk_full)
    report = core.gmi().build(core.source(), PaintingGenerator(), "missing")
    assert [name for name, _ in report.failed] == ["m2.safetensors"]
    reason = report.failed[0][1]
    assert "No space left on device" in reason and "\n" not in reason and "IoError" not in reason, reason
    monkeypatch.undo()
    assert core.states() == {"m0.safetensors": "ready", "m1.safetensors": "ready", "m2.safetensors": "missing"}


def test_write_errors_label_cache_disk_full_never_fails_identify(core, monkeypatch):
    import gmi_core.interrogator as interrogator

    monkeypatch.setattr(interrogator, "save_file", _safetensors_disk_full)
    result = core.gmi().identify([query()], source=core.source())  # interrogates, the cache write fails
    assert result.ranking and result.pseudo_prompt


@pytest.fixture
def cli(core, tmp_path):
    encoder = save_encoder(core.encoder, tmp_path / "enc.safetensors")
    return core, ("--home", core.home, "--encoder", encoder)


def test_write_errors_out_on_a_folder_is_one_line(cli, tmp_path):
    core, common = cli
    folder = tmp_path / "a folder"
    folder.mkdir()
    for command in (("export", "--home", core.home, "--out", folder), ("map", *common, "--out", folder)):
        out = run_gmi(*command)
        assert out.returncode == 2 and "is a folder" in out.stderr, out
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert list(folder.iterdir()) == []


def test_write_errors_out_never_replaces_a_user_file_without_force(cli, tmp_path):
    core, common = cli
    for command, name in ((("export", "--home", core.home), "specs.safetensors"), (("map", *common), "map.png")):
        mine = tmp_path / name
        mine.write_bytes(b"my own file")
        out = run_gmi(*command, "--out", mine)  # refused before any work
        assert out.returncode == 2 and "add --force" in out.stderr and mine.read_bytes() == b"my own file", out
    out = run_gmi("export", "--home", core.home, "--out", tmp_path / "specs.safetensors", "--force")
    assert out.returncode == 0 and (tmp_path / "specs.safetensors").read_bytes() != b"my own file", out
    out = run_gmi("export", "--home", core.home, "--out", tmp_path / "specs.safetensors")  # gmi's own: no --force
    assert out.returncode == 0, out
