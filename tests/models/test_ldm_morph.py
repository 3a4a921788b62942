import math

import pytest
import torch
import torch.nn.functional as F

from diffreg.config import get_config
from diffreg.diffusion import ddim_sample, final
from diffreg.models import MODELS, LDMMorph, build
from diffreg.models.ldm_morph import LGCA, STAGE1_STAGES, hierarchical_similarity, ldm_schedule, window_cross_attention
from diffreg.spatial import warp
from diffreg.train import train_stages

# a tiny two-level LDM-Morph for fast CPU tests (32 x 32 images, 8 x 8 latents)
TINY = dict(embed_dim=8, depths=(2, 2), num_heads=(2, 2), window_size=4, drop_path_rate=0.0, lgca_heads=2,
            ae_channels=(4, 8), ae_res_layers=1, ae_embeddings=16, ae_embedding_dim=1,
            ldm_channels=(4, 8), ldm_attention=(False, False), ldm_res_blocks=2, ldm_head_channels=4,
            ldm_norm_groups=4, ae_steps=3, ae_batch=4, ldm_steps=3, ldm_batch=4)


def _images(b=1, size=(32, 32), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, *size, generator=g), torch.rand(b, 1, *size, generator=g)


def _ready(**kw):
    """A tiny model whose (untrained, random) stage 1 is declared ready."""
    torch.manual_seed(0)
    model = LDMMorph(dims=2, **{**TINY, **kw})
    model.stage1_ready.fill_(True)
    return model


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, n=3):
        self.items = [dict(zip(("moving", "fixed"), (x[0] for x in _images(1, seed=i)))) for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


# ---------------------------------------------------------------------------------------------------------------
# LGCA: window cross-attention with swapped queries (eq. 9-11)
# ---------------------------------------------------------------------------------------------------------------


def _attn(dim=8, heads=2, window=(2, 2)):
    from monai.networks.nets.swin_unetr import WindowAttention

    torch.manual_seed(0)
    attn = WindowAttention(dim, num_heads=heads, window_size=window, qkv_bias=True)
    torch.nn.init.normal_(attn.relative_position_bias_table, std=0.5)
    return attn.eval()


def test_window_cross_attention_matches_independent_sdpa():
    attn = _attn()
    kv, q = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    out = window_cross_attention(attn, kv, q)
    # independent: queries from q, keys and values from kv, through torch's scaled_dot_product_attention
    w, b = attn.qkv.weight, attn.qkv.bias
    qh = F.linear(q, w[:8], b[:8]).view(3, 4, 2, 4).transpose(1, 2)
    kh = F.linear(kv, w[8:16], b[8:16]).view(3, 4, 2, 4).transpose(1, 2)
    vh = F.linear(kv, w[16:], b[16:]).view(3, 4, 2, 4).transpose(1, 2)
    bias = attn.relative_position_bias_table[attn.relative_position_index.reshape(-1)].view(4, 4, 2).permute(2, 0, 1)
    ref = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias.unsqueeze(0))
    ref = attn.proj(ref.transpose(1, 2).reshape(3, 4, 8))
    assert torch.allclose(out, ref, atol=1e-5)
    # with q = kv it is MONAI's self-attention (eq. 8)
    assert torch.allclose(window_cross_attention(attn, kv, kv), attn(kv, None), atol=1e-5)


def test_cross_attention_queries_only_reweight_the_other_stream():
    attn = _attn()
    # keys/values from tokens that are identical within each window: any queries give the same output
    kv = torch.randn(3, 1, 8).expand(3, 4, 8).contiguous()
    a = window_cross_attention(attn, kv, torch.randn(3, 4, 8))
    b = window_cross_attention(attn, kv, torch.randn(3, 4, 8))
    assert torch.allclose(a, b, atol=1e-5)
    # ... while different keys/values change it, and different queries change it for a varied kv
    kv2 = torch.randn(3, 4, 8)
    q1, q2 = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    assert not torch.allclose(window_cross_attention(attn, kv2, q1), window_cross_attention(attn, kv2, q2), atol=1e-3)


def test_lgca_swaps_queries_between_branches():
    torch.manual_seed(0)
    lgca = LGCA(8, num_heads=2, window_size=(2, 2)).eval()
    s, g = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    out = lgca(s, g)
    assert out.shape == (2, 16, 4, 4)
    # the two branches share weights and swap roles: LGCA(g, s) is LGCA(s, g) with its halves exchanged
    swapped = lgca(g, s)
    assert torch.allclose(swapped[:, :8], out[:, 8:], atol=1e-5)
    assert torch.allclose(swapped[:, 8:], out[:, :8], atol=1e-5)
    # the first half is the s-branch (eq. 9): queries from g -- it changes when only g changes
    g2 = torch.randn_like(g)
    assert not torch.allclose(lgca(s, g2)[:, :8], out[:, :8], atol=1e-3)
    with pytest.raises(ValueError, match="same shape"):
        lgca(s, g[:, :, :2])


# ---------------------------------------------------------------------------------------------------------------
# Stage 1: schedule, DDIM inversion, features
# ---------------------------------------------------------------------------------------------------------------


def test_ldm_schedule_is_linear_in_sqrt_beta():
    sch = ldm_schedule()
    assert sch.num_timesteps == 1000
    assert math.isclose(float(sch.betas[0]), 0.0015, rel_tol=1e-9)
    assert math.isclose(float(sch.betas[-1]), 0.0195, rel_tol=1e-9)
    d = torch.diff(sch.betas.sqrt())
    assert torch.allclose(d, d[0].expand_as(d))


def test_ddim_inversion_then_sampling_reconstructs_the_latent():
    model = _ready()
    torch.manual_seed(1)
    for p in model.unet.parameters():  # MONAI zero-initialises the output conv: give eps a non-trivial value
        if p.ndim > 1 and not p.any():
            torch.nn.init.normal_(p, std=0.1)
    z0 = model.encode(_images(2)[0]).detach()
    z0 = z0 / z0.std()
    t = 100
    errors = {}
    for steps in (11, 101):
        model.invert_steps = steps
        with torch.no_grad():
            z_t = model.diffuse(z0, t=t, mode="ddim")
            back = final(ddim_sample(lambda x, tt: model.eps(x, tt), z_t, model.schedule, steps=steps, start_t=t))
        moved = (z_t - z0).norm()
        assert moved > 0.05 * z0.norm()  # the inversion really moved the latent
        errors[steps] = float((back - z0).norm() / moved)
    # DDIM sampling brings the inverted latent back (unit steps: within 1 % of the distance it moved), and the
    # error shrinks with the step size as for a consistent integrator
    assert errors[101] < 0.01, errors
    assert errors[101] < errors[11] / 3, errors


def test_features_per_level_and_cache_is_exact():
    model = _ready()
    m, f = _images(2)
    feats, zm, zf = model.ldm_features(m, f)
    # level 0: conv_in (4) + last ResBlock (4); level 1: down-sampler (4) + last ResBlock (8); x 2 images
    assert [tuple(x.shape) for x in feats] == [(2, 16, 8, 8), (2, 24, 4, 4)]
    assert zm.shape == zf.shape == (2, 1, 8, 8)
    assert torch.allclose(zm, model.encode(m))
    model.cache_features = True
    cached = model.ldm_features(m, f)[0]
    again = model.ldm_features(m, f)[0]
    assert len(model._feature_cache) == 4
    for a, b, c in zip(feats, cached, again):
        assert torch.allclose(a, b, atol=1e-6) and torch.equal(b, c)
    # q_sample features (official code) differ from the DDIM-inversion features (paper)
    model.feature_noise = "q_sample"
    noisy = model.ldm_features(m, f, generator=torch.Generator().manual_seed(0))[0]
    assert not torch.allclose(noisy[0], feats[0])


# ---------------------------------------------------------------------------------------------------------------
# Hierarchical similarity (eq. 13-15): the latent term moves phi
# ---------------------------------------------------------------------------------------------------------------


def test_latent_loss_has_gradient_wrt_the_field_and_matches_finite_differences():
    model = _ready()
    m, f = _images(1)
    # a smooth field a * u0; d L_lat / d a by autograd and by central differences
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    u0 = torch.stack([torch.sin(3 * xx), torch.cos(2 * yy)])[None] * 2.0
    a = torch.tensor(0.3, requires_grad=True)
    _, _, lat = hierarchical_similarity(warp(m, a * u0), f, model.encode, beta=0.0)
    (grad,) = torch.autograd.grad(lat, a)
    assert grad.abs() > 0
    with torch.no_grad():
        h = 1e-3
        lp = hierarchical_similarity(warp(m, (0.3 + h) * u0), f, model.encode, beta=0.0)[2]
        lm = hierarchical_similarity(warp(m, (0.3 - h) * u0), f, model.encode, beta=0.0)[2]
    assert torch.isclose(grad, (lp - lm) / (2 * h), rtol=2e-2, atol=1e-6)
    # the frozen encoder gets no gradient, but the registration network does through L_lat alone
    model = _ready(beta=0.0)
    terms = model.loss({"moving": m, "fixed": f})
    terms["total"].backward()
    assert all(p.grad is None for p in model.autoencoder.parameters())
    assert model.head.weight.grad.abs().sum() > 0


def test_loss_terms_and_beta():
    m, f = _images(1)
    model = _ready(beta=0.6)
    t = model.loss({"moving": m, "fixed": f})
    assert set(t) == {"total", "sim", "org", "lat", "smooth"}
    assert torch.allclose(t["sim"], 0.6 * t["org"] + 0.4 * t["lat"])
    assert torch.allclose(t["total"], t["sim"] + 0.01 * t["smooth"])
    model = _ready(beta=1.0)
    t = model.loss({"moving": m, "fixed": f})
    assert torch.allclose(t["total"], t["org"] + 0.01 * t["smooth"])  # lat only reported
    assert not t["lat"].requires_grad
    with pytest.raises(ValueError, match="beta"):
        hierarchical_similarity(m, f, None, beta=1.5)


# ---------------------------------------------------------------------------------------------------------------
# Shapes, ablation switches, stage-1 caching, profiles
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("switches", [dict(), dict(use_lgca=False), dict(use_ldm_features=False, beta=1.0)])
def test_shapes_and_ablation_switches(switches):
    model = _ready(**switches)
    m, f = _images(2)
    ddf = model(m, f)
    assert ddf.shape == (2, 2, 32, 32)
    assert ddf.abs().max() < 1e-2  # N(0, 1e-5) head: training starts near the identity
    res = model.register(m, f)
    assert res.warped.shape == m.shape
    assert ("features" in res.extras) == model.use_ldm_features
    if not model.needs_stage1:
        assert model.autoencoder is None and model.unet is None
    model.loss({"moving": m, "fixed": f})["total"].backward()
    assert model.global_features.patch_embed.proj.weight.grad is not None


def test_3d_forward():
    torch.manual_seed(0)
    model = LDMMorph(dims=3, **TINY)
    model.stage1_ready.fill_(True)
    m, f = _images(1, size=(8, 16, 16))
    assert model(m, f).shape == (1, 3, 8, 16, 16)


def test_prepare_trains_caches_freezes_and_restores(tmp_path):
    data = _Pairs()
    torch.manual_seed(0)
    model = LDMMorph(dims=2, **TINY)
    with pytest.raises(RuntimeError, match="train_stages"):
        model(*_images(1))
    assert model.num_parameters() == model.registration_parameters()  # stage 1 is never in the optimiser
    train_stages(model, data, out=tmp_path, progress=False)
    assert all((tmp_path / name / "checkpoint.pt").is_file() for name in STAGE1_STAGES) and bool(model.stage1_ready)
    assert all(not p.requires_grad for p in model.autoencoder.parameters())
    assert len(model.stage1_log["ae_l1"]) == 3 and len(model.stage1_log["ldm_mse"]) == 3
    # a fresh model with another seed loads the cached stage 1 instead of training it
    torch.manual_seed(5)
    other = LDMMorph(dims=2, **TINY)
    train_stages(other, data, out=tmp_path, progress=False)
    for a, b in zip(model.unet.state_dict().values(), other.unet.state_dict().values()):
        assert torch.equal(a, b)
    # the state_dict carries stage 1 (load_run restores the whole model)
    fresh = LDMMorph(dims=2, **TINY)
    fresh.load_state_dict(model.state_dict())
    m, f = _images(1)
    model.eval(), fresh.eval()
    assert torch.allclose(fresh(m, f), model(m, f))
    model.train()
    assert not model.autoencoder.training and not model.unet.training  # frozen parts stay in eval mode


def test_paper_profile_parameter_count():
    # Registration network at the paper profile: 30,324,582 parameters. The official code prints ~31.5 M; it
    # counts ~2.35 M of decoder convolutions (DecoderBlock.conv3 of up0-up2) defined but never run, while here the
    # deepest LGCA level feeds both branches to the decoder (+1.18 M), as sec. 3.3.2 describes.
    model = build("ldm-morph", profile="paper")
    n = model.registration_parameters()
    print(f"LDM-Morph paper registration network: {n:,}; stage 1: {model.stage1_parameters()}")
    assert n == model.num_parameters() == 30_324_582
    assert abs(n - 31.5e6) / 31.5e6 < 0.05
    assert model.latent_convs[3][0].in_channels == 2 * (192 + 256)  # official LDMMorph(..., 448 * 2)


def test_build_and_config():
    assert MODELS["ldm-morph"] is LDMMorph
    quick, paper = get_config("ldm-morph", "quick"), get_config("ldm-morph", "paper")
    assert paper.model["beta"] == 0.6 and paper.model["lambda_smooth"] == 0.01
    assert paper.train.lr == 1e-4 and paper.train.batch_size == 1 and paper.data.size == (128, 128)
    assert paper.model["timesteps"] == 1000 and paper.model["feature_t"] == 1
    assert quick.data.dims == 2 and quick.data.size == (64, 64)


def test_bad_inputs():
    model = _ready()
    with pytest.raises(ValueError, match="divisible by 8"):
        model(torch.zeros(1, 1, 36, 32), torch.zeros(1, 1, 36, 32))
    with pytest.raises(ValueError, match="one channel"):
        model(torch.zeros(1, 2, 32, 32), torch.zeros(1, 2, 32, 32))
    with pytest.raises(ValueError, match="beta"):
        LDMMorph(dims=2, **{**TINY, "beta": 1.5})
    with pytest.raises(ValueError, match="feature_noise"):
        LDMMorph(dims=2, **{**TINY, "feature_noise": "ddpm"})
    with pytest.raises(ValueError, match="dims"):
        LDMMorph(dims=4)
    with pytest.raises(ValueError, match="options"):
        model.register(*_images(1), steps=3)
