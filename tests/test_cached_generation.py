"""The cached generation engine (safety and utility): bad items and over-long prompts become error
rows without stopping the run, and are retried; batches are sorted by length across a group."""

from __future__ import annotations

import json

from PIL import Image

from regap.errors import RegapError
from regap.safety.cached_generation import BATCHES_PER_GROUP, CacheItem, ItemInput, generate_missing
from regap.safety.store import JsonlStore

LONG = "word " * 600  # over the tiny random model's 512 positions


def _item(key: str, text: str, image=None, fail: bool = False) -> CacheItem:
    def build() -> ItemInput:
        if fail:
            raise RegapError(f"image not found: {key}.png")
        return ItemInput(text, image)

    return CacheItem(key, {"key": key, "prompt": text[:20]}, build)


class Responder:
    """Stands in for the model's generation: records each batch's keys and prompt lengths."""

    def __init__(self, model):
        self.model, self.batches = model, []

    def __call__(self, batch):
        texts, images = [built.text for _, built in batch], [built.image for _, built in batch]
        lengths = self.model.prompt_lengths(*self.model.prepare_conversations(texts, images))
        self.batches.append(([item.key for item, _ in batch], lengths))
        return [{**item.row, "response": "ok", "error": None} for item, _ in batch]


def test_a_bad_item_and_an_over_long_prompt_are_error_rows_and_retried(tiny_model, tmp_path):
    assert tiny_model.context_length == 512
    store = JsonlStore(tmp_path / "cache.jsonl")
    items = [_item("a", "Hello there"), _item("bad", "Describe it", fail=True), _item("long", LONG),
             _item("b", "What colour is it?", Image.new("RGB", (32, 32)))]
    respond = Responder(tiny_model)
    report = generate_missing(items, store, tiny_model, respond, batch_size=2, max_new_tokens=4, progress=False)
    assert (report.generated, report.failed, report.too_long, report.reused) == (2, 2, 1, 0)
    sent = [key for keys, _ in respond.batches for key in keys]
    assert sorted(sent) == ["a", "b"]  # the over-long prompt never reached the model
    rows = {row["key"]: row for row in store.rows()}
    assert rows["bad"]["response"] is None and rows["bad"]["error"] == "image not found: bad.png"
    assert rows["long"]["too_long"] is True and rows["long"]["response"] is None
    assert rows["long"]["error"].startswith("prompt longer than the model's context (")
    assert "> 512 positions" in rows["long"]["error"]
    # the rerun retries the error rows only; the item that builds now is generated
    items[1] = _item("bad", "Describe it")
    again = Responder(tiny_model)
    report = generate_missing(items, JsonlStore(tmp_path / "cache.jsonl"), tiny_model, again, batch_size=2,
                              max_new_tokens=4, progress=False)
    assert [keys for keys, _ in again.batches] == [["bad"]]
    assert (report.generated, report.failed, report.too_long, report.reused) == (1, 1, 1, 2)


def test_a_prompt_that_fits_but_leaves_no_room_to_answer_is_not_sent(tiny_model, tmp_path):
    text = "word " * 140
    length = tiny_model.prompt_lengths(*tiny_model.prepare_conversations([text], [None]))[0]
    assert length < 512
    respond = Responder(tiny_model)
    fits = generate_missing([_item("x", text)], JsonlStore(tmp_path / "a.jsonl"), tiny_model, respond,
                            batch_size=1, max_new_tokens=512 - length, progress=False)
    over = generate_missing([_item("x", text)], JsonlStore(tmp_path / "b.jsonl"), tiny_model, respond,
                            batch_size=1, max_new_tokens=513 - length, progress=False)
    assert (fits.generated, over.too_long) == (1, 1)


def test_batches_are_sorted_longest_first_across_a_group(tiny_model, tmp_path):
    texts = [" ".join(["w"] * (1 + (7 * i) % 23)) for i in range(12)]
    respond = Responder(tiny_model)
    generate_missing([_item(str(i), t) for i, t in enumerate(texts)], JsonlStore(tmp_path / "c.jsonl"), tiny_model,
                     respond, batch_size=3, max_new_tokens=2, progress=False)
    assert BATCHES_PER_GROUP * 3 >= len(texts)  # one group
    lengths = [n for _, batch in respond.batches for n in batch]
    assert [len(keys) for keys, _ in respond.batches] == [3, 3, 3, 3]
    assert lengths == sorted(lengths, reverse=True) and lengths[0] > lengths[-1]
    assert len(JsonlStore(tmp_path / "c.jsonl")) == 12


def test_every_batch_is_in_the_cache_before_the_next_starts(tiny_model, tmp_path):
    path = tmp_path / "d.jsonl"
    seen = []

    def respond(batch):
        seen.append(len(path.read_text().splitlines()) if path.exists() else 0)
        return [{**item.row, "response": "ok"} for item, _ in batch]

    generate_missing([_item(str(i), f"prompt {i}") for i in range(6)], JsonlStore(path), tiny_model, respond,
                     batch_size=2, max_new_tokens=2, progress=False)
    assert seen == [0, 2, 4]
    assert [json.loads(line)["response"] for line in path.read_text().splitlines()] == ["ok"] * 6


def test_chat_refuses_a_prompt_longer_than_the_context_in_one_line(tiny_model, tmp_path, capsys):
    from regap.cli import main
    from regap.models import save_model

    saved = str(save_model(tiny_model, tmp_path / "model", include_backbones=True))
    capsys.readouterr()
    assert main(["chat", LONG, "--model", saved, "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err.strip().split("\n")[-1]  # after the weight-loading bars
    assert err.startswith("error: prompt longer than the model's context (") and "shorten the prompt" in err
