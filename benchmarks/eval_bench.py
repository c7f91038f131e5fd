"""Streaming evaluation: peak RSS at two sizes and items/s against a bare loop doing the same model and
Inception work, in one run.

Items are the multi-scale crops (shorter side 256/384/512/768, 256x256 grid, std >= 4) of the shared
photos (train + val), repeated when there are fewer than N, written as PNG files; both sides read them.
Per item both sides decode the PNG, encode + decode with the model, make the bicubic baseline at the
model's float budget, and run Inception on original, reconstruction and baseline. The streaming side is
``python -m evals.reconstruct`` (metrics, sufficient statistics, items.csv, checkpoints, report, with a
fresh reference cache); the bare loop does nothing else. Each side runs in its own process and reports
its own peak RSS (``ru_maxrss`` of its main process; a DataLoader worker is a separate process).

    .venv/bin/python benchmarks/eval_bench.py [--sizes 500,2000] [--model tsvc-image-f8c4] [--device cpu]
        [--batch-size 16] [--workers 1] [--concurrent]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import evals  # noqa: F401  sets the evaluation's allocator mode (evals/__init__.py); both children inherit it

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO.parent / "shared" / "data" / "images"


def write_crops(folder: Path, n: int, photos: Path = PHOTOS) -> None:
    """The first ``n`` multi-scale crops of the shared photos as PNG files (cycling when there are fewer)."""
    import torch

    from tokenizers_svc.crops import multiscale_crops
    from tokenizers_svc.media import encode_image, read_image

    crops = []
    for split in ("train", "val"):
        for path in sorted((photos / split).iterdir()) if (photos / split).is_dir() else []:
            image = torch.from_numpy(read_image(path)).permute(2, 0, 1)
            crops += [(f"{split}-{path.stem}{name}", tile) for _, name, tile in multiscale_crops(image)]
            if len(crops) >= n:
                break
        if len(crops) >= n:
            break
    folder.mkdir(parents=True)
    for i in range(n):
        name, tile = crops[i % len(crops)]
        data = encode_image(tile.permute(1, 2, 0).contiguous().numpy(), format="png")
        (folder / f"{i:05d}-{name.replace('@', '_').replace('#', '_')}.png").write_bytes(data)


def bare_loop(folder: str, model: str, device: str, batch_size: int, inception_path: str | None) -> dict:
    """Read, model, bicubic and three Inception passes per batch; nothing kept."""
    import torch

    from evals import fid
    from tokenizers_svc import load_tokenizer
    from tokenizers_svc.crops import bicubic_round_trip
    from tokenizers_svc.media import read_image

    start = time.perf_counter()
    tokenizer = load_tokenizer(model, device=device)
    inception = fid.load_inception(inception_path, device)
    paths = sorted(Path(folder).glob("*.png"))
    with torch.no_grad():
        for i in range(0, len(paths), batch_size):
            x = torch.stack(
                [torch.from_numpy(read_image(p)).permute(2, 0, 1) for p in paths[i : i + batch_size]]
            ).to(device)
            latents = tokenizer.encode(x)
            rec = tokenizer.decode(latents, output_dtype=torch.uint8)
            base = bicubic_round_trip(x, latents.latents[0].numel())
            for pixels in (x, rec, base):
                inception.device_features(pixels).cpu()
    return measurement(len(paths), start)


def measurement(items: int, start: float) -> dict:
    """Items/s by wall clock and by CPU seconds of this process and its reaped children (DataLoader
    workers), this process's peak RSS (Linux ru_maxrss is in KiB), and the load average: on a shared
    machine the CPU-second rate is the comparable one."""
    seconds = time.perf_counter() - start
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    return {
        "items": items,
        "seconds": seconds,
        "items_per_s": items / seconds,
        "cpu_seconds": cpu,
        "items_per_cpu_s": items / cpu,
        "peak_rss_mb": own.ru_maxrss / 1024,
        "load_average_1min": os.getloadavg()[0],
    }


def start_child(argv: list[str]) -> subprocess.Popen:
    """Start ``argv`` in a fresh Python; :func:`child_result` waits for it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, *argv], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def child_result(child: subprocess.Popen) -> dict:
    """Wait for a child -> the JSON on its last stdout line."""
    stdout, stderr = child.communicate()
    if child.returncode != 0:
        raise RuntimeError(stderr[-3000:])
    return json.loads(stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="500,2000", help="N values, comma-separated")
    p.add_argument("--model", default="tsvc-image-f8c4")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers of the streaming side")
    p.add_argument("--photos", type=Path, default=PHOTOS, help="folder with train/ and val/ photos")
    p.add_argument("--inception", default=None, help="another Inception TorchScript (default: the standard)")
    p.add_argument(
        "--concurrent",
        action="store_true",
        help="run both sides at the same time (each sees the same machine load; half the wall time on 2 cores)",
    )
    p.add_argument("--bare", nargs=1, help=argparse.SUPPRESS)  # internal: run the bare loop on a folder
    args = p.parse_args()
    if args.bare:
        print(json.dumps(bare_loop(args.bare[0], args.model, args.device, args.batch_size, args.inception)))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sorted(int(s) for s in args.sizes.split(",")):
            folder = Path(tmp) / f"crops{n}"
            write_crops(folder, n, args.photos)
            common = ["--model", args.model, "--device", args.device, "--batch-size", str(args.batch_size)]
            common += ["--inception", args.inception] if args.inception else []
            out = str(Path(tmp) / f"out{n}")
            stream_child = start_child(
                ["-c", STREAM_CHILD, str(folder), out, *common, "--workers", str(args.workers)]
            )
            if args.concurrent:
                bare_child = start_child([__file__, "--bare", str(folder), *common])
            stream = child_result(stream_child)
            print(json.dumps({"n": n, "stream": stream}), flush=True)  # survives a kill of the rest
            if not args.concurrent:
                bare_child = start_child([__file__, "--bare", str(folder), *common])
            bare = child_result(bare_child)
            results.append({"n": n, "stream": stream, "bare": bare})
            print(json.dumps(results[-1]), flush=True)
    print(
        f"\nmodel {args.model}, device {args.device}, batch {args.batch_size}, workers {args.workers}, "
        f"cpus {os.cpu_count()}, sides {'concurrent' if args.concurrent else 'one after the other'}"
    )
    print(
        "| N | streaming items/s | bare items/s | ratio | streaming items/CPU-s | bare items/CPU-s | ratio | "
        "streaming peak RSS MB | bare peak RSS MB | load avg (stream, bare) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        st, ba = r["stream"], r["bare"]
        cells = [
            r["n"],
            f"{st['items_per_s']:.3f}",
            f"{ba['items_per_s']:.3f}",
            f"{st['items_per_s'] / ba['items_per_s']:.2f}",
        ]
        cells += [f"{st['items_per_cpu_s']:.3f}", f"{ba['items_per_cpu_s']:.3f}"]
        cells += [
            f"{st['items_per_cpu_s'] / ba['items_per_cpu_s']:.2f}",
            f"{st['peak_rss_mb']:.0f}",
            f"{ba['peak_rss_mb']:.0f}",
        ]
        cells += [f"{st['load_average_1min']:.1f}, {ba['load_average_1min']:.1f}"]
        print("| " + " | ".join(map(str, cells)) + " |")


# The streaming side, timed from its own start like the bare loop (model and Inception loading included).
STREAM_CHILD = """
import json, sys, time
start = time.perf_counter()
from benchmarks.eval_bench import measurement
from evals.reconstruct import main
folder, out, *options = sys.argv[1:]
argv = ["--data", folder, "--resolution", "256", "--out", out, "--cache-dir", out + "-cache", "--samples", "2"]
assert main([*argv, *options]) == 0
print(json.dumps(measurement(json.load(open(out + "/report.json"))["n"], start)))
"""

if __name__ == "__main__":
    main()
