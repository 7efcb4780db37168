"""Does the demo's HTML report render in a real browser? Headless Chromium opens it, and
this script checks that the page loads, every embedded image decodes, and the browser logs
no console messages (errors
included); it also writes a screenshot (the README's).

    sudo apt-get install -y chromium          # Debian's package: /usr/bin/chromium
    .venv/bin/fedspeech demo --out runs/demo  # or --reduced for a quick page
    .venv/bin/python benchmarks/report_render.py runs/demo/report.html --screenshot docs/img/demo_report.png

Exit code 0 only when every check passes. The page marks itself once loaded
(``data-images="N loaded, M broken"`` on ``<body>``, set by the report's own script), so
the check reads the result off the DOM Chromium dumps after the load event.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=5000"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("no Chromium found: sudo apt-get install -y chromium")


def check(report: Path, screenshot: Path | None, width: int, height: int) -> list[str]:
    """The problems found (empty: the page renders cleanly)."""
    url = report.resolve().as_uri()
    browser = chromium()
    dom = subprocess.run(
        [browser, *CHROMIUM_FLAGS, "--enable-logging=stderr", "--v=1", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    problems = []
    if dom.returncode != 0:
        problems.append(f"chromium exited {dom.returncode}: {dom.stderr[-500:]}")
    marker = re.search(r'<body[^>]*data-images="(\d+) loaded, (\d+) broken"', dom.stdout)
    if marker is None:
        problems.append("the page's load script did not run (no data-images on <body>)")
    else:
        loaded, broken = int(marker.group(1)), int(marker.group(2))
        print(f"images: {loaded} on the page, {broken} broken")
        if loaded == 0 or broken:
            problems.append(f"images: {loaded} on the page, {broken} broken")
    # Chromium logs every console message (errors, uncaught exceptions, warnings) as one
    # CONSOLE line without its level; the report writes none, so any is a problem.
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    print(f"console messages: {len(console)}")
    problems += [f"console: {line}" for line in console]
    sections = re.findall(r'<section id="([a-z-]+)"', dom.stdout)
    print(f"sections: {', '.join(sections)}")
    if 'class="missing"' in dom.stdout:
        problems.append("a section reports missing output")
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        shot = subprocess.run(
            [browser, *CHROMIUM_FLAGS, f"--window-size={width},{height}", f"--screenshot={screenshot.resolve()}", url],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if shot.returncode != 0 or not screenshot.is_file():
            problems.append(f"screenshot failed: {shot.stderr[-500:]}")
        else:
            print(f"screenshot: {screenshot}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path, help="report.html of a demo folder")
    parser.add_argument("--screenshot", type=Path, help="write a PNG of the page's top")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=1800)
    args = parser.parse_args()
    if not args.report.is_file():
        sys.exit(f"{args.report}: not found (run `fedspeech demo` first)")
    problems = check(args.report, args.screenshot, args.width, args.height)
    for problem in problems:
        print("FAIL", problem)
    print("OK: the report renders, every image loads, no console errors" if not problems else "FAILED")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
