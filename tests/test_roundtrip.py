"""The real end-to-end check: specs for 4 checkpoints, an unseen prompt and seed, identify."""

import pytest

from gmi_core.prompts import load_prompt_set
from gmi_core.ranker import METHODS

UNSEEN_SEED = 900_000


def _query(world, checkpoint, index):
    prompt = load_prompt_set("evaluation").prompts[index]
    assert prompt not in world.prompt_set.prompts
    return world.generator().generate(checkpoint, prompt, [UNSEEN_SEED + index], world.settings)


def test_generating_checkpoint_ranks_first_for_each_checkpoint(tiny_world):
    gmi, source = tiny_world.gmi(), tiny_world.source()
    checkpoints = source.list_checkpoints().checkpoints
    assert len(checkpoints) == 4
    for index, checkpoint in enumerate(checkpoints):
        result = gmi.identify(_query(tiny_world, checkpoint, index), source=source)
        assert result.ranking[0].name == checkpoint.name, result.to_dict()
        assert result.prompt_source == "interrogator" and result.pseudo_prompt
        assert [r.rank for r in result.ranking] == [1, 2, 3, 4]
        assert result.ranking[0].score < result.ranking[1].score


@pytest.mark.parametrize("method", METHODS)
def test_every_method_ranks_every_checkpoint(tiny_world, method):
    gmi, source = tiny_world.gmi(), tiny_world.source()
    checkpoint = source.list_checkpoints().checkpoints[1]
    result = gmi.identify(
        _query(tiny_world, checkpoint, 5), prompt="a fox in an autumn forest", method=method, source=source
    )
    names = sorted(r.name for r in result.ranking)
    assert names == sorted(c.name for c in source.list_checkpoints().checkpoints)
    scores = [r.score for r in result.ranking]
    assert scores == sorted(scores)
    assert result.prompt_source == "user" and result.method == method
    if method in ("gmi", "rkme_clip", "rkme_concat"):
        assert result.ranking[0].name == checkpoint.name


def test_several_query_images_and_top_k(tiny_world):
    gmi, source = tiny_world.gmi(), tiny_world.source()
    checkpoint = source.list_checkpoints().checkpoints[2]
    images = _query(tiny_world, checkpoint, 3) + _query(tiny_world, checkpoint, 4)
    result = gmi.identify(images, top_k=2, source=source)
    assert len(result.ranking) == 2 and result.ranking[0].name == checkpoint.name
    assert result.ranking[0].top_prompts and result.ranking[0].top_prompts[0].prompt in tiny_world.prompt_set.prompts


def test_download_baseline_ignores_the_image(tiny_world):
    gmi, source = tiny_world.gmi(), tiny_world.source()
    checkpoints = source.list_checkpoints().checkpoints
    orders = {
        tuple(r.name for r in gmi.identify(_query(tiny_world, c, i), method="download", source=source).ranking)
        for i, c in enumerate(checkpoints)
    }
    assert orders == {tuple(sorted(c.name for c in checkpoints))}
