"""diffusers VQModel as a discrete tokenizer (tokenizers_svc/families/vq_model.py): a tiny random-init
model saved with save_pretrained and loaded offline through load_tokenizer; its ids are diffusers'
own codebook indices, its latents what VQModel.encode returns (before quantization), and latents
and ids decode to the same pixels through the library, the token file and the CLI."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO, cli_tokens_round_trip
from tokenizers_svc.errors import ConfigError, InvalidLatentsError, UnsupportedModelError
from tokenizers_svc.families.vq_model import VQModelBackend
from tokenizers_svc.loading import build_module, load_tokenizer
from tokenizers_svc.media import encode_image, image_to_tensor, read_image, tensor_to_image
from tokenizers_svc.model_stats import preset_stats
from tokenizers_svc.registry import get_preset
from tokenizers_svc.tokens import TokenIds, tokens_from_bytes

VOCABULARY = 64  # the tiny preset's num_vq_embeddings
CODE_DIM = 3  # its vq_embed_dim (the encoder emits 4 channels; quant_conv maps them to 3)


def _save(directory, photo_nchw, seed: int):
    """The tiny VQModel with its codebook set to 64 of the photo's own latent vectors plus a little
    noise (as k-means would start; the random init's rows are within 1/64 of zero, so a real
    input would use very few of them), saved with save_pretrained."""
    module = build_module(get_preset("vq-model-tiny")).eval()
    with torch.no_grad():
        latents = module.encode(photo_nchw.float() / 127.5 - 1).latents  # (1, 3, 12, 16)
        vectors = latents.movedim(1, -1).reshape(-1, CODE_DIM)  # (192, 3)
        generator = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(vectors), generator=generator)[:VOCABULARY]
        noise = torch.randn(VOCABULARY, CODE_DIM, generator=generator) * 1e-3
        module.quantize.embedding.weight.copy_(vectors[pick] + noise)
    module.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def saved(tmp_path_factory, photo_nchw):
    return _save(tmp_path_factory.mktemp("a") / "vq", photo_nchw, seed=0)


@pytest.fixture(scope="module")
def tokenizer(saved):
    return load_tokenizer(saved)


def test_loads_offline_from_save_pretrained_and_states_its_tokens(saved, tokenizer):
    assert isinstance(tokenizer.backend, VQModelBackend) and tokenizer.source == str(saved)
    spec = tokenizer.spec
    assert (spec.family, spec.modality, spec.spatial_compression, spec.latent_channels) == (
        "VQModel",
        "image",
        4,
        3,
    )
    assert not spec.is_kl and spec.normalization.scale == pytest.approx(0.18215)
    tokens = spec.to_dict()["tokens"]
    assert (tokens["kind"], tokens["levels"], tokens["vocabulary_size"]) == ("vq", [VOCABULARY], VOCABULARY)
    assert (tokens["id_dtype"], tokens["id_base"], tokens["layout"]) == ("int32", 0, "NHW")
    assert tokens["latents"].startswith("before quantization")
    # diffusers loaded the codebook itself (the loader added no quantizer of its own): the saved rows
    assert not tokenizer.backend.attached_quantizer
    (weights,) = saved.glob("*.safetensors")
    rows = load_file(weights)["quantize.embedding.weight"]
    assert rows.shape == (VOCABULARY, CODE_DIM)
    assert torch.equal(
        tokenizer.backend.quantizer.ids_to_codes(torch.arange(VOCABULARY).view(1, 1, -1))[0, :, 0].T, rows
    )


def test_ids_are_diffusers_codebook_indices_and_latents_come_before_quantization(tokenizer, photo_nchw):
    module = tokenizer.module
    ids = tokenizer.encode(photo_nchw, tokens=True)
    assert isinstance(ids, TokenIds) and ids.ids.dtype == torch.int32 and ids.ids.shape == (1, 12, 16)
    assert int(ids.ids.min()) >= 0 and int(ids.ids.max()) < VOCABULARY
    assert len(ids.ids.unique()) >= 16  # a real photo uses many rows of this codebook
    latents = tokenizer.encode(photo_nchw, normalize=False)
    with torch.no_grad():
        h = module.encode(photo_nchw.float() / 127.5 - 1).latents  # (1, 3, 12, 16), before quantization
        _, _, (_, _, indices) = module.quantize(h)
    assert torch.equal(latents.latents, h)  # what VQModel.encode returns
    assert torch.equal(ids.ids, indices.view(1, 12, 16).to(torch.int32))  # diffusers' own argmin
    rows = module.quantize.embedding.weight
    assert not torch.equal(latents.latents, rows[ids.ids.long()].movedim(-1, 1))  # not yet quantized
    normalized = tokenizer.encode(photo_nchw)
    assert torch.allclose(normalized.latents, h * 0.18215)  # LDMPipeline's space


def test_latents_and_ids_decode_to_the_same_pixels_as_diffusers(tokenizer, photo_nchw):
    latents = tokenizer.encode(photo_nchw, normalize=False)
    ids = tokenizer.encode(photo_nchw, tokens=True)
    from_ids = tokenizer.decode(ids)
    assert from_ids.shape == (1, 3, 48, 64)
    assert torch.equal(from_ids, tokenizer.decode(latents))  # decode quantizes the latents first
    assert torch.equal(from_ids, tokenizer.decode(tokenizer.latents_from_tokens(ids)))
    with torch.no_grad():
        reference = tokenizer.module.decode(latents.latents).sample.clamp(-1, 1)  # VQModel's own path
    assert torch.allclose(from_ids, reference, atol=1e-5)


def test_codes_and_ids_convert_exactly(tokenizer):
    codebook = tokenizer.backend.quantizer
    every_id = torch.arange(VOCABULARY, dtype=torch.int32).view(2, 4, 8)  # (N, h, w)
    codes = codebook.ids_to_codes(every_id)  # (2, 3, 4, 8): the rows themselves
    assert codes.shape == (2, CODE_DIM, 4, 8)
    assert torch.equal(codes[0, :, 0, 1], tokenizer.module.quantize.embedding.weight[1])
    again = codebook.codes_to_ids(codes)
    assert again.dtype == torch.int32 and torch.equal(again, every_id)  # ids -> codes -> ids
    z = torch.randn(1, CODE_DIM, 5, 7)
    snapped = codebook.codes(z)
    assert torch.equal(
        codebook.ids_to_codes(codebook.codes_to_ids(snapped)), snapped
    )  # codes -> ids -> codes
    assert torch.equal(codebook.codes(snapped), snapped)  # quantizing a code again changes nothing


def test_token_file_round_trip_and_refusals(tokenizer, photo_nchw, tmp_path):
    ids = tokenizer.encode(photo_nchw, tokens=True)
    back = tokens_from_bytes(ids.save(tmp_path / "ids.safetensors").read_bytes())
    assert torch.equal(back.ids, ids.ids) and back.levels == (VOCABULARY,)
    assert back.vocabulary_size == VOCABULARY and back.original_size == (48, 64)
    assert torch.equal(tokenizer.decode(back), tokenizer.decode(ids))
    other = load_tokenizer(_save(tmp_path / "b" / "vq", photo_nchw, seed=1))  # same name, other codebook
    assert other.name == tokenizer.name
    with pytest.raises(InvalidLatentsError, match="weights"):
        other.decode(back)
    with pytest.raises(InvalidLatentsError, match="levels"):
        tokenizer.decode(replace(back, levels=(8, 8)))  # the same 64 ids read as two FSQ digits
    with pytest.raises(InvalidLatentsError, match=r"\[0, 64\)"):
        tokenizer.decode(replace(back, ids=back.ids + VOCABULARY))


def test_cli_encode_tokens_info_and_decode(saved, tokenizer, photo_nchw, tmp_path):
    (tmp_path / "photo.png").write_bytes(encode_image(tensor_to_image(photo_nchw), "png"))
    info, ids = cli_tokens_round_trip(tmp_path / "photo.png", str(saved), tmp_path / "back.png")
    assert info["dtype"] == "int32" and info["vocabulary_size"] == VOCABULARY and info["layout"] == "NHW"
    assert info["shape"] == [1, 12, 16] and info["levels"] == [VOCABULARY]
    expected = tokenizer.decode(tokens_from_bytes(ids.read_bytes()), output_dtype=torch.uint8)
    assert torch.equal(image_to_tensor(read_image(tmp_path / "back.png")), expected)


def test_hub_preset_describes_the_released_ldm_first_stage():
    """CompVis/ldm-celebahq-256 vqvae: f4, 3 channels, 8192 rows (LDM's VQ-f4), counted on the meta
    device; offline and without local weights it fails at once, naming the hub id."""
    preset = get_preset("ldm-celebahq-vq-f4")
    assert (preset.source, preset.subfolder, preset.random_init) == (
        "CompVis/ldm-celebahq-256",
        "vqvae",
        False,
    )
    spec = VQModelBackend.spec_from_config(preset.config, preset.name)
    assert (spec.spatial_compression, spec.latent_channels, spec.quantizer.vocabulary_size) == (4, 3, 8192)
    assert spec.token_shape((1, 3, 256, 256)) == (1, 64, 64)
    assert preset_stats(preset).params == 55_322_782
    with pytest.raises(UnsupportedModelError, match="CompVis/ldm-celebahq-256"):
        load_tokenizer("ldm-celebahq-vq-f4")


def test_codebook_lookup_models_are_refused():
    config = {**get_preset("vq-model-tiny").config, "lookup_from_codebook": True}
    with pytest.raises(UnsupportedModelError, match="lookup_from_codebook"):
        VQModelBackend.spec_from_config(config, "amused-style")


def test_training_a_codebook_is_refused_with_the_reason():
    from training.config import load_recipe
    from training.model import build_backend

    recipe = load_recipe(REPO / "training" / "recipes" / "tiny-image.yaml", ["model.preset=vq-model-tiny"])
    with pytest.raises(ConfigError, match="codebook and commitment losses"):
        build_backend(recipe)
