"""The gap of the current input: how far this image's tokens sit from the model's text tokens,
layer by layer, next to the same distance for a typical training scene.

`regap gap` measures, at each layer, the centroid gap ||alpha (mu_image - mu_text)||^2 between
the image tokens and the text tokens of its pairs, after text-centric scaling (alpha = 1 / mean
text-token norm) and replacing norm outliers in each cloud (`regap.gap.mir.fit_layer`). Here the
text side is fixed per model: the text tokens of `regap gap`'s default pairs (synthetic scenes
with starter-benign texts, the reference protocol), collected once with `regap.gap.collect` and
kept as alpha and the cleaned text mean per layer (`TextStats`), in memory and under
`$REGAP_CACHE/playground/text_stats/`. One input's gap is then the same formula with this
image's tokens as the image side; for one pair whose text is the text side it is exactly
`regap gap`'s value. The scenes of those pairs give the typical value (the median per layer).

Hidden-state defenses (CMRM, layer0-align) change hidden states, so a side that runs them is
measured under their interventions, its text statistics too (`regap gap --defense`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from regap.gap.mir import replace_norm_outliers
from regap.provenance import json_hash

if TYPE_CHECKING:
    from regap.defenses.base import Defense
    from regap.gap.collect import HiddenStates
    from regap.models.gap_pair import GapPair
    from regap.models.lvlm import LVLM

#: `regap gap`'s default reference pairs, fewer of them: the text side's mean needs a few hundred
#: tokens, not the 100 pairs of the MIR protocol (which fit covariances), and this runs when a
#: model is first asked (8 pairs: ~160 text tokens, seconds for the tiny presets on a CPU).
REFERENCE = {"images": "scenes", "texts": "starter-benign", "pairs": 8, "seed": 0, "protocol": "reference",
             "text_tokens": "after-image", "n_sigma": 3.0}
FORMAT = 1
_DTYPE = torch.float64  # fit_layer's compute dtype


@dataclass
class TextStats:
    """Per layer (0 = the LLM input): alpha, the cleaned text tokens' mean, and the gap of a
    typical training scene (the median over the reference pairs' scenes)."""

    alpha: torch.Tensor  # [layers]
    text_mean: torch.Tensor  # [layers, d]
    scene_gap: torch.Tensor  # [layers]
    n_text_tokens: int
    n_scenes: int
    n_sigma: float = 3.0

    def gap(self, image_tokens: torch.Tensor, layer: int) -> float:
        """The centroid gap of one image's tokens [n, d] at `layer`."""
        return centroid_gap_to(image_tokens, self.alpha[layer], self.text_mean[layer], self.n_sigma)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"alpha": self.alpha, "text_mean": self.text_mean, "scene_gap": self.scene_gap}


@dataclass
class InputGap:
    """One input's gap per layer, and the typical training scene's, for the side's panel."""

    per_layer: list[float]
    scene_per_layer: list[float]
    n_image_tokens: int
    n_scenes: int
    defenses: list[str]

    @property
    def layer0(self) -> float:
        return self.per_layer[0]

    @property
    def scene_layer0(self) -> float:
        return self.scene_per_layer[0]

    def to_dict(self) -> dict[str, Any]:
        return {"layer0_gap": self.layer0, "scene_layer0_gap": self.scene_layer0, "per_layer": self.per_layer,
                "scene_per_layer": self.scene_per_layer, "n_image_tokens": self.n_image_tokens,
                "n_scenes": self.n_scenes, "defenses": self.defenses,
                "measure": "centroid gap, text-centric scaled, as regap gap's per-layer centroid_gap"}


def _cleaned_mean(tokens: torch.Tensor, n_sigma: float) -> torch.Tensor:
    """The mean of `tokens` [n, d] after norm outliers are replaced, in fit_layer's dtype and order
    of operations (a sum, then a division), so the numbers match `regap gap`'s."""
    cleaned = replace_norm_outliers(tokens.to(_DTYPE), n_sigma)
    return cleaned.sum(-2) / cleaned.shape[-2]


def centroid_gap_to(image_tokens: torch.Tensor, alpha: torch.Tensor, text_mean: torch.Tensor,
                    n_sigma: float = 3.0) -> float:
    """||alpha (mu_image - mu_text)||^2 for one image's tokens against fixed text statistics:
    `fit_layer`'s `centroid_gap` with the text side given."""
    return float(alpha**2 * (_cleaned_mean(image_tokens, n_sigma) - text_mean).square().sum())


def text_stats_from_hidden(store: HiddenStates, n_sigma: float = 3.0) -> TextStats:
    """TextStats from collected hidden states: the text tokens of all pairs, and each pair's
    image tokens for the typical scene."""
    alphas, means, scenes = [], [], []
    image_pairs = torch.from_numpy(store.image_pairs.astype(np.int64))
    n_text = 0
    for layer in range(store.n_layers):
        image, text = store.layer(layer)
        n_text = text.shape[0]
        alpha = 1.0 / text.to(_DTYPE).norm(dim=-1).mean()
        mean = _cleaned_mean(text, n_sigma)
        per_scene = [centroid_gap_to(image[image_pairs == p], alpha, mean, n_sigma) for p in range(store.n_pairs)]
        alphas.append(alpha)
        means.append(mean)
        scenes.append(float(np.median(per_scene)))
    return TextStats(torch.stack(alphas), torch.stack(means), torch.tensor(scenes, dtype=_DTYPE), n_text,
                     store.n_pairs, n_sigma)


def _collect(model: LVLM, pairs: list[GapPair], intervention: Callable[..., Any] | None,
             fn: Callable[[HiddenStates], Any]) -> Any:
    """Collect hidden states of `pairs` into a temporary folder, apply `fn`, remove the folder."""
    from regap.gap.collect import collect_hidden_states

    folder = Path(tempfile.mkdtemp(prefix="regap-playground-"))
    try:
        store = collect_hidden_states(model, pairs, folder / "hidden", protocol=REFERENCE["protocol"],
                                      text_tokens=REFERENCE["text_tokens"], progress=False,
                                      intervention=intervention)
        return fn(store)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def compute_text_stats(model: LVLM, pairs: list[GapPair] | None = None,
                       intervention: Callable[..., Any] | None = None) -> TextStats:
    """TextStats of `model` on `pairs` (default: the reference pairs), under `intervention`."""
    from regap.safety.pairs import make_pairs

    if pairs is None:
        pairs = make_pairs(REFERENCE["pairs"], images=REFERENCE["images"], texts=REFERENCE["texts"],
                           seed=REFERENCE["seed"])
    return _collect(model, pairs, intervention, lambda store: text_stats_from_hidden(store, REFERENCE["n_sigma"]))


def image_tokens_per_layer(model: LVLM, image: Image.Image, text: str,
                           intervention: Callable[..., Any] | None = None) -> list[torch.Tensor]:
    """This image's tokens at every layer, as the reference protocol collects them (the image in
    the user turn, `text` after it; image tokens come before the text, so it does not change them)."""
    from regap.models.gap_pair import GapPair

    pair = GapPair("input", image, text or "-", "playground")

    def layers(store: HiddenStates) -> list[torch.Tensor]:
        return [store.layer(k)[0] for k in range(store.n_layers)]

    return _collect(model, [pair], intervention, layers)


class GapPanel:
    """Text statistics per (model fingerprint, hidden-state defenses), computed once: in memory
    for the process, on disk under the regap cache across runs. Thread-safe."""

    def __init__(self, cache_folder: Path | None = None) -> None:
        self._memory: dict[str, TextStats] = {}
        self._lock = threading.Lock()
        self._cache_folder = cache_folder

    def _folder(self) -> Path:
        from regap.cache import cache_dir

        return self._cache_folder if self._cache_folder is not None else cache_dir("playground", "text_stats")

    @staticmethod
    def key(fingerprint: str, defenses: Sequence[Defense]) -> str:
        return json_hash({"format": FORMAT, "model": fingerprint, "reference": REFERENCE,
                          "defenses": [d.describe() for d in defenses]})

    def text_stats(self, model: LVLM, fingerprint: str, defenses: Sequence[Defense] = (),
                   intervention: Callable[..., Any] | None = None) -> TextStats:
        """The model's TextStats under these (prepared) hidden-state defenses."""
        key = self.key(fingerprint, defenses)
        with self._lock:
            if key in self._memory:
                return self._memory[key]
        path = self._folder() / f"{key}.safetensors"
        stats = _read(path)
        if stats is None:
            stats = compute_text_stats(model, intervention=intervention)
            _write(path, stats, {"model_fingerprint": fingerprint, "reference": REFERENCE,
                                 "defenses": [d.describe() for d in defenses]})
        with self._lock:
            self._memory[key] = stats
        return stats

    def input_gap(self, model: LVLM, fingerprint: str, image: Image.Image, text: str,
                  defenses: Sequence[Defense] = ()) -> InputGap:
        """The gap of `image` per layer next to a typical training scene's, for this model under
        its hidden-state `defenses` (the others do not change hidden states and are left out)."""
        from regap.defenses.base import hidden_state_intervention

        hidden = [d for d in defenses if d.hidden_state]
        intervention = hidden_state_intervention(hidden, model) if hidden else None
        stats = self.text_stats(model, fingerprint, hidden, intervention)
        tokens = image_tokens_per_layer(model, image, text, intervention)
        return InputGap([stats.gap(layer_tokens, k) for k, layer_tokens in enumerate(tokens)],
                        [float(v) for v in stats.scene_gap], int(tokens[0].shape[0]), stats.n_scenes,
                        [d.name for d in hidden])


def _read(path: Path) -> TextStats | None:
    """Cached TextStats, or None when absent or unreadable (then they are computed again)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            record = json.loads(handle.metadata()["regap"])
            tensors = {name: handle.get_tensor(name) for name in ("alpha", "text_mean", "scene_gap")}
    except (SafetensorError, OSError, KeyError, ValueError):
        return None
    return TextStats(tensors["alpha"], tensors["text_mean"], tensors["scene_gap"], int(record["n_text_tokens"]),
                     int(record["n_scenes"]), float(record["n_sigma"]))


def _write(path: Path, stats: TextStats, record: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    from regap.files import atomic_path
    from regap.provenance import provenance

    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = provenance(**record, n_text_tokens=stats.n_text_tokens, n_scenes=stats.n_scenes,
                          n_sigma=stats.n_sigma)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in stats.to_tensors().items()}, str(tmp),
                  metadata={"regap": json.dumps(metadata, sort_keys=True, default=str)})


def plot_gap(gaps: dict[str, InputGap]):
    """A small figure: the centroid gap per layer of this input and of a typical training scene,
    per side (log scale: the layer-0 gap of a plain model is orders of magnitude above the rest)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 2.8), layout="constrained")
    axis = figure.add_subplot()
    for (label, gap), color in zip(gaps.items(), ("tab:blue", "tab:orange")):
        layers = list(range(len(gap.per_layer)))
        axis.plot(layers, gap.per_layer, marker="o", markersize=2.5, color=color, label=f"{label}: this input")
        axis.plot(layers, gap.scene_per_layer, linestyle="--", color=color, alpha=0.7,
                  label=f"{label}: typical scene")
    axis.set_yscale("log")
    axis.set_title("centroid gap per layer", fontsize=9)
    axis.set_xlabel("layer (0 = LLM input)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    return figure
