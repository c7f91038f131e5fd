"""Reconstruction evaluation: rFID/KID (standard FID Inception), PSNR/SSIM/LPIPS, video metrics, reports.

Importing this package sets ``THP_MEM_ALLOC_ENABLE=1`` unless it is already set: torch reads it once,
when it loads, and then page-aligns its CPU buffers of 2 MiB and more and advises the kernel to back
them with transparent huge pages. Why: with torch's default 64-byte alignment a long evaluation's C
heap kept growing (~0.7 MB per item: freed activation space that later batches did not reuse); in this
mode it stays flat and each item costs less CPU (docs/benchmarks.md, "Evaluation"). ``=0`` turns it
off; it has no effect in a process that imported torch before this package (training does).
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
