"""Train a tokenizer from a recipe with Hugging Face Accelerate.

    accelerate launch -m training.train --recipe training/recipes/NAME.yaml [key=value ...] [--resume latest]
    tokenizers-svc train --recipe training/recipes/NAME.yaml [key=value ...]

The same script runs on one CPU, several processes (torchrun / accelerate launch) or GPUs. Reading
order: :func:`main` -> :class:`Trainer` (build, loop, checkpoint, validate, export). Everything a
run writes lives in the recipe's ``output_dir``: ``checkpoints/step_XXXXXXXX`` (accelerator state,
newest ``checkpoint.keep`` kept), ``tb/`` (TensorBoard), ``export/`` (``save_pretrained`` weights +
``card.json``) which ``tokenizers_svc.load_tokenizer(dir)``, the server and the batch job load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from torch import nn

from tokenizers_svc.errors import EXIT_OK, ConfigError, TokenizerError, print_error
from tokenizers_svc.loading import CARD_FILE
from tokenizers_svc.metrics import codebook_health, id_counts, psnr, ssim
from tokenizers_svc.pixels import to_float_pixels, to_uint8_pixels
from tokenizers_svc.progress import Progress
from tokenizers_svc.spec import TokenizerSpec
from training import losses
from training.card import RunFacts, flat_config, training_card
from training.checkpointing import (
    RECIPE_FILE,
    TrainState,
    checkpoint_dir,
    latest_checkpoint,
    prune_checkpoints,
    recipe_differences,
)
from training.config import Recipe, load_recipe
from training.data import BatchPlan, build_sources, load_validation, make_loader
from training.discriminator import PatchDiscriminator, PatchDiscriminatorConfig
from training.ema import Ema
from training.latent_stats import fit_export, training_clips
from training.model import Autoencoder, build_backend, last_layer_name, phase_parameters
from training.schedule import lr_at


def cpu_threads(recipe_threads: int | None, environ) -> tuple[int | None, str | None]:
    """torch's intra-op threads for a CPU run, and a note saying where the number came from.

    The command line wins over the recipe: ``accelerate launch --num_cpu_threads_per_process N``
    (which exports ``OMP_NUM_THREADS=N``; without the flag accelerate exports its own default) or an
    ``OMP_NUM_THREADS`` the user set. The recipe's ``cpu_threads`` applies only when neither is set,
    e.g. ``python -m training.train`` in a plain shell. -> (threads to set or None, note or None).
    """
    launcher = environ.get("OMP_NUM_THREADS")
    if recipe_threads is None:
        return None, None
    if launcher is None:
        return recipe_threads, f"{recipe_threads} CPU threads: the recipe's cpu_threads"
    if launcher.strip() == str(recipe_threads):
        return None, None
    return None, (
        f"{launcher} CPU threads from OMP_NUM_THREADS (--num_cpu_threads_per_process or the environment) "
        f"win over the recipe's cpu_threads: {recipe_threads}"
    )


class Trainer:
    """One training run, read top to bottom: build (``__init__``), loop (:meth:`fit`: micro steps,
    optimizer steps, logging, validation, checkpoints), export. The parts are components:
    :mod:`training.model`, :mod:`training.ema`, :mod:`training.schedule`, :mod:`training.checkpointing`,
    :mod:`training.card`, :mod:`training.losses`, :mod:`training.data`."""

    def __init__(self, recipe: Recipe, resume: str | None = None, force: bool = False) -> None:
        """``resume``: ``latest`` or a checkpoint directory; one made with a different recipe is
        refused (naming the keys) unless ``force``."""
        self.recipe = recipe
        self.run_dir = recipe.run_dir
        threads, threads_note = cpu_threads(recipe.cpu_threads, os.environ)
        if threads is not None and not torch.cuda.is_available():
            torch.set_num_threads(threads)
        self.accelerator = Accelerator(
            # without CUDA, several processes (torchrun / accelerate launch) train on CPU over gloo;
            # accelerate only sets that up when told the run is a CPU run
            cpu=not torch.cuda.is_available(),
            mixed_precision=recipe.mixed_precision,
            log_with="tensorboard" if recipe.logging.tensorboard else None,
            project_config=ProjectConfiguration(
                project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "tb")
            ),
            step_scheduler_with_optimizer=False,
        )
        set_seed(recipe.seed)
        acc = self.accelerator
        self.progress: Progress | None = None  # the step counter, while fit() runs
        self.say(
            f"train {recipe.name}: building {recipe.model.preset}, reading the data, {recipe.total_steps} "
            f"steps on {acc.device}"
            + (f" ({threads_note})" if threads_note and acc.device.type == "cpu" else "")
        )
        self.backend = build_backend(recipe)
        self.spec = self.backend.spec
        self._check_sizes()
        self.sources = build_sources(recipe)
        self.val_images = load_validation(recipe)
        self.perceptual = (
            losses.Perceptual(recipe.loss.perceptual_net).to(acc.device)
            if recipe.loss.perceptual == "lpips"
            else None
        )
        module = self.backend.module
        self.optimizers = [
            torch.optim.AdamW(
                phase_parameters(module, phase),
                lr=phase.lr or recipe.optim.lr,
                betas=recipe.optim.betas,
                weight_decay=recipe.optim.weight_decay,
            )
            for phase in recipe.phases
        ]
        self.model = Autoencoder(self.backend, acc.process_index, acc.num_processes)
        self.model, *self.optimizers = acc.prepare(self.model, *self.optimizers)
        self.gan = recipe.loss.gan
        self.discriminator = self.disc_optimizer = None
        if self.gan is not None:
            config = PatchDiscriminatorConfig(channels=self.gan.disc_channels, layers=self.gan.disc_layers)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(recipe.seed + 1)
                disc = PatchDiscriminator(config)
            disc_opt = torch.optim.AdamW(disc.parameters(), lr=self.gan.disc_lr, betas=(0.5, 0.9))
            self.discriminator, self.disc_optimizer = acc.prepare(disc, disc_opt)
            self.last_layer = dict(module.named_parameters())[last_layer_name(module, self.gan.last_layer)]
        self.ema = Ema(module, recipe.ema.decay, recipe.ema.warmup) if recipe.ema.decay > 0 else None
        self.state = TrainState()
        acc.register_for_checkpointing(self.state)
        if self.ema is not None:
            acc.register_for_checkpointing(self.ema)
        if recipe.logging.tensorboard:
            acc.init_trackers("tb", config=flat_config(recipe))
        self.resumed_from = self._resume(resume, force) if resume else None
        self.replaces = self._previous_export()
        # token-id counts of the current logging window (quantized models): codebook usage, perplexity
        vocabulary = self.spec.quantizer.vocabulary_size if self.spec.quantizer is not None else 0
        self.window_counts = torch.zeros(vocabulary, dtype=torch.int64)

    def say(self, message: str) -> None:
        """One line on stderr from the main process, below the progress bar when there is one."""
        if not self.accelerator.is_main_process:
            return
        if self.progress is not None:
            self.progress.write(message)
        else:
            print(message, file=sys.stderr, flush=True)

    # ----------------------------------------------------------------------------------- setup checks

    def _check_sizes(self) -> None:
        multiple = self.spec.multiple
        sizes = {s for phase in self.recipe.phases for s in (phase.crop_sizes or self.recipe.data.crop_sizes)}
        if self.recipe.validation.path:
            sizes.add(self.recipe.validation.resolution)
        bad = sorted(s for s in sizes if s % multiple)
        if bad:
            raise ConfigError(
                f"{self.spec.name} needs sizes that are multiples of {multiple}; crop/validation sizes {bad} are not",
                param="data.crop_sizes",
            )

    def _resume(self, which: str, force: bool) -> Path | None:
        path = latest_checkpoint(self.run_dir) if which == "latest" else Path(which)
        if path is None:
            self.accelerator.print(f"no checkpoint in {self.run_dir / 'checkpoints'}; starting from step 0")
            return None
        if not path.is_dir():
            raise ConfigError(f"checkpoint {str(path)!r} does not exist", param="resume")
        self._check_checkpoint_recipe(path, force)
        self.accelerator.load_state(str(path))
        self.accelerator.print(f"resumed from {path} at step {self.state.step}")
        return path

    def _check_checkpoint_recipe(self, path: Path, force: bool) -> None:
        """Refuse to continue a checkpoint made by another recipe (its steps, learning rate, data...
        would silently mix with this one's) unless ``force``; then say what differs."""
        saved_file = path / RECIPE_FILE
        if not saved_file.is_file():
            self.say(f"warning: {path} has no {RECIPE_FILE} (an older checkpoint): its recipe is not checked")
            return
        differences = recipe_differences(
            json.loads(saved_file.read_text()), self.recipe.model_dump(mode="json")
        )
        if not differences:
            return
        listed = "; ".join(differences)
        if not force:
            raise ConfigError(
                f"checkpoint {path} was made with a different recipe ({listed}); resume with the same "
                "recipe and overrides, or pass --force to continue it with this one",
                param="resume",
            )
        self.say(f"warning: --force: continuing {path} with a different recipe ({listed})")

    def _previous_export(self) -> int | None:
        """The step of an export this run will replace when it finishes (said now, not silently)."""
        card = self.run_dir / "export" / CARD_FILE
        if not card.is_file():
            return None
        steps = json.loads(card.read_text()).get("steps")
        self.say(
            f"note: {card.parent} holds the export of step {steps}; this run replaces it when it finishes"
        )
        return steps

    # ----------------------------------------------------------------------------------- loop

    def fit(self) -> Path:
        recipe, acc, state = self.recipe, self.accelerator, self.state
        if state.step == 0 and not state.initial_metrics:
            state.initial_metrics = self.validate()
        accum = recipe.optim.grad_accum
        plan = BatchPlan(
            seed=recipe.seed,
            rank=acc.process_index,
            world_size=acc.num_processes,
            grad_accum=accum,
            start_micro_step=state.step * accum,
        )
        loader = make_loader(recipe, self.sources, self.spec, plan)
        # a bar on a terminal, whole lines every 10 s in a log (tokenizers_svc.progress)
        bar = self.progress = Progress(
            "train", recipe.total_steps, "step", initial=state.step, quiet=not acc.is_main_process
        )
        window_samples, window_start = 0, time.perf_counter()
        terms: dict[str, float] = {}  # loss terms summed over the steps of the logging window
        window_steps, micro = 0, 0
        for batch in loader:
            x = to_float_pixels(batch["pixels"].to(acc.device))  # (B, 3, [T,] S, S) in [-1, 1]
            for name in batch["skipped"]:
                state.skipped[name] = state.skipped.get(name, 0) + 1
            micro += 1
            sync = micro % accum == 0
            for key, value in self.micro_step(x, sync, accum).items():
                terms[key] = terms.get(key, 0.0) + value / accum
            window_samples += x.shape[0] * acc.num_processes
            state.samples += x.shape[0] * acc.num_processes
            if not sync:
                continue
            self.optimizer_step()
            state.step += 1
            window_steps += 1
            if state.step % recipe.logging.every == 0 or state.step == recipe.total_steps:
                elapsed = time.perf_counter() - window_start
                logs = {
                    k: float(acc.reduce(torch.tensor(v / window_steps, device=acc.device), "mean"))
                    for k, v in terms.items()
                }
                logs |= {
                    "lr": lr_at(recipe, state.step - 1),
                    "samples_per_s": window_samples / max(elapsed, 1e-9),
                }
                if self.spec.quantizer is not None:  # the window's tokens, over every process
                    logs |= codebook_health(acc.reduce(self.window_counts.to(acc.device), "sum").cpu())
                    self.window_counts.zero_()
                acc.log({f"train/{k}": v for k, v in logs.items()}, step=state.step)
                state.loss_history.append((state.step, logs["loss"]))
                state.last_terms = logs
                bar.set_postfix(loss=f"{logs['loss']:.4f}", samples_s=f"{logs['samples_per_s']:.2f}")
                state.wall_s += elapsed
                window_samples, window_steps, window_start, terms = 0, 0, time.perf_counter(), {}
            bar.update(1)
            if state.step % recipe.validation.every == 0 and state.step < recipe.total_steps:
                self.validate()
            if state.step % recipe.logging.image_every == 0:
                self.log_images()
            if state.step % recipe.checkpoint.every == 0 and state.step < recipe.total_steps:
                self.save_checkpoint()
        bar.close()
        self.progress = None
        state.metrics = self.validate()
        self.log_images()
        self.save_checkpoint()
        export = self.export()
        acc.end_training()
        return export

    def micro_step(self, x: torch.Tensor, sync: bool, accum: int) -> dict[str, float]:
        """Forward + backward of one micro-batch; gradients are all-reduced only on ``sync``."""
        recipe, acc, loss_cfg = self.recipe, self.accelerator, self.recipe.loss
        step = self.state.step
        _, phase, _ = recipe.phase_at(step)
        gan_on = phase.gan and self.gan is not None and step >= self.gan.start_step
        models = [self.model] + ([self.discriminator] if self.discriminator is not None else [])
        contexts = [nullcontext() if sync else acc.no_sync(m) for m in models]
        with contexts[0]:
            if loss_cfg.space == "frame_latents":
                prediction, target, _, _ = self.model(x, frame_latents=True)  # (B, c, T, h, w) each
                rec = torch.nn.functional.mse_loss(prediction.float(), target.float())
                terms = {"rec": rec, "loss": rec}
                acc.backward(rec / accum)
                return {k: float(v.detach()) for k, v in terms.items()}
            recon, mean, logvar, ids = self.model(x)
            if ids is not None:
                self.window_counts += id_counts(ids, self.spec.quantizer.vocabulary_size)
            recon = recon.float()
            rec = losses.reconstruction_loss(x, recon, loss_cfg.reconstruction)
            total = loss_cfg.reconstruction_weight * rec
            terms = {"rec": rec}
            if logvar is not None and loss_cfg.kl_weight > 0:
                terms["kl"] = losses.kl_loss(mean.float(), logvar.float())
                total = total + loss_cfg.kl_weight * terms["kl"]
            if self.perceptual is not None and loss_cfg.perceptual_weight > 0:
                terms["perceptual"] = self.perceptual(x, recon)
                total = total + loss_cfg.perceptual_weight * terms["perceptual"]
            if loss_cfg.ssim_weight > 0:
                terms["ssim"] = losses.ssim(x, recon)
                total = total + loss_cfg.ssim_weight * (1 - terms["ssim"])
            if gan_on:
                disc = acc.unwrap_model(self.discriminator)  # G step: D is a frozen critic here
                disc.requires_grad_(False)
                with acc.autocast():
                    g_loss = losses.hinge_g_loss(disc(recon).float())
                disc.requires_grad_(True)
                nll = total
                weight = (
                    losses.adaptive_weight(nll, g_loss, self.last_layer, self.gan.max_adaptive_weight)
                    if self.gan.adaptive
                    else torch.tensor(1.0, device=x.device)
                )
                terms |= {"g_adv": g_loss, "adaptive_weight": weight}
                total = total + self.gan.weight * weight * g_loss
            terms["loss"] = total
            acc.backward(total / accum)
        if gan_on:
            with contexts[1]:
                logits = self.discriminator(torch.cat([x, recon.detach()])).float()  # one DDP forward
                logits_real, logits_fake = logits.chunk(2)
                d_loss = losses.hinge_d_loss(logits_real, logits_fake)
                acc.backward(d_loss / accum)
            terms |= {"d_loss": d_loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        return {k: float(v.detach()) for k, v in terms.items()}

    def optimizer_step(self) -> None:
        recipe, acc = self.recipe, self.accelerator
        index, _, _ = recipe.phase_at(self.state.step)
        optimizer = self.optimizers[index]
        lr = lr_at(recipe, self.state.step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if recipe.optim.grad_clip is not None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            acc.clip_grad_norm_(params, recipe.optim.grad_clip)
        optimizer.step()
        self.model.zero_grad(set_to_none=True)  # frozen parameters' gradients too
        if self.discriminator is not None:
            if any(p.grad is not None for p in self.discriminator.parameters()):
                self.disc_optimizer.step()
            self.discriminator.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(acc.unwrap_model(self.model).module)

    # ----------------------------------------------------------------------------------- validation

    def export_module(self) -> nn.Module:
        return self.ema.shadow if self.ema is not None else self.accelerator.unwrap_model(self.model).module

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 (N, 3, H, W) -> (uint8 reconstruction with the exported weights (posterior mean;
        rounded codes for a quantized model), per-id counts (V,) of its tokens or None)."""
        module = self.export_module()
        backend = type(self.backend).from_module(module, self.backend.spec.name)
        quantizer = backend.quantizer
        counts = None if quantizer is None else torch.zeros(quantizer.spec.vocabulary_size, dtype=torch.int64)
        was_training = module.training
        module.eval()
        out = []
        for x in self._val_pixels(images):
            mean, _ = backend.encode_moments(x)
            if quantizer is not None:
                mean, codes = quantizer(mean)
                counts += id_counts(quantizer.codes_to_ids(codes), len(counts))
            recon = backend.decode_latents(mean).float()
            if recon.ndim == 5:
                recon = recon[:, :, 0]
            out.append(to_uint8_pixels(recon).cpu())
        module.train(was_training)
        return torch.cat(out), counts

    def validate(self) -> dict:
        """PSNR/SSIM (tokenizers_svc.metrics, uint8) of the exported weights on the held-out images;
        codebook usage and perplexity of their tokens for a quantized model."""
        if self.val_images is None or not self.accelerator.is_main_process:
            return {}
        recon, counts = self.reconstruct(self.val_images)
        metrics = {
            "val_psnr": float(psnr(self.val_images, recon).mean()),
            "val_ssim": float(ssim(self.val_images, recon).mean()),
            "val_images": len(self.val_images),
            "step": self.state.step,
        }
        codebook = "" if counts is None else codebook_health(counts)
        if codebook:
            metrics |= {f"val_{key}": value for key, value in codebook.items()}
            codebook = (
                f", codebook usage {codebook['codebook_usage']:.3f}, perplexity {codebook['perplexity']:.1f}"
            )
        self.accelerator.log(
            {
                f"val/{k.removeprefix('val_')}": v
                for k, v in metrics.items()
                if k.startswith("val_") and k != "val_images"
            },
            step=self.state.step,
        )
        self.say(
            f"step {self.state.step}: val PSNR {metrics['val_psnr']:.2f} dB, SSIM {metrics['val_ssim']:.4f}{codebook}"
        )
        return metrics

    def log_images(self) -> None:
        if (
            self.val_images is None
            or not self.accelerator.is_main_process
            or not self.recipe.logging.tensorboard
        ):
            return
        originals = self.val_images[:4]
        recon, _ = self.reconstruct(originals)
        grid = torch.cat(
            [torch.cat(list(originals), dim=2), torch.cat(list(recon), dim=2)], dim=1
        )  # (3, 2H, 4W)
        writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
        writer.add_image("val/original_top_reconstruction_bottom", grid, self.state.step)

    # ----------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        directory = checkpoint_dir(self.run_dir, self.state.step)
        acc.wait_for_everyone()
        acc.save_state(str(directory))
        acc.wait_for_everyone()
        if acc.is_main_process:
            recipe = json.dumps(self.recipe.model_dump(mode="json"), indent=2)
            (directory / RECIPE_FILE).write_text(recipe + "\n")
            prune_checkpoints(self.run_dir, self.recipe.checkpoint.keep)
        return directory

    def export(self) -> Path:
        """``save_pretrained`` of the exported weights + card.json into ``output_dir/export``."""
        acc = self.accelerator
        directory = self.run_dir / "export"
        if acc.is_main_process:
            if directory.exists():
                shutil.rmtree(directory)
            self.fit_scaling_factor()
            self.export_module().save_pretrained(str(directory))
            if self.recipe.model.latent_statistics == "per_channel":
                photos = [Path(s.section.path) for s in self.sources if s.kind == "images"]
                videos = [s for s in self.sources if s.kind == "videos"]
                clips = None
                if videos and self.spec.modality == "video":  # the first video source's training part
                    clips = training_clips(videos[0].files, videos[0].section.segment)
                self.state.metrics["latent_statistics"] = fit_export(
                    directory, photos, str(acc.device), clips=clips
                )
            saved = json.loads((directory / "config.json").read_text())  # with the normalization just fitted
            spec = type(self.backend).described_spec(saved, self.spec.name, directory)
            (directory / CARD_FILE).write_text(json.dumps(self.card(spec), indent=2) + "\n")
        acc.wait_for_everyone()
        return directory

    @torch.no_grad()
    def fit_scaling_factor(self) -> None:
        """Write ``scaling_factor = 1 / std(raw latents)`` on the validation images into the exported
        config (models whose config has one, e.g. AutoencoderKL), so normalized latents have unit std."""
        module = self.export_module()
        if not self.recipe.model.fit_scaling_factor or self.val_images is None:
            return
        if "scaling_factor" not in module.config:
            return
        backend = type(self.backend).from_module(module, self.spec.name)
        latents = [backend.encode_moments(x)[0] for x in self._val_pixels(self.val_images)]
        if backend.quantizer is not None:  # a quantized model's latents are its projected codes
            latents = [backend.quantizer(z)[0] for z in latents]
        std = float(torch.cat([z.flatten() for z in latents]).float().std())
        module.register_to_config(scaling_factor=round(1.0 / std, 5))
        self.state.metrics["latent_std"] = std

    def _val_pixels(self, images: torch.Tensor):
        """uint8 images -> model input batches: float [-1, 1], (n, 3, H, W) or (n, 3, T, H, W)."""
        for chunk in images.split(self.recipe.validation.batch_size):
            x = to_float_pixels(chunk.to(self.accelerator.device))
            if self.spec.modality != "image":
                x = x.unsqueeze(2).expand(-1, -1, self.spec.frame_rule.padded_frames(1), -1, -1)
            yield x  # a video model sees each image as a one-frame clip

    def card(self, spec: TokenizerSpec) -> dict:
        """The training card of the exported model (``spec``: read back from the export)."""
        facts = RunFacts(
            spec=spec,
            exported=self.export_module(),
            ema=self.ema is not None,
            sources=self.sources,
            validation_images=0 if self.val_images is None else len(self.val_images),
            processes=self.accelerator.num_processes,
            device=str(self.accelerator.device),
            resumed_from=self.resumed_from,
        )
        return training_card(self.recipe, self.state, facts)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="training.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", required=True, help="recipe YAML (training/recipes/*.yaml)")
    parser.add_argument(
        "--resume", default=None, help="'latest' (newest checkpoint of this run) or a checkpoint dir"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="resume even when the checkpoint was made with a different recipe (the differences are printed)",
    )
    parser.add_argument("overrides", nargs="*", help="dotted.key=value recipe overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        trainer = Trainer(recipe, resume=args.resume, force=args.force)
        export = trainer.fit()
    except TokenizerError as exc:
        return print_error(exc)
    replaced = "" if trainer.replaces is None else f" (replacing the export of step {trainer.replaces})"
    trainer.accelerator.print(f"exported {export}{replaced}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
