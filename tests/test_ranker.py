r"""The scorer's maths on a case small enough to work out by hand: the paper's prompt-weighted RKME distance and the
masking rules of :mod:`gmi_core.ranker`.

Features are 2-D unit vectors e0 = (1, 0), e1 = (0, 1) and their negatives, and gamma = ln 2, so the kernel
k(a, b) = exp(-gamma * |a - b|^2) = 2^(-|a - b|^2) takes three values: k = 1 (same vector), 1/4 (orthogonal,
|a - b|^2 = 2), 1/16 (opposite, |a - b|^2 = 4).

Two prompts with text features p0 = e0, p1 = e1; the query's text q = (0.8, 0.6) and its one image u = e0.
The gmi weights are w_i = max(cos(p_i, q), 0), normalised: (0.8, 0.6) / 1.4 = (4/7, 3/7); rkme_clip's are (1/2, 1/2).

Three checkpoints, two image slots per prompt ("pad" marks a slot the mask leaves out):

    A: prompt 0 [e0, e0]     prompt 1 [e1, e0]
    B: prompt 0 [e1, -e0]    prompt 1 [e1, e1]
    C: prompt 0 [e0, pad]    prompt 1 [e1, e1]

c_mi = mean over the spec's images of prompt i of k(u, z):
    A: c0 = (1 + 1) / 2 = 1          c1 = (1/4 + 1) / 2 = 5/8
    B: c0 = (1/4 + 1/16) / 2 = 5/32  c1 = (1/4 + 1/4) / 2 = 1/4
    C: c0 = 1 (the pad is not an image)   c1 = 1/4

Kbar_m[i, j] = mean of k over image pairs of prompts i and j, an image never paired with itself:
    A: K00 = k(e0, e0) = 1   K11 = k(e1, e0) = 1/4   K01 = (1/4 + 1 + 1/4 + 1) / 4 = 5/8
    B: K00 = k(e1, -e0) = 1/4   K11 = k(e1, e1) = 1   K01 = (1 + 1 + 1/4 + 1/4) / 4 = 5/8
    C: K00 has no pair (one image): the bank's mean of K00 over the specs that have it, (1 + 1/4) / 2 = 5/8;
       K11 = 1;  K01 = (k(e0, e1) + k(e0, e1)) / 2 = 1/4

D_m = w^T Kbar_m w - 2 sum_i w_i c_mi (the constant k(u, u) term dropped). With w = (4/7, 3/7),
w0^2 = 16/49, 2 w0 w1 = 24/49, w1^2 = 9/49:
    A: 16/49 + 24/49 * 5/8 + 9/49 * 1/4 = 133/196;  2 (4/7 + 3/7 * 5/8) = 47/28;   D_A = 133/196 - 329/196 = -1
    B: 16/49 * 1/4 + 24/49 * 5/8 + 9/49 = 4/7;      2 (4/7 * 5/32 + 3/7 * 1/4) = 11/28;   D_B = 5/28
    C: 16/49 * 5/8 + 24/49 * 1/4 + 9/49 = 25/49;   2 (4/7 + 3/7 * 1/4) = 19/14;   D_C = 50/98 - 133/98 = -83/98
so gmi ranks A, C, B. With rkme_clip's w = (1/2, 1/2) (w^T K w = (K00 + 2 K01 + K11) / 4):
    A: 5/8 - 13/8 = -1     B: 5/8 - 13/32 = 7/32     C: 17/32 - 5/4 = -23/32

If B has not rendered prompt 1, that prompt's weight is 0 for B and the rest renormalised to w = (1, 0):
    D_B = K00 - 2 c0 = 1/4 - 5/16 = -1/16.
"""

from __future__ import annotations

import math

import pytest
import torch

from gmi_core.ranker import FeatureBank, rank

torch.set_num_threads(1)

E0, E1 = [1.0, 0.0], [0.0, 1.0]
NEG_E0, NEG_E1 = [-1.0, 0.0], [0.0, -1.0]
GAMMA = math.log(2)
QUERY_IMAGE = torch.tensor([E0])
QUERY_TEXT = torch.tensor([0.8, 0.6])
PROMPTS = torch.tensor([E0, E1])
# [spec][prompt][slot]; the pad slot of C holds -e1, which would change every number of C if it counted
IMAGES = [[[E0, E0], [E1, E0]], [[E1, NEG_E0], [E1, E1]], [[E0, NEG_E1], [E1, E1]]]
MASK = [[[True, True], [True, True]], [[True, True], [True, True]], [[True, False], [True, True]]]
GMI = {"A": -1.0, "B": 5 / 28, "C": -83 / 98}
RKME_CLIP = {"A": -1.0, "B": 7 / 32, "C": -23 / 32}


def bank(images=IMAGES, mask=MASK, prompts=PROMPTS) -> FeatureBank:
    mask = torch.tensor(mask)
    return FeatureBank(
        names=["A", "B", "C"],
        image=torch.tensor(images),
        prompt=prompts,
        done=mask.any(dim=2),
        image_mask=mask,
    )


def scores(ranking, names=("A", "B", "C")) -> dict[str, float]:
    return {name: float(ranking.scores[i]) for i, name in enumerate(names)}


def test_weighted_rkme_distance_matches_the_hand_computed_case():
    ranking = rank(bank(), "gmi", QUERY_IMAGE, QUERY_TEXT, gamma=GAMMA)
    assert scores(ranking) == pytest.approx(GMI, abs=1e-6)
    assert ranking.order.tolist() == [0, 2, 1]  # A, C, B
    assert ranking.weights.tolist() == pytest.approx([4 / 7, 3 / 7], abs=1e-6)
    assert ranking.contributions[0].tolist() == pytest.approx([4 / 7, 3 / 7 * 5 / 8], abs=1e-6)  # w_i c_Ai
    uniform = rank(bank(), "rkme_clip", QUERY_IMAGE, QUERY_TEXT, gamma=GAMMA)
    assert scores(uniform) == pytest.approx(RKME_CLIP, abs=1e-6)


def test_padded_images_and_prompts_do_not_count():
    """A third image slot and a third prompt that no spec has rendered, filled with features that would move every
    score: the scores stay the hand-computed ones."""
    images = [[[*prompt, NEG_E0] for prompt in spec] + [[NEG_E0, NEG_E1, NEG_E0]] for spec in IMAGES]
    mask = [[[*prompt, False] for prompt in spec] + [[False, False, False]] for spec in MASK]
    padded = bank(images, mask, torch.tensor([E0, E1, [0.6, 0.8]]))  # the third prompt is close to the query text
    ranking = rank(padded, "gmi", QUERY_IMAGE, QUERY_TEXT, gamma=GAMMA)
    assert scores(ranking) == pytest.approx(GMI, abs=1e-6)
    assert float(ranking.contributions[:, 2].abs().sum()) == 0.0


def test_a_prompt_a_spec_has_not_rendered_gets_no_weight():
    mask = [[list(slots) for slots in spec] for spec in MASK]
    mask[1][1] = [False, False]  # B: prompt 1 not rendered yet
    ranking = rank(bank(mask=mask), "gmi", QUERY_IMAGE, QUERY_TEXT, gamma=GAMMA)
    assert scores(ranking)["B"] == pytest.approx(-1 / 16, abs=1e-6)
    assert scores(ranking)["A"] == pytest.approx(GMI["A"], abs=1e-6)


def test_a_precomputed_kbar_is_used_at_its_kernel_width_only():
    """FeatureBank.use_kbar (the two-tier index hands over its Kbar): with Kbar = 0 the score is -2 sum_i w_i c_i,
    for A -47/28. At 2 gamma (k in {1, 1/16, 1/256}) the bank computes its own Kbar: c_A = (1, 17/32),
    K_A = [[1, 17/32], [17/32, 1/16]], D_A = 469/784 - 1253/784 = -1."""
    precomputed = bank()
    precomputed.use_kbar(GAMMA, torch.zeros(3, 2, 2))
    ranking = rank(precomputed, "gmi", QUERY_IMAGE, QUERY_TEXT, gamma=GAMMA)
    assert float(ranking.scores[0]) == pytest.approx(-47 / 28, abs=1e-6)
    other_width = rank(precomputed, "gmi", QUERY_IMAGE, QUERY_TEXT, gamma=2 * GAMMA)
    assert float(other_width.scores[0]) == pytest.approx(-1.0, abs=1e-6)
