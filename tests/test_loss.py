import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from eval.retrieval import recall_at_k
from groupseg.loss import MultiLabelContrastiveLoss


def _emb(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def test_loss_matches_hand_computation():
    img = _emb(2, 4)
    txt = _emb(2, 3, 4, seed=1)  # caption + 2 prompts per image
    s, sm = torch.tensor(10.0), torch.tensor(5.0)
    out = MultiLabelContrastiveLoss()(img, txt, s, sm)
    cap = txt[:, 0]

    def ce(logits, target_row):  # -log softmax at the target
        return -(logits[target_row] - torch.logsumexp(logits, 0))

    clip = 0.0
    for b in range(2):
        clip += ce(s * img[b] @ cap.T, b) + ce(s * cap[b] @ img.T, b)
    clip /= 4
    prompts = txt[:, 1:].reshape(4, 4)  # rows: img0 p0, img0 p1, img1 p0, img1 p1
    i2p = 0.0
    for b in range(2):
        logp = torch.log_softmax(sm * img[b] @ prompts.T, 0)
        i2p += -(0.5 * logp[2 * b] + 0.5 * logp[2 * b + 1])
    i2p /= 2
    p2i = sum(ce(sm * prompts[r] @ img.T, r // 2) for r in range(4)) / 4
    ml = 0.5 * (i2p + p2i)
    assert torch.allclose(out["clip_loss"], clip, atol=1e-5)
    assert torch.allclose(out["multi_label_loss"], ml, atol=1e-5)
    assert torch.allclose(out["loss"], clip + ml, atol=1e-5)


def test_perfect_alignment_gives_low_loss():
    img = _emb(8, 16)
    txt = torch.stack([img, img, img], dim=1)
    out = MultiLabelContrastiveLoss()(img, txt, torch.tensor(100.0))
    assert out["clip_loss"] < 1e-3
    # every prompt of an image is the image itself: the soft target's entropy log(2) is the floor
    assert abs(out["multi_label_loss"].item() - 0.5 * math.log(2)) < 1e-3


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, img, txt, q):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    n = img.shape[0] // world
    i = img[rank * n : (rank + 1) * n].clone().requires_grad_(True)
    t = txt[rank * n : (rank + 1) * n].clone().requires_grad_(True)
    out = MultiLabelContrastiveLoss(1.0, rank, world)(i, t, torch.tensor(7.0), torch.tensor(3.0))
    out["loss"].backward()
    q.put((rank, out["loss"].item(), i.grad.numpy(), t.grad.numpy()))  # arrays by value, not shared fds
    dist.destroy_process_group()


def test_two_process_gloo_equals_one_process():
    mp = torch.multiprocessing.get_context("spawn")
    img, txt = _emb(6, 8), _emb(6, 4, 8, seed=2)
    i1, t1 = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    ref = MultiLabelContrastiveLoss()(i1, t1, torch.tensor(7.0), torch.tensor(3.0))
    ref["loss"].backward()
    q, port = mp.Queue(), _free_port()
    procs = [mp.Process(target=_worker, args=(r, 2, port, img, txt, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = sorted((q.get(timeout=120) for _ in procs), key=lambda r: r[0])
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    # DDP averages gradients over ranks: mean of rank losses and of summed-then-averaged grads
    assert abs(sum(r[1] for r in res) / 2 - ref["loss"].item()) < 1e-5
    # each rank's gradient w.r.t. its own rows, summed over ranks by the gather's backward, / world
    gi = torch.cat([torch.from_numpy(r[2]) for r in res]) / 2
    gt = torch.cat([torch.from_numpy(r[3]) for r in res]) / 2
    assert torch.allclose(gi, i1.grad, atol=1e-5) and torch.allclose(gt, t1.grad, atol=1e-5)


def test_recall_at_k_by_hand():
    # 3 images, 2 captions each: caption c belongs to image c // 2
    owner = torch.tensor([0, 0, 1, 1, 2, 2])
    sim = torch.tensor([
        [0.9, 0.1, 0.8, 0.0, 0.0, 0.0],  # image 0: its caption 0 is top-1
        [0.0, 0.0, 0.1, 0.2, 0.9, 0.3],  # image 1: its best caption (3, 0.2) ranks 3rd
        [0.5, 0.0, 0.0, 0.0, 0.1, 0.6],  # image 2: caption 5 is top-1
    ])
    r = recall_at_k(sim, owner, ks=(1, 3))
    assert r["i2t_r1"] == pytest.approx(200 / 3) and r["i2t_r3"] == pytest.approx(100.0)
    # text -> image, rank of the right image per caption column: c0 0, c1 0, c2 1, c3 0, c4 1, c5 0
    assert r["t2i_r1"] == pytest.approx(400 / 6) and r["t2i_r3"] == pytest.approx(100.0)
