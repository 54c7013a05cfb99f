"""`regap playground` end to end, as a user meets it: seconds until the page is served, seconds
until both models have answered a question (with verdicts and the gap), and the same question
again; optionally the page's screenshot (docs/playground.png).

    python bench/playground.py                                        # the two tiny presets
    python bench/playground.py --shot docs/playground.png --max-new-tokens 24

Starts `regap playground` itself on a free port (the default models unless --model is given
twice), then drives Debian's chromium with Playwright, as tests/test_playground_browser.py does:
the first harmful starter request, the blank image, AdaShield-S on side B, "Ask both". The first
question also loads the relevance judge's embedder and computes each model's text statistics
unless the regap cache has them (`text_stats_files_before` counts the cached files). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(command: list[str], url: str, log: Path, limit: float = 600) -> tuple[subprocess.Popen, float]:
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    while time.perf_counter() - start < limit:
        if process.poll() is not None:
            sys.exit(f"regap playground exited with {process.returncode}; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return process, time.perf_counter() - start
        except OSError:
            time.sleep(0.5)
    process.kill()
    sys.exit(f"regap playground did not serve {url} within {limit:.0f} s; see {log}")


def ask(page, timeout_ms: int = 900_000) -> float:
    from playwright.sync_api import expect

    start = time.perf_counter()
    page.locator("#ask").click()
    expect(page.locator("#message")).not_to_contain_text("done", timeout=60_000)
    expect(page.locator("#message")).to_contain_text("done", timeout=timeout_ms)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=None, help="side A's model, then side B's")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--shot", type=Path, default=None, help="save the page here (a 256-colour PNG)")
    parser.add_argument("--width", type=int, default=1100, help="width of the saved screenshot in pixels")
    args = parser.parse_args()
    from PIL import Image
    from playwright.sync_api import expect, sync_playwright

    from regap.cache import cache_dir

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    folder = Path(tempfile.mkdtemp(prefix="regap-bench-playground-"))
    models = [item for model in (args.model or []) for item in ("--model", model)]
    command = [sys.executable, "-m", "regap.cli", "playground", "--port", str(port), "--max-new-tokens",
               str(args.max_new_tokens), "--cases", str(folder / "cases.jsonl"), *models]
    cached = len(list(cache_dir("playground", "text_stats").glob("*.safetensors")))
    process, served = serve(command, url, folder / "server.log")
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1500})
            page.goto(url)
            page.locator("#starter input").click()
            page.get_by_role("option").first.click()
            expect(page.locator("#request textarea")).not_to_have_value("", timeout=120_000)
            page.locator("#image-choice input[value=blank]").check()
            page.locator("#defenses-b input[name=adashield-s]").check()
            first = ask(page)
            again = ask(page)
            shot = page.screenshot(full_page=True) if args.shot else None
            answers = [page.locator(f"#answer-{side} textarea").input_value() for side in "ab"]
            gaps = [page.locator(f"#gap-{side}").inner_text() for side in "ab"]
            browser.close()
    finally:
        process.terminate()
        process.wait(timeout=120)
    if shot is not None:
        image = Image.open(io.BytesIO(shot)).convert("RGB")
        image = image.resize((args.width, round(image.height * args.width / image.width)), Image.Resampling.LANCZOS)
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(args.shot, optimize=True)
    print(json.dumps({
        "command": " ".join(command[1:]), "served_s": round(served, 1), "first_ask_s": round(first, 1),
        "text_stats_files_before": cached, "second_ask_s": round(again, 1), "max_new_tokens": args.max_new_tokens,
        "answers": answers, "gaps": gaps, "shot": str(args.shot) if args.shot else None,
        "shot_kb": round(args.shot.stat().st_size / 1024) if args.shot else None,
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
    }, indent=2))


if __name__ == "__main__":
    main()
