"""Render a run's report.html in headless Chromium and save a screenshot, to look at what a user sees.

    python bench/report_screenshot.py runs/demo --out report.png

Needs Debian's chromium (`apt-get install chromium`). Chromium runs without network access.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def screenshot(html: Path, out: Path, *, width: int = 1200, height: int = 3200) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        sys.exit("chromium not found: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", f"--window-size={width},{height}", f"--screenshot={out.resolve()}",
             html.resolve().as_uri()],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("report.png"))
    args = parser.parse_args()
    html = args.run_dir / "report.html"
    if not html.exists():
        sys.exit(f"{html} not found: run `datadistill report {args.run_dir}` first")
    screenshot(html, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
