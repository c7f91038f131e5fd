"""End-to-end training on the shared real photos: tiny recipe trains, exports, loads; resume is exact."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from evals.heldout_video import REAL_CLIPS
from tests.helpers import worker_in_this_process
from tokenizers_svc import load_tokenizer
from tokenizers_svc.cli import app
from tokenizers_svc.loading import build_module
from tokenizers_svc.media import image_to_tensor, read_image
from tokenizers_svc.registry import get_preset, model_class
from training.train import main

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "training" / "recipes"


@pytest.fixture(autouse=True)
def one_thread():
    """Training runs in-process here; one intra-op thread avoids oversubscribing a busy 2-core box
    (what `accelerate launch` does by default with OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Each run here is a new training process would be: accelerate keeps one AcceleratorState per
    process and refuses a second Accelerator with another mixed precision (the video recipe's bf16
    after the tiny recipes' "no")."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def shared_overrides(recipe: Path, shared_data: Path, out: Path) -> list[str]:
    """Point a recipe's examples/ paths at the shared photos (images/train, images/val) and real
    clips, and its output at tmp: the tests measure training on more than the sample files."""
    raw = yaml.safe_load(recipe.read_text())
    overrides = [f"output_dir={out}"]
    for index, source in enumerate(raw["data"]["sources"]):
        if source["kind"] == "videos":
            overrides.append(f"data.sources.{index}.path={shared_data / 'videos'}")
            overrides.append(f"data.sources.{index}.include=[{','.join(REAL_CLIPS)}]")
        else:
            overrides.append(f"data.sources.{index}.path={shared_data / 'images' / 'train'}")
    return [*overrides, f"validation.path={shared_data / 'images' / 'val'}"]


@pytest.mark.slow
def test_tiny_image_recipe_trains_exports_and_loads(shared_data, tmp_path, monkeypatch):
    out, recipe = tmp_path / "run", RECIPES / "tiny-image.yaml"
    result = CliRunner().invoke(
        app, ["train", "--recipe", str(recipe), *shared_overrides(recipe, shared_data, out)]
    )
    assert result.exit_code == 0, result.output
    export = out / "export"
    card = json.loads((export / "card.json").read_text())
    losses = [loss for _, loss in card["train_loss"]]
    assert losses[-1] < losses[0]
    assert card["metrics"]["final"]["val_psnr"] > card["metrics"]["initial"]["val_psnr"] + 1.0
    terms = card["train_terms_last"]  # means over the last logging window, not sums
    assert terms["loss"] == pytest.approx(terms["rec"] + 1e-6 * terms["kl"], rel=1e-4)
    assert 0 < terms["rec"] < 0.5  # L1 on [-1, 1] pixels after training
    assert card["steps"] == 30 and card["samples_seen"] == 30 * 4
    assert card["data"]["sources"][0]["items"] == len(list((shared_data / "images" / "train").glob("*.jpg")))
    assert card["recipe"]["model"]["preset"] == "sd-vae-tiny"
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step_00000015", "step_00000030"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "tb").rglob("events.out.tfevents*")).parent))
    events.Reload()
    assert {"train/rec", "train/kl", "train/loss", "val/psnr"} <= set(events.Tags()["scalars"])
    assert events.Tags()["images"] == ["val/original_top_reconstruction_bottom"]

    tokenizer = load_tokenizer(export)  # config.json + safetensors + card.json, nothing else
    assert tokenizer.name == "tiny-image"
    from serving.worker import TokenizerWorker  # the server's replica loads the same directory

    with worker_in_this_process(monkeypatch):
        served = TokenizerWorker({"name": "trained", "model": str(export), "allow_random_init": False}, {})
    assert served.describe()["weights_hash"] == tokenizer.weights_hash
    assert tokenizer.spec.normalization.scale == pytest.approx(
        1 / card["metrics"]["final"]["latent_std"], rel=1e-3
    )
    assert card["spec"] == json.loads(json.dumps(tokenizer.spec.to_dict()))  # the exported normalization
    photo = image_to_tensor(read_image(shared_data / "images" / "val" / "board.jpg"))[..., :64, :96]
    latents = tokenizer.encode(photo)
    recon = tokenizer.decode(latents, output_dtype=torch.uint8)
    assert recon.shape == photo.shape
    mse = (recon.float() - photo.float()).pow(2).mean()
    assert 10 * torch.log10(255**2 / mse) > card["metrics"]["initial"]["val_psnr"]


@pytest.mark.slow
def test_resume_from_checkpoint_reproduces_uninterrupted_weights(shared_data, tmp_path):
    """Run A goes 6 steps straight (saving at 3); run B starts from A's step-3 checkpoint with
    dataloader workers. EMA, raw weights and optimizer state must match bit for bit."""
    common = [
        "--recipe",
        str(RECIPES / "tiny-image.yaml"),
        *shared_overrides(RECIPES / "tiny-image.yaml", shared_data, tmp_path),
        "phases.0.steps=6",
        "checkpoint.every=3",
        "checkpoint.keep=5",
        "data.crop_sizes=[32,48]",
        "validation.path=null",
        "logging.tensorboard=false",
        "logging.every=1",
    ]
    assert main([*common, f"output_dir={tmp_path / 'a'}"]) == 0
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a/checkpoints/step_00000003", tmp_path / "b/checkpoints/step_00000003")
    assert main([*common, f"output_dir={tmp_path / 'b'}", "data.num_workers=2", "--resume", "latest"]) == 0
    for name in ["export/diffusion_pytorch_model.safetensors", "checkpoints/step_00000006/model.safetensors"]:
        a, b = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    card_a = json.loads((tmp_path / "a/export/card.json").read_text())
    card_b = json.loads((tmp_path / "b/export/card.json").read_text())
    assert card_b["train_loss"] == card_a["train_loss"]  # history restored with the state
    assert card_b["training"]["resumed_from"].endswith("step_00000003")
    untouched = load_file(tmp_path / "a/checkpoints/step_00000003/model.safetensors")
    assert not all(torch.equal(untouched[k], a[k]) for k in a)  # the 3 resumed steps changed weights


def test_resume_latest_without_checkpoints_starts_fresh_and_bad_recipe_exits_1(shared_data, tmp_path, capsys):
    assert main(["--recipe", str(RECIPES / "tiny-image.yaml"), "data.bogus=1"]) == 1  # errors.EXIT_ERROR
    assert "data.bogus" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-dc-ae", "tiny-vitok", "tiny-video"])
def test_tiny_recipes_train_on_real_data(name, shared_data, tmp_path):
    """DC-AE's three phases, ViTok's two stages (GAN in the last phase of both), joint image+video:
    loss falls, validation PSNR rises above the untrained model's, the export loads."""
    recipe = RECIPES / f"{name}.yaml"
    assert main(["--recipe", str(recipe), *shared_overrides(recipe, shared_data, tmp_path)]) == 0
    card = json.loads((tmp_path / "export" / "card.json").read_text())
    losses = [loss for _, loss in card["train_loss"]]
    assert min(losses[-3:]) < losses[0]
    assert card["metrics"]["final"]["val_psnr"] > card["metrics"]["initial"]["val_psnr"] + 1.0
    assert card["data"]["skipped_total"] == 0
    tokenizer = load_tokenizer(tmp_path / "export")
    assert tokenizer.name == name and tokenizer.spec.family == card["family"]
    assert card["spec"] == json.loads(json.dumps(tokenizer.spec.to_dict()))  # incl. fitted statistics
    if name != "tiny-video":  # the last phase trains against the patch discriminator
        assert {"g_adv", "d_loss", "adaptive_weight"} <= card["train_terms_last"].keys()
    if name == "tiny-video":
        assert [s["kind"] for s in card["data"]["sources"]] == ["videos", "images"]
        assert card["data"]["sources"][0]["items"] == 4  # the real clips only
        fitted = card["metrics"]["final"]["latent_statistics"]
        assert 4 < fitted["items"] <= 4 * 8  # training_clips: up to 8 clips of each real clip, not photos
        assert tokenizer.spec.normalization.mean == pytest.approx(fitted["mean"], rel=1e-6)


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(shared_data, tmp_path):
    """torchrun --nproc_per_node 2 (gloo on CPU) with batch 2 per process vs one process with batch 4:
    same samples, same posterior noise, all-reduced gradients -> same losses and weight updates up to
    float summation order."""
    recipe = RECIPES / "tiny-image.yaml"
    common = [
        "--recipe",
        str(recipe),
        *shared_overrides(recipe, shared_data, tmp_path),
        "phases.0.steps=4",
        "validation.path=null",
        "logging.tensorboard=false",
        "logging.every=1",
        "data.crop_sizes=[32]",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bin_dir = Path(sys.executable).parent
    one = [
        sys.executable,
        "-m",
        "training.train",
        *common,
        f"output_dir={tmp_path / 'one'}",
        "data.batch_size=4",
    ]
    two = [str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "training.train"]
    two += [*common, f"output_dir={tmp_path / 'two'}", "data.batch_size=2"]
    for command in (one, two):
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    card_one = json.loads((tmp_path / "one/export/card.json").read_text())
    card_two = json.loads((tmp_path / "two/export/card.json").read_text())
    assert card_two["training"]["processes"] == 2 and card_one["training"]["processes"] == 1
    assert card_two["samples_seen"] == card_one["samples_seen"] == 16
    for (step_a, loss_a), (step_b, loss_b) in zip(
        card_one["train_loss"], card_two["train_loss"], strict=True
    ):
        assert step_a == step_b and loss_b == pytest.approx(loss_a, rel=1e-5)
    start = build_module(get_preset("sd-vae-tiny"), seed=0).state_dict()
    a = load_file(tmp_path / "one/checkpoints/step_00000004/model.safetensors")
    b = load_file(tmp_path / "two/checkpoints/step_00000004/model.safetensors")
    delta_a = torch.cat([(a[k] - start[k.removeprefix("module.")]).flatten() for k in a])
    delta_b = torch.cat([(b[k] - start[k.removeprefix("module.")]).flatten() for k in a])
    assert delta_a.norm() > 0
    assert (delta_b - delta_a).norm() / delta_a.norm() < 1e-2


@pytest.mark.slow
def test_tiny_fsq_recipe_trains_a_discrete_tokenizer_and_logs_codebook_health(shared_data, tmp_path):
    """FSQ on reconstruction alone: validation PSNR rises, codebook usage and perplexity are logged
    per window and measured on the validation images, and the export encodes to int32 ids. The
    export then trains on (``model.init_from``) from exactly its weights, projections included."""
    recipe = RECIPES / "tiny-fsq.yaml"
    projected = "model.config.quantizer.projection=true"  # as the default: learned 4x4 projections
    assert main(["--recipe", str(recipe), *shared_overrides(recipe, shared_data, tmp_path), projected]) == 0
    card = json.loads((tmp_path / "export" / "card.json").read_text())
    initial, final = card["metrics"]["initial"], card["metrics"]["final"]
    assert final["val_psnr"] > initial["val_psnr"] + 1.0
    terms = card["train_terms_last"]
    assert 0 < terms["codebook_usage"] <= 1 and 1 <= terms["perplexity"] <= 1000
    assert 0 < final["val_codebook_usage"] <= 1 and 1 <= final["val_perplexity"] <= 1000
    tokenizer = load_tokenizer(tmp_path / "export")
    assert card["spec"]["tokens"]["vocabulary_size"] == 1000
    assert card["spec"] == json.loads(json.dumps(tokenizer.spec.to_dict()))
    photo = image_to_tensor(read_image(shared_data / "images" / "val" / "board.jpg"))[..., :64, :96]
    ids = tokenizer.encode(photo, tokens=True)
    assert ids.ids.dtype == torch.int32 and tuple(ids.ids.shape) == (1, 8, 12)
    assert tokenizer.decode(ids, output_dtype=torch.uint8).shape == photo.shape

    # a discrete export trains on from its own weights, quantizer projections included ...
    continued = [
        *shared_overrides(recipe, shared_data, tmp_path / "on"),
        f"model.init_from={tmp_path / 'export'}",
    ]
    assert main(["--recipe", str(recipe), *continued, "phases.0.steps=2"]) == 0
    on_card = json.loads((tmp_path / "on" / "export" / "card.json").read_text())
    assert on_card["metrics"]["initial"]["val_psnr"] == pytest.approx(final["val_psnr"], abs=1e-6)
    # ... and a recipe asking for other levels is refused: that would be another vocabulary
    other = [*continued, "model.config.quantizer.levels=[5,5,5,5]"]
    assert main(["--recipe", str(recipe), *other]) == 1


@pytest.mark.slow
def test_a_video_model_trains_its_temporal_codec_over_a_frozen_image_model(shared_data, tmp_path):
    """cpu-video-dcae.yaml's mechanics at a tiny size: an AutoencoderDCVideo built from a saved image
    DC-AE (model.spatial_init_from), trained on photo clips and real clips with the per-frame latent
    objective (loss.space: frame_latents) on its temporal codec only: the exported spatial path is
    the image model's, bit for bit; the temporal codec moved; the export loads as a video tokenizer."""
    image_dir = tmp_path / "image"
    spatial = get_preset("dc-ae-video-tiny").config["spatial_config"]
    image = model_class("AutoencoderDC")(**spatial)
    image.register_to_config(latents_mean=[0.0, 0.1, -0.1, 0.2], latents_std=[1.0, 2.0, 0.5, 1.5])
    image.save_pretrained(str(image_dir))
    recipe = RECIPES / "cpu-video-dcae.yaml"
    overrides = [
        *shared_overrides(recipe, shared_data, tmp_path / "run"),
        "validation.path=null",
        "model.preset=dc-ae-video-tiny",
        f"model.spatial_init_from={image_dir}",
        "data.sources.0.frames=5",
        "data.sources.1.frames=5",
        "data.crop_sizes=[32]",
        "data.num_workers=0",
        "phases.0.steps=4",
        "optim.warmup_steps=0",
        "checkpoint.every=2",
        "logging.every=2",
    ]
    assert main(["--recipe", str(recipe), *overrides]) == 0
    export = tmp_path / "run" / "export"
    weights = load_file(str(export / "diffusion_pytorch_model.safetensors"))
    for key, value in image.state_dict().items():
        assert torch.equal(weights[f"spatial.{key}"], value), key
    assert weights["temporal_decoder.conv_out.weight"].abs().sum() > 0  # zero at init
    card = json.loads((export / "card.json").read_text())
    assert card["train_terms_last"].keys() >= {"rec", "loss"}
    tokenizer = load_tokenizer(export)
    assert tokenizer.spec.family == "DC-AE-Video" and tokenizer.spec.temporal_compression == 4
    assert tokenizer.spec.normalization.mean == pytest.approx(
        card["metrics"]["final"]["latent_statistics"]["mean"]
    )
