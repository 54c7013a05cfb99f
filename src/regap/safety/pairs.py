"""Image-text pairs for gap measurement and for calibrating the hidden-state defenses, built
from image sources and request sources (the pair itself and its protocols:
`regap.models.gap_pair`).

Images come from built-in sources (`scenes`: project-made synthetic scenes, `blank`,
`noise`, `natural`, `typo`) or a user folder; texts from any request source spec
(`starter-benign`, `advbench:PATH`, ...) or a plain text file (one text per line).
Unreadable files in a folder are skipped and reported; a folder with fewer readable images
than pairs is refused unless reuse is asked for (repeated images shrink the image cloud's
spread, so the gap would describe fewer images than it claims).

A pair's image is made when a batch reads it, so the list of pairs holds no pixels, and the
number of pairs is bounded (`MAX_PAIRS`): every pair's hidden states of every layer are
kept on disk while the gap is measured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from PIL import Image

from regap.errors import RegapError
from regap.images import load_image
from regap.models.gap_pair import GapPair

IMAGE_SOURCES = ("scenes", "blank", "noise", "natural", "typo")
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

#: The most pairs one measurement or calibration takes: 100 times the reference protocol's 100.
#: Hidden states grow with it (the 100-pair protocol of a 7B model spills about 18 GB).
MAX_PAIRS = 10_000
#: The most texts joined into one pair's text.
MAX_TEXTS_PER_PAIR = 100

ImageMaker = Callable[[], Image.Image]


def load_texts(spec: str, n: int) -> list[str]:
    """Texts from a file of lines or a request source spec (first `n`, in order)."""
    path = Path(spec)
    if path.is_file() and path.suffix in (".txt", ".text"):
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        texts = lines[:n]
    else:
        from regap.safety.sources import load_requests

        texts = [r.prompt for r in load_requests(spec, limit=n)]
    if not texts:
        raise RegapError(f"no texts in {spec}")
    return texts


def _folder_images(folder: Path, n: int, reuse: bool, problems: list[str]) -> list[tuple[str, ImageMaker]]:
    """Up to `n` readable images of `folder` (sorted), each read once to check it and again when
    used; each unreadable file adds a line to `problems`."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise RegapError(f"no image files in {folder}")
    out: list[tuple[str, ImageMaker]] = []
    for path in files:
        if len(out) == n:
            break
        try:
            load_image(path)
        except RegapError as exc:  # one bad image is recorded, the rest go on
            problems.append(str(exc))
            continue
        out.append((str(path.relative_to(folder)), lambda path=path: load_image(path)))
    skipped = f"; {len(problems)} unreadable: {'; '.join(problems[:3])}{' ...' if len(problems) > 3 else ''}" \
        if problems else ""
    if not out:
        raise RegapError(f"no readable images in {folder}{skipped}")
    if len(out) < n and not reuse:
        raise RegapError(f"{folder} has {len(out)} readable image(s) for {n} pairs{skipped}; add images, lower "
                         "--pairs, or pass --reuse-images to cycle them")
    return out


def make_images(source: str, n: int, seed: int = 0, texts: list[str] | None = None, size: int = 336,
                reuse: bool = False, problems: list[str] | None = None) -> list[tuple[str, ImageMaker]]:
    """`n` (id, image maker) items from a built-in source or a folder. A folder with fewer readable
    images than `n` is an error unless `reuse` (then they are cycled); unreadable files are
    appended to `problems` when given."""
    if Path(source).is_dir():
        items = _folder_images(Path(source), n, reuse, problems if problems is not None else [])
    elif source == "scenes":
        from regap.data.synth import item_rng, render_scene, sample_scene

        items = [(f"scene-{i}", lambda i=i: render_scene(sample_scene(item_rng(seed, i, "gap-probe")), size))
                 for i in range(n)]
    elif source in ("blank", "noise", "natural", "typo"):
        from regap.safety.conditions import get_condition

        condition = get_condition(source)
        texts = texts or [""] * n
        items = [(f"{source}-{i}", lambda i=i: condition.image_for(f"gap-{seed}-{i}", texts[i % len(texts)], {}))
                 for i in range(n)]
    else:
        raise RegapError(f"unknown image source {source!r}; valid: {', '.join(IMAGE_SOURCES)} or a folder")
    return [items[i % len(items)] for i in range(n)]


def check_pair_count(n: int, texts_per_pair: int = 1) -> None:
    """A one-line `RegapError` for a number of pairs (or texts per pair) outside the bounds."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise RegapError(f"need at least 2 pairs for a covariance, got {n}")
    if n > MAX_PAIRS:
        raise RegapError(f"{n:,} pairs is over the limit of {MAX_PAIRS:,} (the reference protocol uses 100; every "
                         "pair's hidden states of every layer are kept on disk while they are measured)")
    if isinstance(texts_per_pair, bool) or not isinstance(texts_per_pair, int) or texts_per_pair < 1:
        raise RegapError(f"texts_per_pair must be >= 1, got {texts_per_pair}")
    if texts_per_pair > MAX_TEXTS_PER_PAIR:
        raise RegapError(f"{texts_per_pair} texts per pair is over the limit of {MAX_TEXTS_PER_PAIR}")


def make_pairs(n: int, images: str = "scenes", texts: str = "starter-benign", seed: int = 0,
               texts_per_pair: int = 1, reuse_images: bool = False,
               problems: list[str] | None = None) -> list[GapPair]:
    """`n` pairs; the i-th image goes with the i-th text (texts cycle if fewer than `n`).
    `texts_per_pair` > 1 joins that many consecutive texts into one, for more text tokens
    per pair (the covariance needs more tokens than dimensions for intervals). A folder of
    images must hold `n` readable ones unless `reuse_images`; its unreadable files are
    appended to `problems` (one line each) when given."""
    check_pair_count(n, texts_per_pair)
    pool = load_texts(texts, n * texts_per_pair)
    pool = [pool[i % len(pool)] for i in range(n * texts_per_pair)]
    text_list = [" ".join(pool[i * texts_per_pair : (i + 1) * texts_per_pair]) for i in range(n)]
    image_list = make_images(images, n, seed=seed, texts=text_list, reuse=reuse_images, problems=problems)
    return [GapPair(f"{image_id}|{i}", image, text, images) for i, ((image_id, image), text) in enumerate(zip(image_list, text_list))]
