"""PAMR refinement: boundaries move onto image edges, scores stay distributions, wired into segment/eval."""
import numpy as np
import pytest
import torch

import groupseg
from groupseg.refine import pamr, pamr_affinity


def _two_halves(h=24, w=32, edge=16):
    img = torch.zeros(3, h, w)
    img[:, :, edge:] = 1.0  # dark left, bright right
    img += 0.01 * torch.randn(3, h, w, generator=torch.Generator().manual_seed(0))
    return img


def test_affinity_is_a_distribution_over_neighbours():
    aff = pamr_affinity(_two_halves()[None])
    assert aff.shape == (1, 48, 24, 32)
    torch.testing.assert_close(aff.sum(1), torch.ones(1, 24, 32))


def test_pamr_snaps_a_misplaced_boundary_to_the_image_edge():
    img = _two_halves(edge=16)
    scores = torch.zeros(2, 24, 32)
    scores[0, :, :11] = 1.0  # the prediction's boundary is 5 px left of the true edge
    scores[1, :, 11:] = 1.0
    truth = torch.zeros(24, 32, dtype=torch.long)
    truth[:, 16:] = 1
    before = (scores.argmax(0) == truth).float().mean()
    refined = pamr(img, scores)
    after = (refined.argmax(0) == truth).float().mean()
    assert before < 0.85 and after > 0.97
    torch.testing.assert_close(refined.sum(0), torch.ones(24, 32))  # convex combinations
    with pytest.raises(ValueError, match="differ in size"):
        pamr(img, scores[:, :10])


def test_segmenter_and_eval_accept_pamr(tiny_weights, tmp_path):
    seg = groupseg.Segmenter.from_pretrained(tiny_weights, templates="simple", refine="pamr")
    img = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    r = seg.segment(img, ["sky", "road", "car"])
    assert r.label_map.shape == (40, 56) and set(np.unique(r.label_map)) <= {0, 1, 2}
    plain = seg.segment(img, ["sky", "road", "car"], refine="")
    assert plain.label_map.shape == r.label_map.shape
    with pytest.raises(ValueError, match="unknown refinement"):
        groupseg.Segmenter.from_pretrained(tiny_weights, refine="crf")


def test_pamr_equals_padding_each_dilation_on_its_own():
    # the library pads once by the largest dilation; padding by each dilation (the plain reading of
    # PAMR) must give the same neighbours, so the same refinement, including where the largest
    # dilation reaches past the image (16 x 20 image, dilations up to 24)
    import torch.nn.functional as F

    from groupseg.refine import DILATIONS, OFFSETS

    def reference(image, scores, iterations=10):
        def shifted(x, d, dy, dx):
            H, W = x.shape[-2:]
            xp = F.pad(x, (d, d, d, d), mode="replicate")
            return xp[..., d + dy * d : d + dy * d + H, d + dx * d : d + dx * d + W]

        nb = torch.stack([shifted(image, d, dy, dx) for d in DILATIONS for dy, dx in OFFSETS], 2)
        aff = (-((nb - image[:, :, None]).abs() / (1e-8 + 0.1 * nb.std(dim=2, keepdim=True))).mean(1)).softmax(1)
        x = scores
        for _ in range(iterations):
            x = sum(shifted(x, d, dy, dx) * aff[:, k : k + 1]
                    for k, (d, (dy, dx)) in enumerate((d, o) for d in DILATIONS for o in OFFSETS))
        return x

    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 16, 20, generator=g)
    scores = torch.rand(2, 4, 16, 20, generator=g).softmax(1)
    torch.testing.assert_close(pamr(image, scores), reference(image, scores), atol=1e-5, rtol=1e-5)


def test_pamr_in_bands_of_rows_is_the_whole_batch_at_once(monkeypatch):
    # 40 rows in bands of 16 (the smallest band): 16 + 16 + 8, one image at a time, against every
    # neighbour view of the whole batch at once (PAMR before 2026-12-02): equal to the bit
    import groupseg.refine as R

    def whole_batch(image, scores, iterations=10):
        aff = pamr_affinity(image)
        x = scores
        for _ in range(iterations):
            out = torch.zeros_like(x)
            for k, nb in enumerate(R._neighbours(x, R.DILATIONS)):
                out.addcmul_(nb, aff[:, k : k + 1])
            x = out
        return x

    g = torch.Generator().manual_seed(1)
    image, scores = torch.rand(2, 3, 40, 30, generator=g), torch.rand(2, 5, 40, 30, generator=g).softmax(1)
    reference = whole_batch(image, scores)
    monkeypatch.setattr(R, "BAND_BYTES", 1)
    assert torch.equal(pamr(image, scores), reference) and not torch.equal(reference, scores)
    monkeypatch.setattr(R, "BAND_BYTES", 1 << 40)
    assert torch.equal(pamr(image, scores), reference)
    # one image for several score maps: its weights serve them all, as before
    assert torch.equal(pamr(image[:1], scores), whole_batch(image[:1], scores))
    with pytest.raises(ValueError, match="2 images for 3 score maps"):
        pamr(image, torch.cat([scores, scores[:1]]))
