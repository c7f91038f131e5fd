"""The Ray Serve app over real HTTP: every route and body type, batching, the diffusers client. Hostile and
oversized inputs are test_serving_limits.py's.

One app per module (tests/conftest.py's ``base_url``: local Ray, 2 CPUs, 127.0.0.1, random port) of
tests.helpers.SERVING_CONFIG. Served models, all the random-init
``sd-vae-tiny`` preset: ``sd-vae-tiny`` (batching), ``tiny-queue1`` (one request at a time, one
queued: overflow -> 503), ``tiny-timeout`` (a 1 ms timeout: every call -> 504) and
``tiny-bounded`` (one request per model call, an 8 s timeout: abandoned work and admission) and
``tiny-in-ingress`` (served inside the ingress's process); and ``tiny-fsq``, a discrete (FSQ) model
(tests.helpers.save_tiny_fsq).
"""

from __future__ import annotations

import asyncio
import io
import json
import math

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from ray import serve

from tests.helpers import (
    FSQ_DIR,
    FSQ_MODEL,
    HAS_VIDEO,
    IN_INGRESS,
    MODEL,
    SERVING_CONFIG,
    VIDEO_MODEL,
    error_body,
    png,
)
from tokenizers_svc import media
from tokenizers_svc.client import AsyncClient, Client
from tokenizers_svc.latents import latents_from_bytes
from tokenizers_svc.loading import load_tokenizer
from tokenizers_svc.pipeline import EncodeOptions, encode_media, load_media
from tokenizers_svc.tokens import tokens_from_bytes

pytestmark = pytest.mark.slow  # the whole module starts Ray Serve: `make test-fast` skips it


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MODEL, allow_random_init=True)


# ---- info routes ----


def test_health_ready_models_metrics_openapi(http):
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/readyz").json()["status"] == "ready"
    names = [m["served_name"] for m in http.get("/v1/models").json()["models"]]
    assert names == [m["name"] for m in SERVING_CONFIG["models"]]
    info = http.get(f"/v1/models/{MODEL}").json()
    assert (info["spatial_compression"], info["latent_channels"], info["modality"]) == (2, 4, "image")
    assert info["normalization"]["scale"] == pytest.approx(0.18215)
    assert info["scaling_constants"] == {"scaling_factor": pytest.approx(0.18215), "shift_factor": 0.0}
    assert "float32" in info["dtypes"]
    spec = http.get("/openapi.json").json()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            undescribed = [p["name"] for p in operation.get("parameters", []) if not p.get("description")]
            assert not undescribed, f"{method} {path}: {undescribed}"
    tensor_params = spec["paths"]["/v1/models/{model}/encode"]["post"]["parameters"]
    assert {"shape", "dtype"} <= {p["name"] for p in tensor_params}
    assert set(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    encode_body = spec["paths"]["/v1/models/{model}/encode"]["post"]["requestBody"]["content"]
    assert {"image/png", "image/jpeg", "image/webp", "video/mp4", "tensor/binary"} <= set(encode_body)
    decode_body = spec["paths"]["/v1/models/{model}/decode"]["post"]["requestBody"]["content"]
    assert {"application/x-safetensors", "tensor/binary"} <= set(decode_body)
    http.get("/v1/models/not-served")
    metrics = http.get("/metrics").text
    assert 'tokenizers_requests_total{model="",route="/healthz",status="200"}' in metrics
    route = "/v1/models/{model}"
    assert f'tokenizers_requests_total{{model="{MODEL}",route="{route}",status="200"}}' in metrics
    assert f'tokenizers_requests_total{{model="unknown",route="{route}",status="404"}}' in metrics
    assert "not-served" not in metrics  # only served names become label values


def test_openapi_describes_every_query_parameter(http):
    """Each route parameter is declared once (serving/schemas.py) and documented on the OpenAPI page."""
    paths = http.get("/openapi.json").json()["paths"]
    for route in ("encode", "diffusers/encode", "decode"):
        parameters = paths[f"/v1/models/{{model}}/{route}"]["post"]["parameters"]
        queries = {p["name"]: p for p in parameters if p["in"] == "query"}
        assert {"shape", "dtype", "scaling_factor"} <= set(queries)
        assert [name for name, p in queries.items() if not p.get("description")] == []
    encode = {p["name"] for p in paths["/v1/models/{model}/encode"]["post"]["parameters"]}
    assert {"tile_size", "tile_overlap", "chunk_frames", "resize", "stride"} <= encode


# ---- encode bodies ----


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_encode_image_matches_library(http, tokenizer, crops, fmt):
    data = media.encode_image(crops[1], fmt)
    response = http.post(f"/v1/models/{MODEL}/encode", content=data, headers={"content-type": f"image/{fmt}"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-safetensors"
    served = latents_from_bytes(response.content)
    local = encode_media(tokenizer, load_media(data), EncodeOptions())
    assert served.tokenizer == MODEL and served.normalized and served.original_size == (48, 64)
    assert served.source_sha256 == local.source_sha256
    # Same weights (seeded init), same input, same code path; only thread scheduling can differ.
    torch.testing.assert_close(served.latents, local.latents, rtol=0, atol=1e-5)


def test_model_in_the_ingress_serves_like_its_own_deployment(base_url, http, tokenizer, crops):
    """No deployment of its own; same latents as the library, batched, decoded, counted in /metrics,
    and the answer says where its time went (Server-Timing)."""
    deployments = serve.status().applications["tokenizers-test"].deployments
    assert "tokenizer-" + MODEL in deployments and "tokenizer-" + IN_INGRESS not in deployments
    assert IN_INGRESS in http.get("/readyz").json()["models"]
    bodies = [png(c) for c in crops]

    async def concurrent():
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        f"/v1/models/{IN_INGRESS}/encode", content=b, headers={"content-type": "image/png"}
                    )
                    for b in bodies
                )
            )

    responses = asyncio.run(concurrent())
    for response, body in zip(responses, bodies, strict=True):
        assert response.status_code == 200, response.text
        timing = response.headers["server-timing"]
        assert all(f"{part};dur=" in timing for part in ("ingress", "hop", "media", "queue", "model"))
        local = encode_media(tokenizer, load_media(body), EncodeOptions())
        torch.testing.assert_close(
            latents_from_bytes(response.content).latents, local.latents, rtol=1e-4, atol=1e-5
        )
    decoded = http.post(
        f"/v1/models/{IN_INGRESS}/decode",
        content=responses[0].content,
        headers={"content-type": "application/x-safetensors"},
    )
    assert decoded.status_code == 200 and media.decode_image(decoded.content).shape == (48, 64, 3)
    metrics = http.get("/metrics").text
    assert any(
        line.startswith("tokenizers_requests_total")
        and f'model="{IN_INGRESS}"' in line
        and 'status="200"' in line
        for line in metrics.splitlines()
    )
    batches = [
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("tokenizers_batch_size_count")
        and f'model="{IN_INGRESS}"' in line
        and "encode" in line
    ]
    assert batches == [len(bodies)]


def test_encode_options_raw_posterior_resize(http, tokenizer, crops):
    params = {"normalize": "false", "return_posterior": "true", "resize": "shorter-side", "resolution": 32}
    response = http.post(
        f"/v1/models/{MODEL}/encode",
        content=png(crops[2]),
        params=params,
        headers={"content-type": "image/png"},
    )
    assert response.status_code == 200, response.text
    latents = latents_from_bytes(response.content)
    assert not latents.normalized and latents.mean is not None and latents.logvar is not None
    assert latents.resized_from == (48, 64) and min(latents.original_size) == 32
    torch.testing.assert_close(latents.latents, latents.mean)


def test_encode_sample_seed_and_tiling(http, crops):
    def encode(**params):
        response = http.post(
            f"/v1/models/{MODEL}/encode",
            content=png(crops[5]),
            params=params,
            headers={"content-type": "image/png"},
        )
        assert response.status_code == 200, response.text
        return latents_from_bytes(response.content)

    mode = encode()
    first, again, other = (
        encode(sample="true", seed=1),
        encode(sample="true", seed=1),
        encode(sample="true", seed=2),
    )
    assert first.sampled and not mode.sampled
    torch.testing.assert_close(first.latents, again.latents)
    assert not torch.allclose(first.latents, other.latents) and not torch.allclose(
        first.latents, mode.latents
    )
    tiled = encode(tiling="true", tile_size=32, tile_overlap=8)
    assert tiled.latents.shape == mode.latents.shape


def test_encode_tensor_body_and_tensor_output(http, tokenizer, photo_nchw):
    raw = photo_nchw.contiguous().numpy().tobytes()
    response = http.post(
        f"/v1/models/{MODEL}/encode",
        content=raw,
        params={"shape": "1,3,48,64", "dtype": "uint8"},
        headers={"content-type": "tensor/binary", "accept": "tensor/binary"},
    )
    assert response.status_code == 200, response.text
    shape = json.loads(response.headers["shape"])
    assert shape == [1, 4, 24, 32] and response.headers["dtype"] == "float32"
    assert response.headers["normalized"] == "true"
    served = torch.frombuffer(bytearray(response.content), dtype=torch.float32).reshape(shape)
    torch.testing.assert_close(served, tokenizer.encode(photo_nchw).latents, rtol=0, atol=1e-5)
    # float [-1, 1] pixels are accepted as well
    floats = photo_nchw.float() / 127.5 - 1
    response = http.post(
        f"/v1/models/{MODEL}/encode",
        content=floats.numpy().tobytes(),
        params={"shape": "1,3,48,64", "dtype": "float32"},
        headers={"content-type": "tensor/binary"},
    )
    assert response.status_code == 200
    torch.testing.assert_close(latents_from_bytes(response.content).latents, served, rtol=0, atol=1e-4)


def test_encode_video_on_image_model_is_refused(http, crops):
    clip = media.encode_video(np.stack([crops[0]] * 3), fps=8)
    response = http.post(f"/v1/models/{MODEL}/encode", content=clip, headers={"content-type": "video/mp4"})
    assert response.status_code == 422
    assert error_body(response)["param"] == "model"


@pytest.mark.skipif(not HAS_VIDEO, reason=f"{VIDEO_MODEL} preset not registered")
def test_video_mp4_round_trip(http, crops):
    frames = np.stack([c[:32, :32] for c in crops[:5]])  # (5, 32, 32, 3) uint8
    clip = media.encode_video(frames, fps=8)
    response = http.post(
        f"/v1/models/{VIDEO_MODEL}/encode", content=clip, headers={"content-type": "video/mp4"}
    )
    assert response.status_code == 200, response.text
    latents = latents_from_bytes(response.content)
    assert latents.layout == "NCTHW" and latents.original_frames == 5 and latents.fps == pytest.approx(8)
    response = http.post(
        f"/v1/models/{VIDEO_MODEL}/decode",
        content=response.content,
        headers={"content-type": "application/x-safetensors"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "video/mp4"
    video = media.decode_video(response.content)
    assert video.frames.shape == (5, 32, 32, 3) and video.fps == pytest.approx(8)


# ---- decode bodies and outputs ----


@pytest.mark.parametrize(
    ("accept", "fmt"), [("image/png", "PNG"), ("image/jpeg", "JPEG"), ("image/webp", "WEBP")]
)
def test_decode_latent_file_to_images(http, tokenizer, latent_file, accept, fmt):
    response = http.post(
        f"/v1/models/{MODEL}/decode",
        content=latent_file,
        headers={"content-type": "application/x-safetensors", "accept": accept},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == accept
    image = Image.open(io.BytesIO(response.content))
    assert image.format == fmt and image.size == (64, 48)
    if fmt == "PNG":  # lossless: equals the library decode exactly (up to rounding of one ulp)
        local = tokenizer.decode(latents_from_bytes(latent_file), output_dtype=torch.uint8)[0]
        served = torch.from_numpy(np.asarray(image)).permute(2, 0, 1)
        assert (served.int() - local.int()).abs().max() <= 1


def test_decode_tensor_bodies_and_tensor_output(http, tokenizer, latent_file):
    latents = latents_from_bytes(latent_file)
    z = latents.latents  # (1, 4, 24, 32) normalized
    response = http.post(
        f"/v1/models/{MODEL}/decode",
        content=z.numpy().tobytes(),
        params={"shape": "1,4,24,32", "dtype": "float32", "format": "tensor"},
        headers={"content-type": "tensor/binary"},
    )
    assert response.status_code == 200, response.text
    assert json.loads(response.headers["shape"]) == [1, 3, 48, 64] and response.headers["dtype"] == "float32"
    pixels = torch.frombuffer(bytearray(response.content), dtype=torch.float32).reshape(1, 3, 48, 64)
    torch.testing.assert_close(pixels, tokenizer.decode(z, normalized=True), rtol=0, atol=1e-5)
    # latent file -> tensor via Accept; raw (normalized=false) tensor -> png by default
    response = http.post(
        f"/v1/models/{MODEL}/decode", content=latent_file, headers={"accept": "tensor/binary"}
    )
    assert response.status_code == 200 and json.loads(response.headers["shape"]) == [1, 3, 48, 64]
    raw = latents.raw().to(torch.bfloat16)
    response = http.post(
        f"/v1/models/{MODEL}/decode",
        content=raw.view(torch.int16).numpy().tobytes(),
        params={"shape": "1,4,24,32", "dtype": "bfloat16", "normalized": "false"},
        headers={"content-type": "tensor/binary"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"


# ---- batching ----


def test_batched_equals_unbatched(base_url, http, crops):
    """Eight concurrent same-shape requests are batched; each result equals its sequential one."""
    bodies = [png(c) for c in crops]
    sequential = []
    for body in bodies:
        response = http.post(
            f"/v1/models/{MODEL}/encode", content=body, headers={"content-type": "image/png"}
        )
        sequential.append(latents_from_bytes(response.content))

    def batch_counts() -> tuple[float, float]:
        text = http.get("/metrics").text
        count = le1 = 0.0
        for line in text.splitlines():
            if line.startswith("tokenizers_batch_size_count") and f'model="{MODEL}",op="encode"' in line:
                count = float(line.split()[-1])
            if (
                line.startswith("tokenizers_batch_size_bucket")
                and 'le="1.0"' in line
                and 'op="encode"' in line
            ) and f'model="{MODEL}"' in line:
                le1 = float(line.split()[-1])
        return count, le1

    count_before, singles_before = batch_counts()

    async def concurrent():
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        f"/v1/models/{MODEL}/encode", content=b, headers={"content-type": "image/png"}
                    )
                    for b in bodies
                )
            )

    responses = asyncio.run(concurrent())
    count_after, singles_after = batch_counts()
    assert count_after - count_before == len(bodies)
    assert singles_after - singles_before < len(bodies), "no request shared a batch"
    for response, expected in zip(responses, sequential, strict=True):
        assert response.status_code == 200
        served = latents_from_bytes(response.content)
        assert served.source_sha256 == expected.source_sha256
        # Batched convolutions may pick other CPU kernels: same math, float32 rounding differences only.
        torch.testing.assert_close(served.latents, expected.latents, rtol=1e-4, atol=1e-5)


def test_batched_decode_equals_unbatched(base_url, http, crops):
    files = [
        http.post(f"/v1/models/{MODEL}/encode", content=png(c), headers={"content-type": "image/png"}).content
        for c in crops
    ]
    headers = {"content-type": "application/x-safetensors", "accept": "tensor/binary"}

    def pixels(response: httpx.Response) -> torch.Tensor:
        assert response.status_code == 200, response.text
        return torch.frombuffer(bytearray(response.content), dtype=torch.float32).reshape(1, 3, 48, 64)

    sequential = [pixels(http.post(f"/v1/models/{MODEL}/decode", content=f, headers=headers)) for f in files]

    async def concurrent():
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
            return await asyncio.gather(
                *(client.post(f"/v1/models/{MODEL}/decode", content=f, headers=headers) for f in files)
            )

    for response, expected in zip(asyncio.run(concurrent()), sequential, strict=True):
        # float32 rounding differences of batched kernels only (see the encode test)
        torch.testing.assert_close(pixels(response), expected, rtol=1e-4, atol=1e-5)


def test_bad_request_does_not_fail_its_batch(base_url, photo_nchw, tokenizer):
    """Same shape/dtype/options, so the NaN request is stacked with good ones; only it fails."""
    good = photo_nchw.float() / 127.5 - 1  # (1, 3, 48, 64) float [-1, 1]
    bad = torch.full_like(good, math.nan)
    params = {"shape": "1,3,48,64", "dtype": "float32"}

    async def send():
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        f"/v1/models/{MODEL}/encode",
                        content=t.numpy().tobytes(),
                        params=params,
                        headers={"content-type": "tensor/binary"},
                    )
                    for t in (good, bad, good, good, bad, good)
                )
            )

    statuses = [r.status_code for r in asyncio.run(send())]
    assert statuses == [200, 422, 200, 200, 422, 200]


def test_concurrent_clients_sync_and_async(base_url, tokenizer, crops):
    async def many():
        async with AsyncClient(base_url) as client:
            encoded = await asyncio.gather(*(client.encode(MODEL, c) for c in crops * 2))
            decoded = await asyncio.gather(*(client.decode(MODEL, z) for z in encoded[:4]))
            return encoded, decoded

    encoded, decoded = asyncio.run(many())
    assert len(encoded) == 16 and all(z.original_size == (48, 64) for z in encoded)
    assert all(Image.open(io.BytesIO(d)).size == (64, 48) for d in decoded)
    with Client(base_url) as client:
        latents = client.encode(MODEL, crops[0])
        torch.testing.assert_close(latents.latents, encoded[0].latents, rtol=1e-4, atol=1e-5)
        pixels = client.decode_tensor(MODEL, latents)
        assert pixels.shape == (1, 3, 48, 64) and pixels.dtype == torch.float32
        assert client.model(MODEL)["latent_channels"] == 4


# ---- the diffusers remote-VAE client ----


def test_diffusers_remote_decode_and_encode(base_url, tokenizer, crops):
    from diffusers.utils.remote_utils import remote_decode, remote_encode

    endpoint = f"{base_url}/v1/models/{MODEL}/decode"
    image = Image.fromarray(crops[4])
    raw = remote_encode(endpoint=f"{base_url}/v1/models/{MODEL}/diffusers/encode", image=image)
    expected = tokenizer.encode(media.image_to_tensor(crops[4]), normalize=False).latents
    torch.testing.assert_close(raw, expected, rtol=0, atol=1e-5)
    scaled = remote_encode(
        endpoint=f"{base_url}/v1/models/{MODEL}/diffusers/encode",
        image=image,
        scaling_factor=0.5,
        shift_factor=0.1,
    )
    torch.testing.assert_close(scaled, (expected - 0.1) * 0.5, rtol=0, atol=1e-5)
    # contiguous: remote_encode serializes a temporary .contiguous() copy it does not keep alive, so a
    # non-contiguous tensor would be sent as freed memory (a client-side quirk of diffusers 0.42).
    pixels = (torch.from_numpy(crops[4]).permute(2, 0, 1)[None].float() / 127.5 - 1).contiguous()
    from_tensor = remote_encode(endpoint=f"{base_url}/v1/models/{MODEL}/diffusers/encode", image=pixels)
    torch.testing.assert_close(from_tensor, expected, rtol=0, atol=1e-4)

    latent = scaled.to(torch.float16)
    jpg = remote_decode(endpoint=endpoint, tensor=latent, scaling_factor=0.5, shift_factor=0.1)
    assert jpg.format == "jpeg" and jpg.size == (64, 48)
    png = remote_decode(
        endpoint=endpoint, tensor=latent, scaling_factor=0.5, shift_factor=0.1, image_format="png"
    )
    assert png.format == "png"
    uint8 = remote_decode(
        endpoint=endpoint,
        tensor=latent,
        scaling_factor=0.5,
        shift_factor=0.1,
        output_type="pt",
        partial_postprocess=True,
        return_type="pt",
    )
    assert uint8.dtype == torch.uint8 and uint8.shape == (1, 48, 64, 3)
    floats = remote_decode(
        endpoint=endpoint,
        tensor=latent,
        scaling_factor=0.5,
        shift_factor=0.1,
        output_type="pt",
        return_type="pt",
    )
    assert floats.dtype == torch.float16 and floats.shape == (1, 3, 48, 64)
    local = tokenizer.decode(latent.float() / 0.5 + 0.1, normalized=False)
    torch.testing.assert_close(floats.float(), local, rtol=0, atol=2e-2)  # float16 transport + float16 input
    assert (np.asarray(png).astype(int) - uint8[0].numpy().astype(int)).__abs__().max() <= 1
    # FLUX-style packed latents (N, h/2*w/2, 4C) with height/width are unpacked by the server
    packed = latent.view(1, 4, 12, 2, 16, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, 12 * 16, 16)
    unpacked = remote_decode(
        endpoint=endpoint,
        tensor=packed.contiguous(),
        scaling_factor=0.5,
        shift_factor=0.1,
        output_type="pt",
        return_type="pt",
        height=48,
        width=64,
    )
    torch.testing.assert_close(unpacked, floats)


# ---- discrete tokens ----


def test_token_ids_round_trip_over_http(http, base_url, crops):
    """encode?tokens=true answers with the token file or bare int32 ids; decode takes either back;
    the ids are the library's, and the same limits and error shape apply as for latents."""
    local = load_tokenizer(FSQ_DIR)
    info = http.get(f"/v1/models/{FSQ_MODEL}").json()
    assert info["tokens"]["vocabulary_size"] == 1000 and info["tokens"]["id_dtype"] == "int32"
    data = png(crops[1])
    response = http.post(
        f"/v1/models/{FSQ_MODEL}/encode",
        content=data,
        params={"tokens": "true"},
        headers={"content-type": "image/png"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-safetensors"
    served = tokens_from_bytes(response.content)
    expected = encode_media(local, load_media(data), EncodeOptions(tokens=True))
    assert served.ids.dtype == torch.int32 and tuple(served.ids.shape) == (1, 6, 8)  # 48x64 at f8
    assert torch.equal(served.ids, expected.ids) and served.original_size == (48, 64)
    bare = http.post(
        f"/v1/models/{FSQ_MODEL}/encode",
        content=data,
        params={"tokens": "true"},
        headers={"content-type": "image/png", "accept": "tensor/binary"},
    )
    assert bare.status_code == 200 and bare.headers["dtype"] == "int32"
    assert json.loads(bare.headers["shape"]) == [1, 6, 8] and bare.headers["vocabulary-size"] == "1000"
    ids = torch.frombuffer(bytearray(bare.content), dtype=torch.int32).reshape(1, 6, 8)
    assert torch.equal(ids, served.ids)
    with Client(base_url) as client:  # the Python client: TokenIds out, TokenIds and int32 ids in
        via_client = client.encode(FSQ_MODEL, data, tokens=True)
        assert torch.equal(via_client.ids, served.ids)
        pixels_from_ids = client.decode_tensor(FSQ_MODEL, ids)
        assert tuple(pixels_from_ids.shape) == (1, 3, 48, 64)
        assert tuple(client.decode_tensor(FSQ_MODEL, via_client).shape) == (1, 3, 48, 64)
    decoded = http.post(
        f"/v1/models/{FSQ_MODEL}/decode",
        content=response.content,
        headers={"content-type": "application/x-safetensors", "accept": "image/png"},
    )
    assert decoded.status_code == 200, decoded.text
    pixels = media.image_to_tensor(media.decode_image(decoded.content))
    want = local.decode(served, output_dtype=torch.uint8)
    assert pixels.shape == want.shape and int((pixels.int() - want.int()).abs().max()) <= 1
    as_tensor = http.post(
        f"/v1/models/{FSQ_MODEL}/decode",
        content=bare.content,
        params={"shape": "1,6,8", "dtype": "int32", "format": "tensor"},
        headers={"content-type": "tensor/binary"},
    )
    assert as_tensor.status_code == 200, as_tensor.text
    assert json.loads(as_tensor.headers["shape"]) == [1, 3, 48, 64]
    out_of_range = (served.ids + 1000).numpy().tobytes()
    bad = http.post(
        f"/v1/models/{FSQ_MODEL}/decode",
        content=out_of_range,
        params={"shape": "1,6,8", "dtype": "int32", "format": "tensor"},
        headers={"content-type": "tensor/binary"},
    )
    assert bad.status_code == 422 and error_body(bad)["param"] == "ids"
    wrong_model = http.post(
        f"/v1/models/{MODEL}/decode",
        content=response.content,
        headers={"content-type": "application/x-safetensors"},
    )
    assert wrong_model.status_code == 422 and error_body(wrong_model)["param"] in ("tokenizer", "model")
    continuous = http.post(
        f"/v1/models/{MODEL}/encode",
        content=data,
        params={"tokens": "true"},
        headers={"content-type": "image/png"},
    )
    assert continuous.status_code == 422 and error_body(continuous)["param"] == "tokens"
    too_many = http.post(
        f"/v1/models/{FSQ_MODEL}/decode",
        content=b"\0" * 4 * 225_000,
        params={"shape": "1,250,900", "dtype": "int32", "format": "tensor"},
        headers={"content-type": "tensor/binary"},
    )
    assert too_many.status_code == 413 and error_body(too_many)["param"] == "shape"
