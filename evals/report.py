"""Report files for evals.reconstruct: report.json, report.md, items.csv, samples.png.

report.json holds every aggregate metric, N and its small-N label, the protocol, the feature networks'
hashes, each model's weights hash/spec/throughput, and library versions; report.md is the comparison
table; items.csv has one row per (item, model); samples.png shows originals | reconstruction | error.
"""

from __future__ import annotations

import csv
import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from evals import fid
from tokenizers_svc.media import encode_image

HEATMAP_GAIN = 4.0  # |error| of 64/255 already saturates: reconstruction errors are usually small


def sha256_tensor(pixels: torch.Tensor) -> str:
    return hashlib.sha256(pixels.contiguous().numpy().tobytes()).hexdigest()


def versions() -> dict:
    """Versions of what produced the numbers."""
    out = {"python": platform.python_version()}
    for dist in ("torch", "diffusers", "tokenizers-svc", "numpy", "scipy", "scikit-image", "lpips"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _row(name: str, rec, metrics: dict, kind: str) -> dict:
    return {
        "name": name,
        "floats_per_item": rec.floats_per_item,
        "metrics": metrics,
        **rec.info,
        "kind": kind,
    }


def write_report(
    out: Path, *, data, protocol: dict, inception, lpips, i3d, models: list, baselines: list, samples: int
) -> dict:
    """Write all report files into ``out``; ``models``/``baselines`` are (Reconstruction, metrics, per_item)."""
    out.mkdir(parents=True, exist_ok=True)
    n = len(data.pixels)
    fid_n = n if data.kind == "image" else n * data.pixels.shape[2]
    pixel_floats = data.pixels[0].numel()
    rows = [_row(rec.name, rec, metrics, "model") for rec, metrics, _ in models]
    rows += [_row(rec.name, rec, metrics, "baseline") for rec, metrics, _ in baselines]
    for row in rows:
        row["compression_ratio"] = pixel_floats / row["floats_per_item"]
    result = {
        "n": n,
        "fid_n": fid_n,
        "sample_size_label": fid.sample_size_label(fid_n),
        "kind": data.kind,
        "item_shape": list(data.pixels.shape[1:]),
        "items_sha256": sha256_tensor(data.pixels),
        "files": [str(p) for p in data.files],
        "protocol": {
            **protocol,
            "inception": {
                "path": str(inception.path),
                "sha1": inception.sha1,
                "standard": inception.standard,
            },
            "kid": "unbiased MMD^2, polynomial kernel (x.y/d + 1)^3, 100 subsets of min(1000, N)",
            "psnr": "per-item mean, uint8, peak 255 (video: per-frame mean)",
            "ssim": "Gaussian window 11, sigma 1.5, data range 255, per-channel mean (RGB)",
            "lpips": lpips.reason,
            "i3d": None if i3d is None else {"path": str(i3d.path), "sha1": i3d.sha1},
            "reconstruction_quantization": "round half up to uint8",
        },
        "versions": versions(),
        "results": rows,
    }
    (out / "report.json").write_text(json.dumps(result, indent=2, default=_json_default))
    (out / "report.md").write_text(markdown_table(result))
    write_items_csv(out / "items.csv", data.names, models + baselines)
    write_samples(out / "samples.png", data, [rec for rec, _, _ in models], samples)
    return result


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def markdown_table(result: dict) -> str:
    """The comparison table (models first, then the bicubic baselines at matching latent sizes)."""
    video = result["kind"] == "video"
    head = ["model", "latent/item", "compression", "rFID", "KIDx1e3", "PSNR ± 95% CI", "SSIM", "LPIPS"]
    head += ["tPSNR"] * video + (["rFVD"] if result["protocol"]["i3d"] else [])
    head += ["enc items/s", "dec items/s", "enc peak MB", "dec peak MB"]
    lines = [
        f"N = {result['n']} {result['kind']}s ({result['fid_n']} for FID: {result['sample_size_label']}), "
        f"item shape {result['item_shape']}, crop {result['protocol']['crop']}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in result["results"]:
        m = row["metrics"]
        tp = row.get("throughput", {})
        latent = "x".join(map(str, row["latent_shape_per_item"])) if "latent_shape_per_item" in row else "-"
        cells = [
            row["name"] + (" (baseline)" if row["kind"] == "baseline" else ""),
            latent if row["kind"] == "model" else "x".join(map(str, row["downsampled_size"])) + " px",
            f"{row['compression_ratio']:.1f}",
            _fmt(m["rfid"]),
            _fmt(1e3 * m["kid"]),
            _fmt(m["psnr"]) + (f" ± {_fmt(m['psnr_ci95'])}" if "psnr_ci95" in m else ""),
            _fmt(m["ssim"], 4),
            _fmt(m.get("lpips"), 4),
        ]
        if video:
            cells.append(_fmt(m["temporal_diff_psnr"]))
        if result["protocol"]["i3d"]:
            cells.append(_fmt(m.get("rfvd")))
        cells += [_fmt(tp.get("encode_items_per_s")), _fmt(tp.get("decode_items_per_s"))]
        cells += [_fmt(tp.get("encode_peak_memory_mb"), 1), _fmt(tp.get("decode_peak_memory_mb"), 1)]
        lines.append("| " + " | ".join(cells) + " |")
    memory = next((r["throughput"]["memory_method"] for r in result["results"] if "throughput" in r), "")
    lines += [
        "",
        f"Inception: {'standard' if result['protocol']['inception']['standard'] else 'NON-STANDARD'} "
        f"(sha1 {result['protocol']['inception']['sha1'][:12]}); LPIPS: {result['protocol']['lpips']}; "
        f"peak memory: {memory}.",
        "",
    ]
    lines += per_scale_table(result)
    return "\n".join(lines)


def per_scale_table(result: dict) -> list[str]:
    """Markdown lines: each model's PSNR against bicubic at its float budget, over all crops and per scale
    (paired per-crop gain with its 95% CI); empty unless the run used --crop multiscale."""
    models = [row for row in result["results"] if "vs_bicubic" in row]
    if not models:
        return []
    lines = [
        "PSNR against bicubic at equal floats, per shorter-side scale (mean ± 95% CI; gain is paired per crop):",
        "",
        "| model | scale | n | PSNR | bicubic PSNR | gain dB |",
        "|---|---|---|---|---|---|",
    ]
    for row in models:
        vs = row["vs_bicubic"]
        for scale, s in [("all", vs), *vs["per_scale"].items()]:
            cells = [row["name"], scale, str(s["n"]), f"{_fmt(s['psnr'])} ± {_fmt(s['psnr_ci95'])}"]
            cells += [f"{_fmt(s['bicubic_psnr'])} ± {_fmt(s['bicubic_psnr_ci95'])}"]
            cells += [f"{s['gain_db']:+.2f} ± {_fmt(s['gain_ci95'])}"]
            lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def write_items_csv(path: Path, names: list[str], results: list) -> None:
    columns = sorted({key for _, _, per_item in results for key in per_item})
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["item", "model", *columns])
        for rec, _, per_item in results:
            for i, name in enumerate(names):
                writer.writerow(
                    [name, rec.name, *(f"{per_item[c][i]:.6f}" if c in per_item else "" for c in columns)]
                )


def error_heatmap(original: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) pair -> uint8 (3, H, W) heat map of the mean absolute error (black-red-yellow-white)."""
    err = (original.float() - reconstruction.float()).abs().mean(0) * HEATMAP_GAIN / 255  # (H, W)
    err = err.clamp(0, 1)
    red = (err * 3).clamp(0, 1)
    green = (err * 3 - 1).clamp(0, 1)
    blue = (err * 3 - 2).clamp(0, 1)
    return (torch.stack([red, green, blue]) * 255).round().to(torch.uint8)


def write_samples(path: Path, data, recs: list, count: int) -> None:
    """samples.png: one row per item (the first ``count``): original | (reconstruction | error) per model.
    Video rows show the middle frame."""
    rows = []
    for i in range(min(count, len(data.pixels))):
        original = data.pixels[i]
        if data.kind == "video":
            mid = original.shape[1] // 2
            original = original[:, mid]
        cells = [original]
        for rec in recs:
            recon = rec.pixels[i] if data.kind == "image" else rec.pixels[i][:, rec.pixels.shape[2] // 2]
            cells += [recon, error_heatmap(original, recon)]
        rows.append(torch.cat(cells, dim=2))  # (3, R, R * (1 + 2 * models))
    grid = torch.cat(rows, dim=1)  # (3, rows * R, ...)
    path.write_bytes(encode_image(grid.permute(1, 2, 0).contiguous().numpy(), format="png"))
