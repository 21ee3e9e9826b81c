"""groupseg.loss.segmentation, the fine-tuning losses, on tensors the tests build: patch labels,
semi-hard triplets, the argmax-segment loss, weak-shot tag and complementary losses."""
import pytest
import torch
import torch.nn.functional as F

from groupseg.loss import segmentation as L


def test_patch_labels_majority_and_triplet_loss():
    t = torch.full((1, 4, 4), 255)
    t[0, :2, :2] = 1  # a pure cell
    t[0, 2:, 2:] = 2
    t[0, 2, 2] = 1  # still 3/4 class 2
    lab = L.patch_labels(t, (2, 2))
    assert lab.tolist() == [[[1, 255], [255, 2]]]
    feats = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    assert L.triplet_loss(feats, labels, margin=0.3).item() == 0.0  # well separated classes
    # mixed-up classes: centred, each anchor's positive is opposite (distance 2) and no negative is
    # farther, so the farthest (also 2) counts: exactly the margin
    mixed = L.triplet_loss(feats, labels[[0, 2, 1, 3]], margin=0.3).item()
    assert mixed == pytest.approx(0.3, abs=1e-3)


def test_patch_labels_counts_equal_pooling_a_one_hot_map():
    # equal cells are counted per cell (no one-hot map); the labels are those of pooling the
    # one-hot map, the definition (and the path for cells of unequal size): square, oblong and
    # unequal cells, ignore, a pure and an unlabelled cell. (The fractions may differ in the last
    # bit, so a class covering exactly ``purity`` of a cell of odd area could go either way; the
    # purities here are not such fractions.)
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(3)
    for (H, W), grid in (((64, 48), (4, 3)), ((28, 42), (2, 3)), ((60, 40), (4, 5)), ((30, 20), (4, 3))):
        t = torch.randint(0, 4, (2, H, W), generator=gen)
        t[torch.rand(t.shape, generator=gen) < 0.2] = 255
        t[0, : H // grid[0], : W // grid[1]] = 1  # a pure cell
        t[1, : H // grid[0], : W // grid[1]] = 255  # an unlabelled cell
        onehot = F.one_hot(t.clamp(max=4), 5).permute(0, 3, 1, 2).float()[:, :4]
        best, ref = F.adaptive_avg_pool2d(onehot, grid).max(1)
        ref[best < 0.26] = 255
        assert torch.equal(L.patch_labels(t, grid, purity=0.26), ref)  # 0.26 x 256, 196, 120 pixels: no whole count
        assert L.patch_labels(t, grid)[0, 0, 0] == 1 and L.patch_labels(t, grid)[1, 0, 0] == 255


def test_triplet_gradients_equal_those_of_the_whole_cube():
    # the semi-hard negative is chosen without gradient, a few anchors at a time, and its distance
    # gathered; the loss and its gradient equal those of choosing it inside the whole (a, p, n) cube
    gen = torch.Generator().manual_seed(2)
    feats = torch.randn(70, 6, generator=gen)  # 70 anchors: three chunks of 32
    labels = torch.randint(0, 4, (70,), generator=gen)

    def cube(x):
        f = F.normalize(x - x.mean(0, keepdim=True), dim=-1)
        d = (2.0 - 2.0 * f @ f.T).clamp_min(1e-8).sqrt()
        same = labels[:, None] == labels[None, :]
        d_an = d.masked_fill(same, float("nan"))[:, None, :]
        semi = torch.where(d_an > d[:, :, None], d_an, float("inf")).amin(-1)
        easiest = d.masked_fill(same, float("-inf")).amax(1, keepdim=True).expand_as(semi)
        pairs = same & ~torch.eye(70, dtype=torch.bool)
        return F.relu(d - torch.where(torch.isfinite(semi), semi, easiest) + 0.3)[pairs].mean()

    a, b = feats.clone().requires_grad_(), feats.clone().requires_grad_()
    ours, theirs = L.triplet_loss(a, labels, 0.3), cube(b)
    ours.backward(), theirs.backward()
    assert ours.item() > 0 and torch.equal(ours, theirs)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_triplet_loss_matches_a_brute_force_semi_hard_reference():
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(12, 5, generator=gen)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3])  # class 3: a single sample, anchor of no pair
    f = torch.nn.functional.normalize(feats - feats.mean(0), dim=-1)
    d = torch.cdist(f, f)
    losses = []
    for a in range(12):
        negs = [n for n in range(12) if labels[n] != labels[a]]
        for p in range(12):
            if p == a or labels[p] != labels[a]:
                continue
            beyond = [d[a, n] for n in negs if d[a, n] > d[a, p]]
            d_neg = min(beyond) if beyond else max(d[a, n] for n in negs)  # semi-hard, else the farthest
            losses.append(max(0.0, float(d[a, p] - d_neg + 0.3)))
    assert L.triplet_loss(feats, labels, margin=0.3).item() == pytest.approx(sum(losses) / len(losses), abs=1e-4)


def test_triplet_stage_separates_classes_from_nearly_collapsed_features():
    # 3 classes x 8 samples, all within 0.01 of one direction (as the pretrained patch features are)
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(16, generator=gen)
    feats = (base + 0.01 * torch.randn(24, 16, generator=gen)).requires_grad_(True)
    labels = torch.arange(3).repeat_interleave(8)
    opt = torch.optim.SGD([feats], lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        L.triplet_loss(feats, labels, margin=0.3).backward()
        opt.step()
    f = feats.detach()
    spread = (f - f.mean(0)).norm(dim=1).mean()
    assert spread > 5 * 0.01 * 16**0.5  # the features moved apart (from 0.04): no collapse
    f = torch.nn.functional.normalize(f - f.mean(0), dim=-1)
    d = 1 - f @ f.T
    same = labels[:, None] == labels[None, :]
    assert d[~same].min() > d[same].max()  # every class is its own cluster


def test_hard_grouping_loss_is_the_argmax_segment_with_a_soft_gradient():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 4)  # (B, G, C)
    raw = torch.randn(1, 3, 2, 2, requires_grad=True)
    grouping = raw.softmax(1)
    logp = L.pixel_log_probs(logits, grouping, (2, 2), hard=True)
    best = grouping.argmax(1)[0]  # (2, 2) group of each patch
    expect = logits.softmax(-1)[0][best].permute(2, 0, 1).log()  # (C, 2, 2): that group's class log-probs
    torch.testing.assert_close(logp[0], expect)
    soft = L.pixel_log_probs(logits, grouping, (2, 2))
    assert not torch.allclose(soft, logp)  # the soft mixture differs ...
    logp[0, 1].sum().backward()
    assert raw.grad is not None and raw.grad.abs().sum() > 0  # ... and the assignment still learns (straight-through)


@pytest.mark.parametrize("hard", [False, True])
def test_pixel_log_probs_equal_upsampling_every_group_map(hard):
    # the class maps are formed on the patch grid and then upsampled; upsampling each group's map
    # first (the slow order) gives the same log-probabilities and the same gradients
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 4, requires_grad=True)
    raw = torch.randn(2, 6, 5, 7, requires_grad=True)
    logp = L.pixel_log_probs(logits, raw.softmax(1), (20, 28), hard=hard)
    groups = F.interpolate(L.patch_groups(raw.softmax(1), hard), size=(20, 28), mode="bilinear", align_corners=False)
    ref = torch.einsum("bgc,bghw->bchw", logits.softmax(-1), groups).clamp_min(1e-8).log()
    torch.testing.assert_close(logp, ref)
    w = torch.randn_like(ref)
    g_new = torch.autograd.grad((logp * w).sum(), (logits, raw))
    g_ref = torch.autograd.grad((ref * w).sum(), (logits, raw))
    for a, b in zip(g_new, g_ref):
        torch.testing.assert_close(a, b)


def test_tag_scores_pool_patches_so_empty_groups_cannot_explain_a_tag():
    # 3 groups over 4 patches: group 0 owns no patch but is all "car" (class 1); group 1 owns 3 patches, group 2 one
    logits = torch.tensor([[[0.0, 9.0], [9.0, 0.0], [0.0, 0.0]]], requires_grad=True)  # (B, G, C)
    owner = torch.tensor([1, 1, 1, 2])
    grouping = torch.full((1, 3, 2, 2), 0.1)
    grouping.view(1, 3, 4)[0, owner, torch.arange(4)] = 0.8
    car = torch.tensor([1])
    p_car = torch.softmax(torch.tensor([9.0, 0.0]), 0)[1]  # group 1's car probability
    # the most car-like patch (group 2: 0.5) alone, then the mean of the top half (0.5 and group 1's)
    torch.testing.assert_close(L.tag_scores(logits, grouping, car, topk=0.25)[0, 0], torch.tensor(0.5))
    torch.testing.assert_close(L.tag_scores(logits, grouping, car, topk=0.5)[0, 0], (0.5 + p_car) / 2)
    # the all-car group 0 owns no patch, so it explains nothing; give it pixel 3 and car is present
    moved = grouping.clone()
    moved.view(1, 3, 4)[0, :, 3] = torch.tensor([0.8, 0.1, 0.1])
    assert L.tag_scores(logits, moved, car, topk=0.25)[0, 0] > 0.99
    # an absent tag pushes car down in the patches that score it, not in the empty group
    score = L.tag_scores(logits, grouping, car, topk=0.25)
    torch.nn.functional.binary_cross_entropy(score, torch.zeros_like(score)).backward()
    g = logits.grad[0, :, 1]
    assert g[2] > 0 and g[0] == 0  # gradient descent lowers group 2's car logit; group 0 is untouched


def test_complementary_loss_gives_unclaimed_pixels_to_the_tagged_weak_classes():
    torch.manual_seed(0)
    logp = torch.randn(2, 4, 2, 3).log_softmax(1)  # classes 0, 1 base; 2, 3 weak
    target = torch.tensor([[[0, 255, 1], [1, 0, 255]], [[255, 0, 1], [1, 1, 0]]])
    tags = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # image 0 shows weak class 2; image 1 no weak class
    weak = torch.tensor([2, 3])
    expect = -(logp[0, 2, 0, 1] + logp[0, 2, 1, 2]) / 12  # image 0's two unclaimed pixels, class 2 only, over all 12
    torch.testing.assert_close(L.complementary_loss(logp, target, weak, tags), expect)
    both = torch.tensor([[1.0, 1.0], [0.0, 0.0]])  # both weak classes tagged: either may explain the pixel
    expect = -(torch.logaddexp(logp[0, 2, 0, 1], logp[0, 3, 0, 1]) + torch.logaddexp(logp[0, 2, 1, 2], logp[0, 3, 1, 2])) / 12
    torch.testing.assert_close(L.complementary_loss(logp, target, weak, both), expect)
    assert L.complementary_loss(logp, target, weak, torch.zeros(2, 2)) == 0  # no weak tag anywhere: no term


def test_balanced_complementary_loss_lets_a_minority_tagged_class_win_where_it_is_likely():
    # one image, all 4 pixels unclaimed, classes 0 base, 1 "car", 2 "fence"; both weak classes tagged;
    # car holds most of the mass everywhere, fence is relatively likely at pixel 3 only
    probs = torch.tensor([[1e-6, 0.9, 0.1], [1e-6, 0.9, 0.1], [1e-6, 0.9, 0.1], [1e-6, 0.6, 0.4]])
    logits = probs.log().T.reshape(1, 3, 2, 2).clone().requires_grad_(True)
    target = torch.full((1, 2, 2), 255)
    weak, tags = torch.tensor([1, 2]), torch.tensor([[1.0, 1.0]])

    def fence_grad(balance):
        loss = L.complementary_loss(logits.log_softmax(1), target, weak, tags, balance)
        (g,) = torch.autograd.grad(loss, logits)
        return g[0, 2].reshape(-1)  # d loss / d fence logit, per pixel

    plain = fence_grad(0.0)
    torch.testing.assert_close(plain, torch.zeros(4), atol=1e-5, rtol=0)  # weak mass is already 1: nothing to move
    balanced = fence_grad(1.0)
    assert (balanced < 0).all()  # descent gives the minority tagged class mass ...
    assert balanced[3] < balanced[:3].min() - 0.02  # ... most where it is relatively likely
    # by hand: fence mass 0.175, car 0.825; pixel 3's target 0.4 / 0.175 vs 0.6 / 0.825 -> fence 0.759
    torch.testing.assert_close(balanced[3], torch.tensor((0.4 - 0.759) / 4), atol=1e-3, rtol=0)
    torch.testing.assert_close(fence_grad(1e-9), plain, atol=1e-6, rtol=0)  # balance -> 0 is the plain loss ...
    value = lambda b: L.complementary_loss(logits.log_softmax(1), target, weak, tags, b).item()  # noqa: E731
    assert value(1e-9) == pytest.approx(value(0.0), abs=1e-6)  # ... in value too


def test_balanced_complementary_loss_matches_a_per_image_per_pixel_reference():
    # 2 images, classes 0 (base), 1-3 (weak); image 0 tagged {1, 2}, image 1 tagged {3} only; some pixels claimed
    gen = torch.Generator().manual_seed(0)
    logp = torch.randn(2, 4, 3, 3, generator=gen).log_softmax(1)
    target = torch.full((2, 3, 3), 255)
    target[0, 0, :] = 0
    target[1, :, 0] = 0
    weak, tags = torch.tensor([1, 2, 3]), torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    total = 0.0
    for b in range(2):
        cls = [int(c) for c, t in zip(weak, tags[b]) if t > 0]
        pix = [(i, j) for i in range(3) for j in range(3) if target[b, i, j] == 255]
        q = {ij: torch.stack([logp[b, c][ij] for c in cls]).softmax(0) for ij in pix}
        mass = torch.stack(list(q.values())).mean(0)  # each tagged class's mean share over this image's unclaimed pixels
        for ij in pix:
            t = q[ij] / mass**0.5
            t = t / t.sum()
            lp = torch.stack([logp[b, c][ij] for c in cls])
            total += float((t * (t.log() - lp)).sum())
    got = L.complementary_loss(logp, target, weak, tags, 0.5)
    assert got.item() == pytest.approx(total / target.numel(), rel=1e-5)
