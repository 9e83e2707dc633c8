"""Class 9 (issue 18): messages that fit. Path arguments are typed (cli.folder_arg, cli.file_arg): a file given
as a folder, a folder given as a file and a URL given as an image are refused at once in one line; argparse
abbreviations are off in every parser, so ``export --encoder X`` is not taken as ``--encoder-id X``."""

from __future__ import annotations

import argparse

import pytest

from gmi_core.cli import build_parser, main
from gmi_core.engine import Gmi


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "not_a_folder.txt"
    path.write_text("x")
    return path


@pytest.mark.parametrize(
    ("words", "says"),
    [
        (["specs", "--models", "{file}"], "is a file, not a folder"),
        (["import-images", "{file}"], "is a file, not a folder"),
        (["import", "{dir}"], "is a directory, not a regular file"),
        (["identify", "{dir}", "--models", "{dir}"], "is a directory, not a regular file"),
        (["identify", "https://example.org/a.png", "--models", "{dir}"], "gmi reads local files; download it first"),
        (["export", "--encoder", "ViT-L-14"], "unrecognized arguments: --encoder ViT-L-14"),
        (["map", "--thresh", "0.1"], "unrecognized arguments: --thresh"),
        (["identify", "x.png", "--models", "{dir}", "--top", "3"], "unrecognized arguments: --top"),
    ],
)
def test_message_fit_cli_arguments_say_what_is_wrong(words, says, a_file, tmp_path, capsys):
    words = [w.format(file=a_file, dir=tmp_path) for w in words]
    with pytest.raises(SystemExit) as info:
        main(words)
    err = capsys.readouterr().err
    assert info.value.code == 2 and says in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1  # one line, without argparse's usage block


def test_message_fit_no_parser_accepts_abbreviations():
    def walk(parser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from walk(sub)

    parsers = list(walk(build_parser()))
    assert len(parsers) > 8 and all(p.allow_abbrev is False for p in parsers)
    from gmi_core.bench import build_parser as bench_parser

    assert all(p.allow_abbrev is False for p in walk(bench_parser()))


def test_message_fit_identify_with_a_max_prompts_no_spec_has_says_so(core):
    """Specs exist (3 prompts); identify asks for 2 (another max_prompts): say which specs exist, not only
    "build specs first" while the panel shows them ready."""
    from gmi_core.errors import NoSpecsError
    from tests.faults.harness import query

    engine = Gmi(core.home / "specs", core.encoder, core.prompts.head(2), budget="allx2")
    with pytest.raises(NoSpecsError) as info:
        engine.identify([query()], prompt="x", source=core.source())
    message = str(info.value)
    assert "(2 prompts" in message and "specs exist for platform[:3] (3 prompts)" in message, message
    assert "max_prompts" in message
