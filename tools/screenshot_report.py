"""Render a report.html in headless Chromium and save a PNG, to look at what a person will see.

    python -m tools.screenshot_report runs/<time>/report.html --out /tmp/report.png [--size 1400,2000]

Needs a Chromium binary (`apt-get install -y chromium`); nothing is fetched from the network: the report is
self-contained and Chromium runs with its background networking off.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
_TIMEOUT_S = 120


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def screenshot(report: Path, out: Path, size: tuple[int, int] = (1400, 2000), browser: str | None = None) -> Path:
    """Save a PNG of `report` as headless Chromium draws it; raises RuntimeError naming what went wrong."""
    browser = browser or find_browser()
    if browser is None:
        raise RuntimeError(f"no Chromium found (looked for {', '.join(BROWSERS)}): apt-get install -y chromium")
    out.parent.mkdir(parents=True, exist_ok=True)
    # a throw-away profile: a shared machine's other Chromium sessions are never touched
    with tempfile.TemporaryDirectory(prefix="evalorch-chromium-") as profile:
        command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                   "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                   f"--user-data-dir={profile}", f"--screenshot={out.resolve()}",
                   f"--window-size={size[0]},{size[1]}", report.resolve().as_uri()]
        result = subprocess.run(command, capture_output=True, text=True, timeout=_TIMEOUT_S)
    if not out.is_file() or out.stat().st_size == 0:
        raise RuntimeError(f"Chromium wrote no screenshot (exit {result.returncode}): {result.stderr[-2000:]}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="a report.html (or the run folder that holds one)")
    parser.add_argument("--out", type=Path, default=Path("report.png"), help="PNG to write")
    parser.add_argument("--size", default="1400,2000", help="window width,height in pixels")
    args = parser.parse_args(argv)
    report = args.report / "report.html" if args.report.is_dir() else args.report
    if not report.is_file():
        print(f"Error: {report} not found", file=sys.stderr)
        return 2
    width, height = (int(v) for v in args.size.split(","))
    try:
        path = screenshot(report, args.out, (width, height))
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
