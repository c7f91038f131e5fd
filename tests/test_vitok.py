"""ViTok (tokenizers_svc/families/vitok.py, vitok_model.py): patching, rotary positions at several resolutions and
frame counts, the bottleneck size E, the KL/plain switch, and the paper-size presets' parameters and
GFLOPs (meta device) against the paper (arXiv 2501.09755) and an analytic count."""

from __future__ import annotations

import math

import pytest
import torch

from tokenizers_svc.errors import ShapeMismatchError
from tokenizers_svc.families.vitok import VITOK_PRESETS
from tokenizers_svc.families.vitok_model import ViTokModel, apply_axial_rope, axial_rope_tables
from tokenizers_svc.loading import load_tokenizer
from tokenizers_svc.media import read_video, video_to_tensor
from tokenizers_svc.model_stats import count_params, meta_backend, preset_stats
from tokenizers_svc.registry import get_preset

# Table values from the paper (256p image): parameters and GFLOPs (multiply-accumulates).
PAPER_S_B_16 = {"params": 129.0e6, "gflops": 34.8}
PAPER_TOLERANCE = 0.10  # the bound: within 10% of the paper


def _tiny(**overrides) -> ViTokModel:
    torch.manual_seed(0)
    config = {**VITOK_PRESETS["vitok-tiny-8"][0], **overrides}
    return ViTokModel(**config).eval()


def test_patchify_is_inverted_by_unpatchify():
    image_model = _tiny()
    x = torch.randn(2, 3, 24, 40)
    tokens, grid = image_model.patchify(x)
    assert tokens.shape == (2, 3 * 5, 3 * 8 * 8) and grid == (3, 5)
    assert torch.equal(image_model.unpatchify(tokens, grid), x)
    video_model = _tiny(modality="video", tubelet_size=2)
    v = torch.randn(1, 3, 6, 16, 24)
    tokens, grid = video_model.patchify(v)
    assert tokens.shape == (1, 3 * 2 * 3, 3 * 2 * 8 * 8) and grid == (3, 2, 3)
    assert torch.equal(video_model.unpatchify(tokens, grid), v)
    # a token holds exactly one q x p x p tubelet: token 0 is frames 0-1, rows 0-7, cols 0-7
    assert torch.equal(tokens[0, 0].view(3, 2, 8, 8), v[0, :, :2, :8, :8])


def test_rotary_scores_depend_only_on_relative_position():
    """q.k after axial RoPE is the same for any pair of positions with the same (dt, dy, dx)."""
    head_dim, grid = 32, (3, 4, 5)  # 3 axes x 10 rotated channels, 2 channels left as they are
    cos, sin = axial_rope_tables(grid, head_dim, 10000.0, torch.device("cpu"))
    q, k = torch.randn(head_dim), torch.randn(head_dim)
    shape = (1, 1, math.prod(grid), head_dim)
    rq = apply_axial_rope(q.expand(shape), cos, sin)[0, 0]  # (L, head_dim), same q at every position
    rk = apply_axial_rope(k.expand(shape), cos, sin)[0, 0]

    def index(t, y, x):
        return (t * grid[1] + y) * grid[2] + x

    a = rq[index(0, 1, 1)] @ rk[index(1, 2, 3)]
    b = rq[index(1, 2, 2)] @ rk[index(2, 3, 4)]  # the same offset (1, 1, 2) elsewhere in the grid
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    c = rq[index(0, 1, 1)] @ rk[index(1, 2, 2)]  # a different offset scores differently
    assert not torch.allclose(a, c, atol=1e-3)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm().expand(rq.shape[0]), rtol=1e-5, atol=1e-5)
    assert torch.equal(rq[:, 30:], q[30:].expand(rq.shape[0], 2))


def test_one_model_runs_at_several_resolutions_and_frame_counts():
    image_model = _tiny()
    for h, w in ((16, 16), (48, 64), (72, 40)):
        posterior = image_model.encode(torch.zeros(1, 3, h, w)).latent_dist
        assert posterior.mean.shape == posterior.logvar.shape == (1, 8, h // 8, w // 8)
        assert image_model.decode(posterior.mean).sample.shape == (1, 3, h, w)
    video_model = _tiny(modality="video", tubelet_size=2)
    for t in (2, 4, 8):
        mean = video_model.encode(torch.zeros(1, 3, t, 16, 24)).latent_dist.mean
        assert mean.shape == (1, 8, t // 2, 2, 3)
        assert video_model.decode(mean).sample.shape == (1, 3, t, 16, 24)


def test_bottleneck_size_on_a_real_clip(shared_data):
    """E = (T/q)(H/p)(W/p) c floats for 2x8x8 tubelets and c = 8, through the Tokenizer."""
    frames = read_video(shared_data / "videos" / "tree.avi", max_frames=6).frames  # (6, 240, 320, 3)
    tokenizer = load_tokenizer("vitok-tiny-2x8")
    latents = tokenizer.encode(video_to_tensor(frames))
    t, h, w = 6, 240, 320
    assert latents.latents.numel() == (t // 2) * (h // 8) * (w // 8) * 8
    assert latents.latents.shape == (1, 8, 3, 30, 40)
    assert tokenizer.spec.compression_ratio(h, w, t) == pytest.approx(3 * 2 * 8 * 8 / 8)


def test_plain_bottleneck_has_no_posterior(photo_nchw, tmp_path):
    model = _tiny(variational=False)
    encoded = model.encode(photo_nchw.float() / 127.5 - 1)
    assert not hasattr(encoded, "latent_dist") and encoded.latent.shape == (1, 8, 6, 8)
    model.save_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    assert not tokenizer.spec.is_kl and tokenizer.spec.family == "ViTok"
    assert tokenizer.encode(photo_nchw).latents.shape == (1, 8, 6, 8)


def test_decoder_is_larger_than_encoder():
    """The paper's recipe, as the built networks have it: a small encoder and a bigger decoder (more
    parameters and more compute on the reference input), in every paper-size preset."""
    for name in ("vitok-s-b-16", "vitok-s-l-16", "vitok-s-b-4x8", "vitok-s-b-4x16"):
        module = meta_backend(get_preset(name)).module
        encoder, decoder = (
            sum(p.numel() for p in part.parameters()) for part in (module.encoder, module.decoder)
        )
        assert decoder > encoder, (name, encoder, decoder)
        stats = preset_stats(name)
        assert stats.decoder_gflops > stats.encoder_gflops, name


def test_invalid_shapes_raise_typed_errors():
    model = _tiny()
    with pytest.raises(ShapeMismatchError, match="multiples of 8"):
        model.encode(torch.zeros(1, 3, 20, 16))
    with pytest.raises(ShapeMismatchError, match="NCHW"):
        model.encode(torch.zeros(1, 3, 2, 16, 16))
    with pytest.raises(ShapeMismatchError, match="latents"):
        model.decode(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="tubelet_size=1"):
        ViTokModel(modality="image", tubelet_size=2)


def analytic_gmacs(config: dict, frames: int, height: int, width: int) -> tuple[float, float]:
    """Multiply-accumulates of ViTok's matmuls, written out independently of the counter.

    Per block of width d over L tokens: qkv 3d^2 L, output d^2 L, SwiGLU 3 d h L, scores and
    weighted values 2 L^2 d. Plus patch embedding, bottleneck projections and pixel head.
    """
    p, q, c = config["patch_size"], config.get("tubelet_size", 1), config["latent_channels"]
    tokens = (frames // q) * (height // p) * (width // p)
    patch = 3 * q * p * p

    def transformer(d: int, depth: int) -> float:
        hidden = round(d * 3.5)
        return depth * (4 * d * d * tokens + 3 * d * hidden * tokens + 2 * tokens * tokens * d)

    encoder = patch * config["encoder_width"] * tokens + transformer(
        config["encoder_width"], config["encoder_depth"]
    )
    encoder += config["encoder_width"] * 2 * c * tokens
    decoder = c * config["decoder_width"] * tokens + transformer(
        config["decoder_width"], config["decoder_depth"]
    )
    decoder += config["decoder_width"] * patch * tokens
    return encoder / 1e9, decoder / 1e9


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("vitok-s-b-16", (1, 3, 256, 256)),
        ("vitok-s-l-16", (1, 3, 256, 256)),
        ("vitok-s-b-4x8", (1, 3, 16, 128, 128)),  # the paper's UCF-101 setting
        ("vitok-s-b-4x16", (1, 3, 16, 128, 128)),
        ("vitok-tiny-2x8", (1, 3, 18, 256, 256)),
    ],
)
def test_counted_flops_include_attention(name, shape):
    """The meta-device FlopCounter total equals the analytic count, attention matmuls included."""
    stats = preset_stats(name, shape)
    frames = shape[2] if len(shape) == 5 else 1
    encoder, decoder = analytic_gmacs(VITOK_PRESETS[name][0], frames, *shape[-2:])
    assert stats.encoder_gflops == pytest.approx(encoder, rel=1e-9)
    assert stats.decoder_gflops == pytest.approx(decoder, rel=1e-9)


def test_s_b_16_matches_the_paper():
    stats = preset_stats("vitok-s-b-16")  # 256x256 image, meta device
    assert stats.params == pytest.approx(PAPER_S_B_16["params"], rel=PAPER_TOLERANCE)
    assert stats.gflops == pytest.approx(PAPER_S_B_16["gflops"], rel=PAPER_TOLERANCE)
    # measured: 129.23M parameters and 34.89 GFLOPs, i.e. within 0.3% of both
    assert stats.params == pytest.approx(PAPER_S_B_16["params"], rel=0.003)
    assert stats.gflops == pytest.approx(PAPER_S_B_16["gflops"], rel=0.003)


def test_paper_presets_share_the_s_b_body():
    """S-B/4x8 has exactly S-B/16's parameters (same 768-float patches); S-L/16 adds a deeper, wider
    decoder (24 x 1024) and S-B/4x16 only a 4x larger patch head and embedding."""

    def params(name: str) -> int:
        return count_params(meta_backend(get_preset(name)).module)

    s_b_16 = params("vitok-s-b-16")
    assert params("vitok-s-b-4x8") == s_b_16
    embed_growth = (3 * 4 * 16 * 16 - 3 * 16 * 16) * (384 + 768 + 1)  # patch embed + pixel head (+bias)
    assert params("vitok-s-b-4x16") == s_b_16 + embed_growth
    assert params("vitok-s-l-16") > 3 * s_b_16


def test_gradient_checkpointing_gives_the_same_gradients(photo_nchw):
    x = photo_nchw.float() / 127.5 - 1
    grads = []
    for checkpointing in (False, True):
        model = _tiny().train()
        if checkpointing:
            model.enable_gradient_checkpointing()
            assert model.encoder.gradient_checkpointing and model.decoder.gradient_checkpointing
        mean = model.encode(x).latent_dist.mean
        reconstruction = model.decode(mean).sample
        ((reconstruction - x).pow(2).mean() + mean.pow(2).mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)
