"""CLI start-up time: this checkout against a baseline git revision, measured in the same run.

Each command runs in a fresh process (``python -c "from tokenizers_svc.cli import app; app()"``, what
the ``tokenizers-svc`` console script does) with PYTHONPATH pointing at the checkout under test; the
baseline revision is exported with ``git archive`` into a temporary directory. Runs alternate between
the two sides so that load from other processes hits both alike. Prints the median wall seconds
per command and side, and the ratio baseline / current.

    .venv/bin/python benchmarks/cli_startup.py [--baseline 38741a1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = (["--help"], ["models"], ["models", "--json"])
CLI = "from tokenizers_svc.cli import app; app()"


def export_revision(revision: str, into: Path) -> Path:
    """The tree of ``revision`` as plain files under ``into`` (no worktree, no checkout changes)."""
    archive = subprocess.run(["git", "archive", revision], cwd=REPO, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def run_once(checkout: Path, args: list[str], cli: bool = True) -> float:
    env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", CLI, *args] if cli else [sys.executable, *args]
    start = time.perf_counter()
    subprocess.run(command, cwd=checkout, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="38741a1", help="git revision to compare against")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        baseline = export_revision(args.baseline, Path(tmp))
        sides = {f"baseline {args.baseline}": baseline, "current": REPO}
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.repeats):
            for command in COMMANDS:
                for side, checkout in sides.items():
                    times.setdefault((" ".join(command), side), []).append(run_once(checkout, command))
        torch_import = statistics.median(
            run_once(REPO, ["-c", "import torch"], cli=False) for _ in range(args.repeats)
        )
    print(f"| command | {' | '.join(sides)} | baseline / current |")
    print(f"|---|{'---:|' * len(sides)}---:|")
    for command in COMMANDS:
        name = " ".join(command)
        medians = [statistics.median(times[(name, side)]) for side in sides]
        cells = " | ".join(f"{m:.2f} s" for m in medians)
        print(f"| `tokenizers-svc {name}` | {cells} | {medians[0] / medians[1]:.1f}x |")
    print(f"\n`python -c 'import torch'` in the same run: {torch_import:.2f} s")


if __name__ == "__main__":
    main()
