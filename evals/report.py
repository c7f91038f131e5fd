"""Report files for evals.reconstruct: report.json, report.md, items.csv, samples.png.

report.json holds every aggregate metric, N and its small-N label, the protocol, the feature networks'
hashes, each model's weights hash/spec/throughput, and library versions; report.md is the comparison
table; samples.png shows originals | reconstruction | error map, labelled, with the error scale. items.csv (one row per (item, model)) is
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
        *skipped_lines(result.get("data", {}).get("skipped")),
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
            latent if row["kind"] == "model" else _baseline_size(row),
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
    lines += discrete_table(result)
    return "\n".join(lines)


def discrete_table(result: dict) -> list[str]:
    """Markdown lines: each discrete model's codebook health and bit budget, beside the classical
    codecs given the same bits per item (evals/classical.py); empty without a discrete model."""
    rows = {row["name"]: row for row in result["results"]}
    models = [row for row in result["results"] if "bits_per_item" in row]
    if not models:
        return []
    lines = [
        "Discrete tokens: codebook health on this set, and classical codecs at the same bits per item "
        "(bits = tokens x log2(vocabulary)):",
        "",
        "| model / codec | vocabulary | tokens/item | bits/pixel | codebook usage | perplexity | PSNR | SSIM | rFID | bytes/item |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in models:
        m = row["metrics"]
        vocabulary = row["spec"]["tokens"]["vocabulary_size"]
        cells = [row["name"], str(vocabulary), str(row["tokens_per_item"]), _fmt(row["bits_per_pixel"], 4)]
        cells += [_fmt(m["codebook_usage"], 3), _fmt(m["perplexity"], 1), _fmt(m["psnr"]), _fmt(m["ssim"], 4)]
        cells += [_fmt(m["rfid"]), _fmt(row["bits_per_item"] / 8, 0)]
        lines.append("| " + " | ".join(cells) + " |")
        for codec in row["codecs"]:
            c = rows[codec]["metrics"]
            size = _fmt(c["webp_bytes"], 0) if "webp_bytes" in c else _fmt(row["bits_per_item"] / 8, 0)
            if "webp_quality" in c:
                size += f" (quality {_fmt(c['webp_quality'], 1)}, {_fmt(100 * c['webp_over_budget'], 0)}% over budget)"
            cells = [
                f"  {codec}",
                "-",
                "-",
                "-",
                "-",
                "-",
                _fmt(c["psnr"]),
                _fmt(c["ssim"], 4),
                _fmt(c["rfid"]),
                size,
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def _baseline_size(row: dict) -> str:
    """What a baseline keeps per item: its downsampled size, or a codec's byte budget."""
    if "downsampled_size" in row:
        return "x".join(map(str, row["downsampled_size"])) + " px"
    return f"{row['budget_bytes']} B"


def skipped_lines(skipped: dict | None) -> list[str]:
    """One line naming how many entries could not be read and why (report.json lists them)."""
    if not skipped or not skipped["count"]:
        return []
    reasons = ", ".join(f"{count} {kind}" for kind, count in sorted(skipped["by_type"].items()))
    return [
        f"Skipped {skipped['count']} unreadable entries ({reasons}); report.json data.skipped names them."
    ]


def per_scale_table(result: dict) -> list[str]:
    """Markdown lines: each model's PSNR against bicubic at its float budget, over all crops and per scale
    (paired per-crop gain with its 95% CI); empty unless the run used --crop multiscale."""
    models = [row for row in result["results"] if "vs_bicubic" in row]
    if not models:
        return []
    lines = [
        "PSNR against each model's baseline at its budget, per shorter-side scale: bicubic at equal floats,"
        " or for a discrete model the 8-bit thumbnail at equal bits (mean ± 95% CI; gain is paired per crop):",
        "",
        "| model | scale | n | PSNR | baseline | baseline PSNR | gain dB |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in models:
        vs = row["vs_bicubic"]
        for scale, s in [("all", vs), *vs["per_scale"].items()]:
            cells = [row["name"], scale, str(s["n"]), f"{_fmt(s['psnr'])} ± {_fmt(s['psnr_ci95'])}"]
            cells += [row.get("baseline", "bicubic")]
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


# samples.png layout (pixels): a label column left of the rows, a header row of column names above
# them and the error maps' colour scale below.
LABEL_WIDTH = 150
HEADER_HEIGHT = 30
LEGEND_HEIGHT = 40
TEXT_PAD = 4


def write_samples(path: Path, samples: list, models: list[str], kind: str) -> None:
    """samples.png: one row per sample item (the first K of the run), named on the left; columns
    original | (reconstruction | error map) per model, named on top; the error maps' scale below.
    ``samples``: [(key, name, {"original": uint8 item, model: uint8 item, ...})]; video rows show
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
    grid = torch.cat(rows, dim=1).permute(1, 2, 0).contiguous().numpy()  # (rows * R, columns * R, 3)
    titles = ["original", *(t for m in models for t in (m, f"|error| of {m}"))]
    names = [name for _, name, _ in samples]
    path.write_bytes(encode_image(labelled_grid(grid, titles, names), format="png"))


def labelled_grid(grid: np.ndarray, titles: list[str], names: list[str]) -> np.ndarray:
    """uint8 (rows * R, columns * R, 3) grid -> the same grid on a white canvas with column ``titles``
    above, row ``names`` to the left and the error colour scale below: uint8 (H, W, 3)."""
    from PIL import Image, ImageDraw, ImageFont

    cell_h, cell_w = grid.shape[0] // len(names), grid.shape[1] // len(titles)
    width = LABEL_WIDTH + grid.shape[1]
    canvas = Image.new("RGB", (width, HEADER_HEIGHT + grid.shape[0] + LEGEND_HEIGHT), "white")
    canvas.paste(Image.fromarray(grid), (LABEL_WIDTH, HEADER_HEIGHT))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for column, title in enumerate(titles):
        left = LABEL_WIDTH + column * cell_w
        _draw_fitted(draw, font, title, (left + TEXT_PAD, TEXT_PAD), cell_w - 2 * TEXT_PAD, lines=2)
    for row, name in enumerate(names):
        top = HEADER_HEIGHT + row * cell_h
        _draw_fitted(draw, font, name, (TEXT_PAD, top + TEXT_PAD), LABEL_WIDTH - 2 * TEXT_PAD, lines=4)
    bar_top, bar_width = HEADER_HEIGHT + grid.shape[0] + TEXT_PAD, min(256, grid.shape[1])
    levels = torch.linspace(0, 255 / HEATMAP_GAIN, bar_width).round()  # grey levels of mean |error|
    ramp = error_heatmap(levels.view(1, 1, -1).expand(3, 12, -1), torch.zeros(3, 12, bar_width))
    canvas.paste(Image.fromarray(ramp.permute(1, 2, 0).contiguous().numpy()), (LABEL_WIDTH, bar_top))
    legend = "error map: mean |error| in grey levels"
    _draw_fitted(draw, font, legend, (TEXT_PAD, bar_top), LABEL_WIDTH - 2 * TEXT_PAD, 2)
    top = 255 / HEATMAP_GAIN
    for fraction, tick in ((0.0, "0"), (0.5, f"{top / 2:.0f}"), (1.0, f"{top:.0f}+")):
        x = LABEL_WIDTH + fraction * (bar_width - draw.textlength(tick, font=font))
        draw.text((x, bar_top + 14), tick, fill="black", font=font)
    return np.asarray(canvas)


def _draw_fitted(draw, font, text: str, origin: tuple[int, int], width: int, lines: int) -> None:
    """``text`` in black from ``origin``, broken into at most ``lines`` lines of at most ``width``
    pixels (the last one cut with '...' if it is still too long)."""
    out, rest = [], text
    while rest and len(out) < lines:
        cut = len(rest)
        while cut > 1 and draw.textlength(rest[:cut], font=font) > width:
            cut -= 1
        out.append(rest[:cut])
        rest = rest[cut:]
    if rest and out:
        line = out[-1]
        while len(line) > 1 and draw.textlength(line + "...", font=font) > width:
            line = line[:-1]
        out[-1] = line + "..."
    draw.multiline_text(origin, "\n".join(out), fill="black", font=font, spacing=2)
