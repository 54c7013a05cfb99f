"""Data for the training loops: a robust sample view, a resumable step-wise sampler, a collator.

* :class:`TrainSamples` wraps a `LlavaJsonDataset`. An image that fails to decode at
  load time (a corrupt file) is skipped and recorded, and the next sample of the data
  takes its place, so batches keep their size (which data parallelism needs).
* :class:`StepSampler` gives every process its part of every micro-batch, in a seeded
  order that is a pure function of (seed, epoch), so a resumed run can start at any
  optimizer step without reading the skipped samples. Optimizer step ``s`` of an
  epoch uses the samples ``order[s*G:(s+1)*G]`` (G = global batch) whatever the number
  of processes or the accumulation layout; an incomplete last step is dropped.
* :class:`Collator` turns samples into a `ModelInputs` batch with the training
  template; over-long conversations are truncated (counted, with a warning).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from regap.data.llava_json import ConversationSample, LlavaJsonDataset
from regap.errors import RegapError
from regap.models.inputs import ModelInputs

if TYPE_CHECKING:
    from regap.models.lvlm import LVLM

#: How many following samples are tried when images fail to decode one after another.
MAX_REPLACEMENTS = 16


@dataclass
class LoadedSample:
    index: int
    sample: ConversationSample
    skipped: list[dict[str, Any]] = field(default_factory=list)  # corrupt images met on the way


class TrainSamples(Dataset):
    """Samples of a `LlavaJsonDataset`; corrupt images are replaced by the next good sample."""

    def __init__(self, dataset: LlavaJsonDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> LoadedSample:
        skipped: list[dict[str, Any]] = []
        n = len(self.dataset)
        for attempt in range(min(MAX_REPLACEMENTS, n)):
            position = (index + attempt) % n
            try:
                return LoadedSample(position, self.dataset[position], skipped)
            except RegapError as exc:  # corrupt or unreadable image (load_image names the file)
                paths = self.dataset.image_paths()
                skipped.append({"index": position, "image": paths[position], "reason": str(exc).splitlines()[0]})
        raise RegapError(
            f"{len(skipped)} images in a row failed to load starting at sample {index} "
            f"(first: {skipped[0]['image']}: {skipped[0]['reason']}); check the image root"
        )


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The seeded sample order of one epoch (independent of any global RNG state)."""
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=generator).tolist()


class StepSampler(Sampler[list[int]]):
    """Yields this process's index lists, micro-batch by micro-batch, from a given step on."""

    def __init__(self, n: int, *, global_batch: int, per_device: int, accumulation: int, num_processes: int,
                 process_index: int, seed: int, epoch: int, start_step: int = 0, shuffle: bool = True) -> None:
        if per_device * accumulation * num_processes != global_batch:
            raise RegapError("per_device x accumulation x processes must equal the global batch")
        self.order = epoch_order(n, seed, epoch) if shuffle else list(range(n))
        self.global_batch, self.per_device = global_batch, per_device
        self.accumulation, self.num_processes, self.process_index = accumulation, num_processes, process_index
        self.steps = n // global_batch
        self.start_step = start_step

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step) * self.accumulation

    def __iter__(self) -> Iterator[list[int]]:
        micro = self.per_device * self.num_processes
        for step in range(self.start_step, self.steps):
            chunk = self.order[step * self.global_batch: (step + 1) * self.global_batch]
            for m in range(self.accumulation):
                part = chunk[m * micro: (m + 1) * micro]
                yield part[self.process_index * self.per_device: (self.process_index + 1) * self.per_device]


@dataclass
class TrainBatch:
    inputs: ModelInputs
    ids: list[str]
    skipped: list[dict[str, Any]]
    truncated: int
    n_samples: int
    image_keys: list[str] | None = None  # per image, for the frozen-feature cache (when asked for)


class Collator:
    """Samples -> `TrainBatch` (right padding, the training template, max length).

    It builds the batch with the model's `InputBuilder` (the steps of `LVLM.build_inputs`),
    which keeps only the tokenizer, the image processor and the token count per image (not
    the model), so DataLoader workers can run it under any start method. Truncated
    conversations are counted (`BuiltBatch.truncated`); the loop warns once.
    """

    def __init__(self, model: LVLM, template: str | None, max_length: int | None, image_keys: bool = False) -> None:
        self.builder = model.input_builder()
        self.template = template
        self.max_length = max_length
        self.image_keys = image_keys

    def __call__(self, items: Sequence[LoadedSample]) -> TrainBatch:
        conversations = [[dict(m) for m in item.sample.messages] for item in items]
        images = [[item.sample.image] if item.sample.image is not None else [] for item in items]
        built = self.builder(conversations, images, template=self.template, add_generation_prompt=False,
                             padding_side="right", max_length=self.max_length)
        skipped = [entry for item in items for entry in item.skipped]
        keys = None
        if self.image_keys:
            from regap.models.feature_cache import image_key

            keys = [image_key(image) for sample in images for image in sample]
        return TrainBatch(built.inputs, [item.sample.id for item in items], skipped, built.n_truncated, len(items),
                          keys)


def identity_collate(items: Sequence[Any]) -> list[Any]:
    return list(items)
