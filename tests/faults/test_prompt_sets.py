"""Prompt-set files must be a JSON list of strings or a text file of lines.

Moved from tests/test_faults.py (issue 11's fault suite, split by class in issue 19); each test name still
starts with its class."""

from __future__ import annotations

import pytest
import torch

from gmi_core import limits
from gmi_core.errors import GmiError
from gmi_core.prompts import load_prompt_set

torch.set_num_threads(1)

# ===================================================================================================================
# Faults: prompt-set files must be a JSON list of strings or a text file of lines
# ===================================================================================================================
PROMPT_FILES = {
    "object.json": ('{"prompts": ["a"]}', "list of strings"),
    "numbers.json": ("[1, 2, 3]", "list of strings"),
    "mixed.json": ('["a", null]', "list of strings"),
    "broken.json": ('["a", ', "not valid JSON"),
    "empty.txt": ("\n\n  \n", "holds no prompts"),
    "empty.json": ("[]", "holds no prompts"),
    "binary.txt": (b"\x00\x01\x02abc", "binary"),
    "latin1.txt": (b"caf\xe9 au lait\n", "not UTF-8"),
    "long.txt": ("x" * (limits.MAX_TEXT_FIELD + 1), "longer than"),
}


@pytest.mark.parametrize("name", sorted(PROMPT_FILES))
def test_faults_promptset_bad_files_are_refused_clearly(tmp_path, name):
    content, message = PROMPT_FILES[name]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(GmiError, match=message) as err:
        load_prompt_set(str(path))
    assert len(str(err.value).splitlines()) == 1


def test_faults_promptset_good_files_and_a_folder(tmp_path):
    (tmp_path / "ok.json").write_text('["a cat", " a dog "]')
    (tmp_path / "ok.txt").write_text("\ufeffa cat\n\na dog\n")
    assert load_prompt_set(str(tmp_path / "ok.json")).prompts == ("a cat", "a dog")
    assert load_prompt_set(str(tmp_path / "ok.txt")).prompts == ("a cat", "a dog")
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(GmiError, match="not a regular file"):
        load_prompt_set(str(tmp_path / "dir.json"))
