"""The screenshot in docs/playground.png: a running `regap playground` page after one question.

    regap playground --max-new-tokens 24 &            # wait until it serves http://127.0.0.1:7860
    python bench/playground_screenshot.py --out docs/playground.png

Drives Debian's chromium with Playwright (as tests/test_playground_browser.py does): picks the
first starter request, the blank image, toggles AdaShield-S on side B, asks both models, waits
for the verdicts and the gap, and saves the page reduced to a 256-colour PNG (small in git).
"""

from __future__ import annotations

import argparse
import io
import shutil
from pathlib import Path

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:7860/")
    parser.add_argument("--out", type=Path, default=Path("docs/playground.png"))
    parser.add_argument("--width", type=int, default=1100, help="width of the saved image in pixels")
    args = parser.parse_args()
    from PIL import Image
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1500})
        page.goto(args.url)
        page.locator("#starter input").click()
        page.get_by_role("option").first.click()
        page.locator("#image-choice input[value=blank]").check()
        page.locator("#defenses-b input[name=adashield-s]").check()
        page.locator("#ask").click()
        expect(page.locator("#message")).to_contain_text("done", timeout=900_000)
        page.locator("#message").evaluate("node => node.scrollIntoView()")
        shot = page.screenshot(full_page=True)
        browser.close()
    image = Image.open(io.BytesIO(shot)).convert("RGB")
    image = image.resize((args.width, round(image.height * args.width / image.width)), Image.Resampling.LANCZOS)
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
