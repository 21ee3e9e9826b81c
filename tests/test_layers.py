import pytest
import torch

import groupseg
from groupseg.layers.grouping import AssignAttention, gumbel_softmax, hard_softmax


def test_hard_softmax_is_one_hot_with_soft_gradient():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    y = hard_softmax(logits, dim=1)
    assert torch.allclose(y.detach().sum(1), torch.ones(2, 7))
    assert set(y.detach().unique().tolist()) <= {0.0, 1.0}
    (y * torch.randn_like(y)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_gumbel_softmax_samples_are_one_hot_and_random():
    torch.manual_seed(0)
    logits = torch.zeros(1, 4, 1000)
    y = gumbel_softmax(logits, dim=1, hard=True)
    assert torch.equal(y.sum(1), torch.ones(1, 1000))
    counts = y.sum(-1)[0]
    assert (counts > 150).all(), counts  # roughly uniform over 4 groups


def test_assign_attention_eval_is_deterministic_and_train_is_stochastic():
    torch.manual_seed(0)
    a = AssignAttention(16)
    g, x = torch.randn(2, 4, 16), torch.randn(2, 30, 16)
    a.eval()
    o1, s1 = a(g, x)
    o2, _ = a(g, x)
    assert torch.equal(o1, o2)
    assert s1.shape == (2, 4, 30) and torch.allclose(s1.sum(1), torch.ones(2, 30))
    a.train()
    o3, _ = a(g, x)
    o4, _ = a(g, x)
    assert not torch.equal(o3, o4)


def test_model_forward_backward_shapes_no_nans():
    torch.manual_seed(0)
    m = groupseg.create_model("groupvit-tiny-test").train()
    px = torch.randn(3, 3, 32, 32)
    ids = torch.randint(1, 49000, (3, 4, 10))
    ids[..., -1] = 49407
    out = m(px, ids)
    assert out["image_embeds"].shape == (3, 16) and out["text_embeds"].shape == (3, 4, 16)
    assert torch.allclose(out["image_embeds"].norm(dim=-1), torch.ones(3), atol=1e-5)
    loss = out["image_embeds"].sum() + out["text_embeds"].sum() + out["logit_scale"]
    loss.backward()
    grads = {n: p.grad for n, p in m.named_parameters() if n != "multi_label_logit_scale"}
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, missing  # every weight is reached by the gradient
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert m.visual.stages[0].group_token.grad.abs().sum() > 0


def test_grad_checkpointing_gives_same_output_and_grads():
    torch.manual_seed(0)
    m = groupseg.create_model("groupvit-tiny-test").eval()  # eval: no Gumbel noise
    px = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[49406, 320, 1929, 49407], [49406, 530, 49407, 0]])

    def run():
        m.zero_grad()
        out = m(px, ids)
        (out["image_embeds"] @ out["text_embeds"].T).sum().backward()
        return out["image_embeds"].detach(), m.visual.stages[0].blocks[0].attn.qkv.weight.grad.clone()

    e1, g1 = run()
    m.set_grad_checkpointing(True)
    e2, g2 = run()
    assert torch.allclose(e1, e2, atol=1e-6) and torch.allclose(g1, g2, atol=1e-6)


def test_text_padding_trim_is_exact():
    torch.manual_seed(0)
    m = groupseg.create_model("groupvit-tiny-test").eval()
    ids = torch.zeros(2, 77, dtype=torch.long)
    ids[0, :4] = torch.tensor([49406, 320, 1929, 49407])
    ids[1, :3] = torch.tensor([49406, 530, 49407])
    full = m.encode_text(ids)
    short = m.encode_text(ids[:, :4])
    assert torch.allclose(full, short, atol=1e-6)


def test_any_input_size_and_no_weight_decay():
    m = groupseg.create_model("groupvit-tiny-test").eval()
    with torch.no_grad():
        g = m.encode_groups(torch.randn(1, 3, 48, 80))
    assert g["grid"] == (6, 10) and g["grouping"].shape == (1, 4, 6, 10)
    nwd = m.no_weight_decay()
    assert "visual.pos_embed" in nwd and "visual.stages.0.group_token" in nwd
    assert "visual.stages.0.blocks.0.attn.qkv.weight" not in nwd


def test_conv_stem_keeps_the_patch_grid():  # its save/load round trip: tests/test_weights.py
    from groupseg.layers.patch_embed import PatchEmbed

    for hw in ((32, 32), (40, 56), (37, 45)):
        a, grid_a = PatchEmbed(8, 3, 16, stem="patch")(torch.randn(2, 3, *hw))
        b, grid_b = PatchEmbed(8, 3, 16, stem="conv")(torch.randn(2, 3, *hw))
        assert grid_a == grid_b == (hw[0] // 8, hw[1] // 8) and a.shape == b.shape
    with pytest.raises(ValueError, match="power-of-two"):
        PatchEmbed(12, 3, 16, stem="conv")
    with pytest.raises(ValueError, match="unknown stem"):
        PatchEmbed(8, 3, 16, stem="hybrid")


def test_bf16_cpu_attention_matches_fp32_sdpa():
    from groupseg.layers.attention import Attention

    torch.manual_seed(0)
    sdpa = Attention(32, 4, fused_attn=True)
    attn = Attention(32, 4)  # default path: plain matmuls on CPU in bf16
    attn.load_state_dict(sdpa.state_dict())
    x, ctx = torch.randn(2, 9, 32), torch.randn(2, 5, 32)
    for kwargs in ({}, {"causal": True}, {"context": ctx}):
        ref = sdpa(x, **kwargs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attn(x, **kwargs)  # the plain-matmul path
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


def test_fewer_groupings_give_the_finer_segments():
    torch.manual_seed(0)
    model = groupseg.create_model("groupvit-tiny-test").eval()
    x = torch.randn(2, 3, 32, 40)
    full = model.encode_groups(x)
    fine = model.encode_groups(x, groupings=1)
    assert full["grouping"].shape == (2, 4, 4, 5) and len(full["assignments"]) == 2
    assert fine["grouping"].shape == (2, 8, 4, 5) and len(fine["assignments"]) == 1  # stage 1's 8 groups
    assert fine["group_embeds"].shape == (2, 8, model.cfg.embed_dim)
    torch.testing.assert_close(fine["grouping"].sum(1), torch.ones(2, 4, 5))
    torch.testing.assert_close(model.encode_groups(x, groupings=2)["group_embeds"], full["group_embeds"])


def test_learnable_assignment_scale_sharpens_groups():  # its save/load round trip: tests/test_weights.py
    torch.manual_seed(0)
    groups, x = torch.randn(2, 4, 16), torch.randn(2, 20, 16)
    plain = AssignAttention(16).eval()
    scaled = AssignAttention(16, scale_init=8.0).eval()
    scaled.load_state_dict(plain.state_dict() | {"logit_scale": scaled.logit_scale.detach()})
    (_, soft_p), (_, soft_s) = plain(groups, x), scaled(groups, x)
    # same argmax (the hard assignment), sharper soft assignment: logits times 8
    assert torch.equal(soft_p.argmax(1), soft_s.argmax(1))
    assert soft_s.amax(1).mean() > soft_p.amax(1).mean()
    torch.testing.assert_close(soft_s, (soft_p.log() * 8).softmax(1), atol=1e-5, rtol=1e-4)
    out, _ = scaled.train()(groups, x)
    out.sum().backward()
    assert scaled.logit_scale.grad is not None  # it learns
    cfg = groupseg.get_model_config("groupvit-tiny-test")
    cfg.vision.assign_scale_init = 5.0
    model = groupseg.GroupViT(cfg).eval()
    assert "logit_scale" in "".join(n for n in model.no_weight_decay() if "assign" in n)


def test_attention_path_is_a_per_module_flag_and_both_paths_agree(monkeypatch):
    import torch.nn.functional as F

    from groupseg.layers import attention
    from groupseg.layers.attention import Attention, set_fused_attn

    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    torch.manual_seed(0)
    a, b = Attention(16, 2), Attention(16, 2)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 7, 16)
    ref = a(x, causal=True)
    assert len(calls) == 1  # default on CPU in fp32: SDPA
    b.fused_attn = False
    torch.testing.assert_close(b(x, causal=True), ref, atol=1e-5, rtol=1e-5)
    assert len(calls) == 1 and a.fused_attn is None  # plain matmuls; the other module kept its own path
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a(x)  # bf16 on CPU: plain matmuls by default
    assert len(calls) == 1
    with torch.autocast("cpu", dtype=torch.float16):
        a(x)  # fp16 on CPU is not a matmul dtype: SDPA by default
    assert len(calls) == 2
    m = groupseg.create_model("groupvit-tiny-test")
    n = set_fused_attn(m, False)
    blocks = sum(s.depth for s in m.cfg.vision.stages) + m.cfg.text.depth
    groupings = sum(1 for s in m.cfg.vision.stages if s.num_output_groups)
    assert n == blocks + groupings  # every block's and every grouping block's cross-attention
    assert {mod.fused_attn for mod in m.modules() if isinstance(mod, Attention)} == {False}


def test_drop_path_drops_whole_samples_and_keeps_the_mean():
    from groupseg.layers.drop import DropPath

    torch.manual_seed(0)
    dp = DropPath(0.25)
    x = torch.ones(4000, 3, 5)
    y = dp(x)
    per_sample = y.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1)).all()  # a sample is dropped whole or scaled
    kept = (per_sample[:, 0] > 0).float().mean().item()
    assert abs(kept - 0.75) < 0.03 and abs(y.mean().item() - 1.0) < 0.05
    dp.eval()
    assert torch.equal(dp(x), x)
    with pytest.raises(ValueError, match="drop path"):
        DropPath(1.0)
    cfg = groupseg.get_model_config("groupvit-tiny-test")
    cfg.vision.drop_path_rate = 0.2
    m = groupseg.GroupViT(cfg)
    rates = [blk.drop_path.p for s in m.visual.stages for blk in s.blocks if isinstance(blk.drop_path, DropPath)]
    assert rates and rates == sorted(rates) and abs(rates[-1] - 0.2) < 1e-6  # linear stochastic-depth schedule


def test_layers_take_activation_and_norm_types():
    from functools import partial

    from groupseg.layers.block import Block
    from groupseg.layers.create import get_act_layer
    from groupseg.layers.grouping import GroupingBlock
    from groupseg.layers.mlp import QuickGELU

    blk = Block(16, 2, act_layer=QuickGELU, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    assert isinstance(blk.mlp.act, QuickGELU) and blk.norm1.eps == blk.norm2.eps == 1e-6
    grp = GroupingBlock(16, 2, 8, 4, act_layer=torch.nn.ReLU, norm_layer=torch.nn.Identity)
    assert isinstance(grp.mlp_channels.act, torch.nn.ReLU) and isinstance(grp.pre_assign_attn.norm_post, torch.nn.Identity)
    out, soft = grp.eval()(torch.randn(2, 10, 16), torch.randn(2, 8, 16))
    assert out.shape == (2, 4, 16) and soft.shape == (2, 4, 10)
    cfg = groupseg.get_model_config("groupvit-tiny-test")
    cfg.vision.act, cfg.vision.layer_norm_eps = "quick_gelu", 1e-6
    m = groupseg.GroupViT(cfg)
    assert isinstance(m.visual.stages[0].blocks[0].mlp.act, QuickGELU)
    assert m.visual.patch_embed.norm.eps == m.visual.norm.eps == m.visual.stages[0].grouping.norm_x.eps == 1e-6
    with pytest.raises(ValueError, match="unknown activation"):
        get_act_layer("swish")


@pytest.mark.slow
@pytest.mark.subprocess
def test_importing_the_model_imports_no_timm():
    import subprocess
    import sys

    code = "import sys, groupseg.models.groupvit, groupseg; print(sorted(m for m in sys.modules if m.split('.')[0] == 'timm'))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
