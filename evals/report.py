"""Report files for evals.reconstruct: report.json, report.md, items.csv, samples.png.

report.json holds every aggregate metric, N and its small-N label, the protocol, the feature networks'
hashes, each model's weights hash/spec/throughput, and library versions; report.md is the comparison
table; samples.png shows originals | reconstruction | error. items.csv (one row per (item, model)) is
written by evals/streaming.py as shards finish.
"""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from tokenizers_svc.media import encode_image

HEATMAP_GAIN = 4.0  # |error| of 64/255 already saturates: reconstruction errors are usually small


def versions() -> dict:
    """Versions of what produced the numbers."""
    out = {"python": platform.python_version()}
    for dist in ("torch", "diffusers", "tokenizers-svc", "numpy", "scipy", "scikit-image", "lpips"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def write_report(out: Path, result: dict, samples: list, models: list[str]) -> dict:
    """Write report.json, report.md and samples.png (items.csv is written while the run streams)."""
    out.mkdir(parents=True, exist_ok=True)
    result["versions"] = result.get("versions") or versions()
    (out / "report.json").write_text(json.dumps(result, indent=2, default=_json_default))
    (out / "report.md").write_text(markdown_table(result))
    write_samples(out / "samples.png", samples, models, result["kind"])
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


def error_heatmap(original: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) pair -> uint8 (3, H, W) heat map of the mean absolute error (black-red-yellow-white)."""
    err = (original.float() - reconstruction.float()).abs().mean(0) * HEATMAP_GAIN / 255  # (H, W)
    err = err.clamp(0, 1)
    red = (err * 3).clamp(0, 1)
    green = (err * 3 - 1).clamp(0, 1)
    blue = (err * 3 - 2).clamp(0, 1)
    return (torch.stack([red, green, blue]) * 255).round().to(torch.uint8)


def write_samples(path: Path, samples: list, models: list[str], kind: str) -> None:
    """samples.png: one row per sample item (the first K of the run): original | (reconstruction | error)
    per model. ``samples``: [(key, name, {"original": uint8 item, model: uint8 item, ...})]; video rows show
    the middle frame."""
    rows = []
    for _, _, pixels in samples:
        cells = [pixels["original"], *(c for m in models for c in (pixels[m], None))]
        if kind == "video":
            cells = [c if c is None else c[:, c.shape[1] // 2] for c in cells]
        for i, cell in enumerate(cells):
            if cell is None:  # the error heat map right of each reconstruction
                cells[i] = error_heatmap(cells[0], cells[i - 1])
        rows.append(torch.cat(cells, dim=2))  # (3, R, R * (1 + 2 * models))
    grid = torch.cat(rows, dim=1)  # (3, rows * R, ...)
    path.write_bytes(encode_image(grid.permute(1, 2, 0).contiguous().numpy(), format="png"))
