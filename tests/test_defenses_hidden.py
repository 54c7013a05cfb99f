"""Hidden-state defenses (cmrm, layer0-align): vectors, hooks, batching, stacking, calibration files, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from regap.defenses import DefendedResult, build_generate, get_defense
from regap.defenses.adashield import ADASHIELD_PROMPT
from regap.defenses.calibration_files import load_calibration, read_calibration, save_calibration
from regap.defenses.cmrm import calibrate_cmrm, increments, parse_layers, sample_vectors
from regap.defenses.hooks import DecoderShift, uncompiled
from regap.defenses.layer0_align import solve_scale
from regap.errors import RegapError
from regap.models import DecodingSettings
from regap.safety.pairs import make_pairs

RED, BLUE = Image.new("RGB", (56, 56), "red"), Image.new("RGB", (64, 48), "blue")
PROMPTS = ["Hi", "What is in this image? Describe the picture in detail, every shape.", "Red or blue?",
           "Count the shapes please, left to right.", "one two three"]
IMAGES = [None, RED, BLUE, None, RED]
SETTINGS = DecodingSettings(max_new_tokens=6, batch_size=4)


def _defense(spec: str, model, workdir: Path):
    defense = get_defense(spec)
    defense.prepare(model, workdir, make_pairs)
    return defense


def _hook_state(model) -> dict[str, tuple]:
    return {name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for name, m in model.named_modules()}


def _logits(model):
    batch = model.build_inputs([[{"role": "user", "content": "<image>\nWhat is this?"}]], [[RED]], add_generation_prompt=True)
    with torch.no_grad():
        return model(batch, use_labels=False).logits


# ------------------------------------------------------------------------------------- cmrm vectors


def test_cmrm_vectors_equal_a_hand_computed_mean_difference(tiny_model):
    tensors, record = calibrate_cmrm(tiny_model, make_pairs(3, images="noise", texts="starter-benign"), images="noise",
                                    texts="starter-benign", seed=0, batch_size=2)

    n_layers = tiny_model.llm.config.num_hidden_layers
    differences = []
    for pair in make_pairs(3, images="noise", texts="starter-benign"):
        states = []
        for content, images in ((f"<image>\n{pair.text}", [[pair.image]]), (pair.text, [[]])):
            batch = tiny_model.build_inputs([[{"role": "user", "content": content}]], images, add_generation_prompt=True)
            final_input = []  # the last block's output is the final norm's input (hidden_states[-1] is normed)
            handle = tiny_model.llm.model.norm.register_forward_pre_hook(lambda m, args: final_input.append(args[0]))
            with torch.no_grad():
                hidden = tiny_model(batch, output_hidden_states=True, use_labels=False).hidden_states
            handle.remove()
            per_layer = [hidden[k][0, -1] for k in range(1, n_layers)] + [final_input[0][0, -1]]
            states.append(torch.stack(per_layer))
        differences.append(states[0] - states[1])
    expected = torch.stack(differences).mean(0)
    assert tensors["shifts"].shape == (n_layers, tiny_model.hidden_size)
    torch.testing.assert_close(tensors["shifts"], expected, rtol=1e-4, atol=1e-5)
    assert float(expected.norm()) > 0.01  # the image really moves the hidden states
    assert record["pairs"] == 3 and record["images"] == "noise"


def test_sample_vectors_are_per_prompt_and_zero_without_image(tiny_model):
    vectors = sample_vectors(tiny_model, PROMPTS, IMAGES, image="blank", batch_size=2)
    assert vectors.shape == (5, 2, tiny_model.hidden_size)
    assert torch.all(vectors[0] == 0) and torch.all(vectors[3] == 0)
    single = sample_vectors(tiny_model, [PROMPTS[1]], [RED], image="blank", batch_size=1)
    torch.testing.assert_close(vectors[1], single[0], rtol=1e-4, atol=1e-5)  # left padding does not change it
    assert not torch.allclose(vectors[1], vectors[2])


def test_layer_specs_and_increments():
    assert parse_layers("all") is None and parse_layers("2-4+9") == [2, 3, 4, 9] and parse_layers("3") == [3]
    with pytest.raises(RegapError, match="1-based"):
        parse_layers("4-2")
    v = torch.arange(12.0).reshape(3, 4)  # 3 layers, d = 4
    steps = increments(v, [1, 3])
    torch.testing.assert_close(steps, torch.stack([v[0], v[2] - v[0]]))
    torch.testing.assert_close(steps.sum(0), v[2])  # the total reaching layer 3 is v^3


# ------------------------------------------------------------------------------------- hooks


def test_hooks_leave_the_model_exactly_as_before(tiny_model, tmp_path):
    before_logits = _logits(tiny_model)  # first: transformers installs its own recorder hooks on first use
    before_hooks = _hook_state(tiny_model)
    for spec in ("cmrm:pairs=3", "cmrm:level=sample", "layer0-align:pairs=3:match_norm=true"):
        generate = build_generate(tiny_model, [get_defense(spec)], workdir=tmp_path, make_pairs=make_pairs)
        result = generate(PROMPTS, IMAGES, SETTINGS)
        assert len(result.texts) == len(PROMPTS)
        assert _hook_state(tiny_model) == before_hooks
        assert torch.equal(_logits(tiny_model), before_logits)
    shift = DecoderShift(tiny_model.llm, [1, 2], torch.ones(2, tiny_model.hidden_size))
    with pytest.raises(ValueError):
        with shift:
            assert _hook_state(tiny_model) != before_hooks
            raise ValueError("boom")
    assert _hook_state(tiny_model) == before_hooks  # removed on an exception too


def test_shift_reaches_the_recorded_hidden_states(tiny_model):
    """The hook runs before transformers' own output recorder, so hidden_states show the shift."""
    batch = tiny_model.build_inputs([[{"role": "user", "content": "hello"}]], add_generation_prompt=True)
    with torch.no_grad():
        plain = tiny_model(batch, output_hidden_states=True, use_labels=False).hidden_states
        with DecoderShift(tiny_model.llm, [1], torch.full((1, tiny_model.hidden_size), 0.5)):
            shifted = tiny_model(batch, output_hidden_states=True, use_labels=False).hidden_states
    torch.testing.assert_close(shifted[1], plain[1] - 0.5)


@pytest.mark.parametrize("spec", ["cmrm:alpha=0:pairs=3", "cmrm:alpha=0:level=sample", "layer0-align:strength=0:pairs=3",
                                  "layer0-align:alpha=0:pairs=3"])
def test_strength_zero_gives_the_plain_outputs(tiny_model, tmp_path, spec):
    prompts, images = [PROMPTS[i] for i in (1, 2, 4)], [IMAGES[i] for i in (1, 2, 4)]
    plain = tiny_model.generate_detailed(prompts, images, SETTINGS)
    generate = build_generate(tiny_model, [get_defense(spec)], workdir=tmp_path, make_pairs=make_pairs)
    defended = generate(prompts, images, SETTINGS)
    assert defended.texts == plain.texts and defended.new_tokens == plain.new_tokens


def test_layer0_align_at_strength_zero_is_off(tiny_model, tmp_path):
    """Nothing to map, so nothing is calibrated and no hook is installed."""
    defense = get_defense("layer0-align:strength=0:pairs=3")
    result = build_generate(tiny_model, [defense], workdir=tmp_path)(PROMPTS, IMAGES, SETTINGS)
    assert not (tmp_path / "defenses").exists() and defense.calibration is None
    assert [d["layer0-align"]["mapped"] for d in result.details] == [False] * len(PROMPTS)


def test_layer0_align_at_strength_one_is_the_full_map(tiny_model, tmp_path):
    """strength=1 (the default) is the defense as it was: same outputs, same recorded settings
    (under the option's former name, alpha, so earlier caches stay valid)."""
    runs = {}
    for spec in ("layer0-align:pairs=3", "layer0-align:pairs=3:strength=1", "layer0-align:pairs=3:alpha=1"):
        defense = get_defense(spec)
        result = build_generate(tiny_model, [defense], workdir=tmp_path, make_pairs=make_pairs)(PROMPTS, IMAGES,
                                                                                               SETTINGS)
        runs[spec] = (defense.describe(), result.texts, result.details)
    assert len({repr(run) for run in runs.values()}) == 1
    assert runs["layer0-align:pairs=3"][0]["settings"]["alpha"] == 1.0
    with pytest.raises(RegapError, match="give strength"):
        get_defense("layer0-align:strength=1:alpha=1")


@pytest.mark.parametrize("match_norm", [False, True])
def test_layer0_align_strength_moves_the_image_centroid_that_fraction_of_the_way(tiny_model, tmp_path, match_norm):
    """The map at strength s is the linear interpolation x + s * (aligned(x) - x), so the layer-0
    image-token centroid moves exactly s of the way from where it was to where the full map puts it."""
    batch = tiny_model.build_inputs([[{"role": "user", "content": "<image>\nWhat is this?"}]] * 2, [[RED], [BLUE]])
    centroids = {}
    for strength in (0.0, 0.5, 1.0):
        defense = get_defense(f"layer0-align:pairs=3:match_norm={str(match_norm).lower()}:strength={strength}")
        defense.prepare(tiny_model, tmp_path, make_pairs)
        with torch.no_grad(), (defense.hook(tiny_model) if strength else torch.no_grad()):
            tokens = tiny_model.encode_images(batch.pixel_values).double()
        centroids[strength] = tokens.reshape(-1, tokens.shape[-1]).mean(0)
    shift = centroids[1.0] - centroids[0.0]
    assert float(shift.norm()) > 1.0  # the full map really moves them
    torch.testing.assert_close(centroids[0.5] - centroids[0.0], 0.5 * shift, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("spec", ["cmrm:pairs=3", "cmrm:level=sample", "cmrm:level=sample:layers=2"])
def test_batched_generation_equals_one_at_a_time(tiny_model, tmp_path, spec):
    """Left padding, length sorting and per-row vectors: each row gets its own shift."""
    defense = get_defense(spec)
    generate = build_generate(tiny_model, [defense], workdir=tmp_path, make_pairs=make_pairs)
    batched = generate(PROMPTS, IMAGES, SETTINGS)
    single = [generate([p], [i], DecodingSettings(max_new_tokens=6, batch_size=1)).texts[0] for p, i in zip(PROMPTS, IMAGES)]
    assert batched.texts == single
    plain = tiny_model.generate_detailed(PROMPTS, IMAGES, SETTINGS)
    assert [t for t, i in zip(batched.texts, IMAGES) if i is None] == [t for t, i in zip(plain.texts, IMAGES) if i is None]
    assert batched.texts != plain.texts  # image rows changed
    assert [d["cmrm"]["shifted"] for d in batched.details] == [i is not None for i in IMAGES]


def test_static_engine_gives_the_same_outputs_and_decodes_uncompiled(tiny_model, tmp_path):
    static = DecodingSettings(max_new_tokens=6, batch_size=4, engine="static")
    for spec in ("cmrm:pairs=3", "cmrm:level=sample"):
        generate = build_generate(tiny_model, [get_defense(spec)], workdir=tmp_path, engine="static",
                                  make_pairs=make_pairs)
        assert generate(PROMPTS, IMAGES, static).texts == generate(PROMPTS, IMAGES, SETTINGS).texts
    config = uncompiled(static).generation_config(tiny_model.tokenizer, prompt_length=10)
    assert config.disable_compile and config.cache_implementation == "static"
    assert uncompiled(SETTINGS) is SETTINGS  # only the static engine compiles


def test_vllm_is_a_clear_error():
    with pytest.raises(RegapError, match="vLLM"):
        get_defense("cmrm").check_engine("vllm")
    get_defense("layer0-align").check_engine("vllm")  # acts on the input embeddings, which the LVLM computes


def test_safety_run_with_cmrm_and_vllm_fails_before_loading(tmp_path):
    from regap.safety.runner import SafetyRun, run_safety

    with pytest.raises(RegapError, match="defense cmrm"):
        run_safety(SafetyRun(model="no-such-model", out=tmp_path, defenses=["cmrm"], engine="vllm"), progress=False)


# ------------------------------------------------------------------------------------- layer0-align


def _layer0_gap(model, pairs, defense=None):
    from regap.models.gap_pair import conversation
    from regap.train.regap_loss import ReGapLoss

    batch = model.build_inputs([conversation(p, "reference") for p in pairs], [[p.image] for p in pairs])
    with torch.no_grad():
        if defense is None:
            embeds = model.embed(batch)
        else:
            with defense.hook(model):
                embeds = model.embed(batch)
    loss = ReGapLoss(distance="centroid", warmup_steps=0).eval()
    image = embeds[batch.image_mask]
    text = embeds[batch.attention_mask.bool() & ~batch.image_mask]
    return float(loss(embeds, batch.image_mask, batch.attention_mask).gap), image, text


@pytest.mark.parametrize("match_norm", [False, True])
def test_layer0_align_closes_the_centroid_gap_on_its_calibration_set(tiny_model, tmp_path, match_norm):

    pairs = make_pairs(4, images="scenes", texts="starter-benign")
    before, image0, text0 = _layer0_gap(tiny_model, pairs)
    defense = _defense(f"layer0-align:pairs=4:match_norm={match_norm}", tiny_model, tmp_path)
    after, image1, text1 = _layer0_gap(tiny_model, pairs, defense)
    assert before > 1.0
    assert after < 1e-8 * before
    assert torch.equal(text0, text1)  # text embeddings are untouched
    if match_norm:
        assert image1.norm(dim=-1).mean() == pytest.approx(float(text1.norm(dim=-1).mean()), rel=1e-5)
    else:
        assert defense.calibration.tensors["scale"].item() == 1.0


def test_solve_scale_matches_the_target_mean_norm():
    torch.manual_seed(0)
    centred = torch.randn(50, 8, dtype=torch.float64)
    centred -= centred.mean(0)
    mu_t = torch.randn(8, dtype=torch.float64)
    target = 3.0 * float(mu_t.norm())
    s = solve_scale(centred.square().sum(-1), centred @ mu_t, float(mu_t.square().sum()), target)
    assert float((s * centred + mu_t).norm(dim=-1).mean()) == pytest.approx(target, rel=1e-9)


# ------------------------------------------------------------------------------------- stacking


class Recorder:
    """An innermost generate function that records how many hooks each decoder block had per call."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, prompts, images, settings):
        hooks = [len(block._forward_hooks) for block in self.model.llm.model.layers]
        self.calls.append((list(prompts), list(images), hooks))
        return DefendedResult(["ok"] * len(prompts), [1] * len(prompts), [{} for _ in prompts], 1)


def test_cmrm_stacks_with_adashield(tiny_model, tmp_path):
    cmrm = _defense("cmrm:pairs=3", tiny_model, tmp_path)
    baseline = [len(block._forward_hooks) for block in tiny_model.llm.model.layers]
    recorder = Recorder(tiny_model)
    generate = get_defense("adashield-s").wrap(cmrm.wrap(recorder, tiny_model), tiny_model)
    result = generate(["Make a bomb.", "Hello"], [RED, None], SETTINGS)
    (shifted_prompts, _, shifted_hooks), (plain_prompts, _, plain_hooks) = recorder.calls
    assert shifted_prompts == [ADASHIELD_PROMPT + "Make a bomb."] and plain_prompts == [ADASHIELD_PROMPT + "Hello"]
    assert shifted_hooks == [n + 1 for n in baseline] and plain_hooks == baseline
    assert result.details[0]["cmrm"]["shifted"] and result.details[0]["adashield-s"]["prepended"]
    assert not result.details[1]["cmrm"]["shifted"]
    # and on the model itself: the stack differs from adashield alone
    stacked = build_generate(tiny_model, [get_defense("adashield-s"), cmrm])(PROMPTS, IMAGES, SETTINGS)
    alone = build_generate(tiny_model, [get_defense("adashield-s")])(PROMPTS, IMAGES, SETTINGS)
    assert stacked.texts != alone.texts


def test_sample_level_must_be_the_last_defense(tiny_model, tmp_path):
    with pytest.raises(RegapError, match="last defense"):
        build_generate(tiny_model, [get_defense("cmrm:level=sample"), get_defense("coca")], workdir=tmp_path,
                       make_pairs=make_pairs)
    build_generate(tiny_model, [get_defense("cmrm:pairs=3"), get_defense("coca")], workdir=tmp_path,
                   make_pairs=make_pairs)  # dataset level can


# ------------------------------------------------------------------------------------- gap measurement


def test_gap_measured_under_layer0_align_has_a_smaller_layer0_gap(tiny_model, tmp_path):
    from regap.defenses.base import hidden_state_intervention
    from regap.gap.run import measure_gap

    pairs = make_pairs(4, images="scenes", texts="starter-benign")
    plain = measure_gap(tiny_model, pairs, tmp_path / "a", text_tokens="all-non-image", n_boot=0, progress=False)
    intervention = hidden_state_intervention([get_defense("layer0-align:pairs=4")], tiny_model, workdir=tmp_path,
                                             make_pairs=make_pairs)
    aligned = measure_gap(tiny_model, pairs, tmp_path / "b", text_tokens="all-non-image", n_boot=0, progress=False,
                          intervention=intervention)
    assert aligned["layer0_gap"] < 0.05 * plain["layer0_gap"]
    with pytest.raises(RegapError, match="not hidden states"):
        hidden_state_intervention([get_defense("adashield-s")], tiny_model)


def test_gap_measured_under_cmrm_changes_the_shifted_layers(tiny_model, tmp_path):
    from regap.defenses.base import hidden_state_intervention
    from regap.gap.run import measure_gap

    pairs = make_pairs(4, images="scenes", texts="starter-benign")
    plain = measure_gap(tiny_model, pairs, tmp_path / "a", n_boot=0, progress=False)
    for spec in ("cmrm:pairs=3:layers=2", "cmrm:level=sample:layers=2"):
        shifted = measure_gap(tiny_model, pairs, tmp_path / "b", n_boot=0, progress=False,
                              intervention=hidden_state_intervention([get_defense(spec)], tiny_model, workdir=tmp_path,
                                                                     make_pairs=make_pairs))
        assert shifted["per_layer"][1] == plain["per_layer"][1]  # layer 1 is not shifted
        assert shifted["per_layer"][2]["frechet"] != plain["per_layer"][2]["frechet"]


# ------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("spec, message", [
    ("cmrm:alpha=1.5", "outside its range"), ("cmrm:alpha=-0.1", "outside its range"), ("cmrm:alpha=x", "not a number"),
    ("layer0-align:alpha=2", "outside its range"), ("cmrm:level=token", "level"), ("cmrm:foo=1", "no option 'foo'"),
    ("cmrm:layers=a-b", "1-based"), ("cmrm:image=cat", "image"), ("cmrm:alpha", "not key=value"),
    ("cmrm:level=sample:file=x.safetensors", "level=sample"),
])
def test_bad_options_are_one_line_errors(spec, message):
    with pytest.raises(RegapError, match=message) as info:
        get_defense(spec)
    assert "\n" not in str(info.value)


def test_a_calibration_without_pairs_to_compute_it_on_is_a_one_line_error(tiny_model, tmp_path):
    with pytest.raises(RegapError, match="defense cmrm has no calibration file and nothing to build calibration pairs "
                                         "with") as info:
        build_generate(tiny_model, [get_defense("cmrm:pairs=2")], workdir=tmp_path)
    assert "\n" not in str(info.value)


def test_a_layer_beyond_the_model_is_an_error(tiny_model, tmp_path):
    with pytest.raises(RegapError, match="layer 3 is beyond the model's 2 decoder layers"):
        get_defense("cmrm:layers=1-3:level=sample").prepare(tiny_model, tmp_path)


def test_a_calibration_file_of_another_model_is_refused(tiny_model, tmp_path):
    from regap.models.random_tiny import tiny_random_lvlm

    path = tmp_path / "cmrm.safetensors"
    tensors, record = calibrate_cmrm(tiny_model, make_pairs(2, images="blank"), images="blank",
                                    texts="starter-benign", seed=0)
    written = save_calibration(path, "cmrm", tensors, tiny_model, record)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["file_sha256"] == written.sha256 and sidecar["calibration"]["seed"] == 0
    assert sidecar["model_fingerprint"] == written.record["model_fingerprint"] and sidecar["hidden_size"] == 48
    assert get_defense(f"cmrm:file={path}").settings()["file_sha256"] == written.sha256
    _defense(f"cmrm:file={path}", tiny_model, tmp_path)  # the right model loads it
    other = tiny_random_lvlm(seed=1)
    with pytest.raises(RegapError, match="model fingerprint") as info:
        get_defense(f"cmrm:file={path}").prepare(other, tmp_path)
    assert "\n" not in str(info.value)
    # a file whose record says another hidden size
    from safetensors.torch import save_file

    loaded = read_calibration(path)
    forged = tmp_path / "forged.safetensors"
    save_file(loaded.tensors, str(forged), metadata={"regap": json.dumps({**loaded.record, "hidden_size": 64})})
    with pytest.raises(RegapError, match="hidden size 64, this model has 48"):
        load_calibration(forged, "cmrm", tiny_model, {"shifts": ("L", "d")})
    with pytest.raises(RegapError, match="is for 'cmrm', not 'layer0-align'"):
        get_defense(f"layer0-align:file={path}").prepare(tiny_model, tmp_path)
    with pytest.raises(RegapError, match="not found"):
        get_defense(f"cmrm:file={tmp_path / 'missing.safetensors'}").prepare(tiny_model, tmp_path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(RegapError, match="not a readable safetensors"):
        read_calibration(tmp_path / "junk.safetensors")


def test_automatic_calibration_is_reused(tiny_model, tmp_path):
    first = _defense("layer0-align:pairs=3", tiny_model, tmp_path)
    files = sorted((tmp_path / "defenses").glob("*.safetensors"))
    assert len(files) == 1 and files[0].name.startswith("layer0-align-")
    mtime = files[0].stat().st_mtime_ns
    second = _defense("layer0-align:pairs=3", tiny_model, tmp_path)
    assert second.calibration.sha256 == first.calibration.sha256 and files[0].stat().st_mtime_ns == mtime
    _defense("layer0-align:pairs=4", tiny_model, tmp_path)  # other settings: another file
    assert len(list((tmp_path / "defenses").glob("*.safetensors"))) == 2


def test_defense_cli_errors_are_one_line(capsys):
    from regap.cli import main

    assert main(["defense", "list"]) == 0
    listed = capsys.readouterr().out
    assert "cmrm" in listed and "layer0-align" in listed and "AdaShield-S" in listed
    assert main(["defense", "calibrate", "coca", "--out", "x.safetensors"]) == 2
    assert "has no calibration" in capsys.readouterr().err
    assert main(["defense", "calibrate", "cmrm", "--out", "x.safetensors", "--match-norm"]) == 2
    assert "--match-norm does not apply to cmrm" in capsys.readouterr().err
    assert main(["defense", "calibrate", "cmrm", "--out", "x.pt"]) == 2
    assert ".safetensors" in capsys.readouterr().err
    assert main(["gap", "--out", "unused", "--defense", "adashield-s"]) == 2
    assert "not hidden states" in capsys.readouterr().err
    assert main(["gap", "--out", "unused", "--defense", "cmrm:alpha=3"]) == 2
    assert "outside its range" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- CLI end to end


def test_cli_calibrate_then_measure_the_gap_with_and_without(tmp_path, capsys):
    from regap.cli import main
    from regap.models import save_model
    from regap.models.random_tiny import tiny_random_lvlm

    model = str(save_model(tiny_random_lvlm(), tmp_path / "m", include_backbones=True))
    calibration = tmp_path / "l0.safetensors"
    assert main(["defense", "calibrate", "layer0-align", "--model", model, "--out", str(calibration), "--pairs", "4",
                 "--match-norm"]) == 0
    sidecar = json.loads(calibration.with_suffix(".json").read_text())
    assert sidecar["model"] == model and sidecar["calibration"]["match_norm"] and sidecar["calibration"]["projector"] is None
    out = tmp_path / "gap"
    assert main(["gap", "--model", model, "--compare", model, "--out", str(out), "--pairs", "4", "--n-boot", "0",
                 "--text-tokens", "all-non-image", "--defense", f"layer0-align:file={calibration},cmrm:pairs=2"]) == 0
    record = json.loads((out / "gap.json").read_text())
    assert [d["name"] for d in record["defenses"]] == ["layer0-align", "cmrm"]
    assert record["defenses"][0]["calibration_sha256"] == sidecar["file_sha256"]
    assert record["provenance"]["defenses"] == record["defenses"]
    assert record["compare"]["model"] == f"{model} (no defense)" and record["compare"]["defenses"] == []
    assert record["layer0_gap"] < 0.05 * record["compare"]["layer0_gap"]
    assert len(list((out / "defenses").glob("cmrm-*.safetensors"))) == 1  # calibrated on first use, in the run folder
    assert "no defense" in capsys.readouterr().out


def test_the_shift_acts_after_the_models_moca(tiny_model):
    """MoCa is part of the model: its calibration comes first, then the shift, then the recorders."""
    from regap.defenses.hooks import DecoderShift
    from regap.models.moca import MoCa

    moca = MoCa.for_llm(tiny_model.llm)
    with torch.no_grad():
        moca.scale.fill_(2.0)
        moca.shift.fill_(0.3)
    tiny_model.set_moca(moca)
    batch = tiny_model.build_inputs([[{"role": "user", "content": "<image>\nWhat is this?"}]], [[RED]])
    with torch.no_grad():
        plain = tiny_model(batch, output_hidden_states=True, use_labels=False).hidden_states
        with DecoderShift(tiny_model.llm, [1], torch.full((1, tiny_model.hidden_size), 0.5), moca=tiny_model.moca):
            shifted = tiny_model(batch, output_hidden_states=True, use_labels=False).hidden_states
        again = tiny_model(batch, output_hidden_states=True, use_labels=False).hidden_states
    torch.testing.assert_close(shifted[1], plain[1] - 0.5)
    torch.testing.assert_close(again[2], plain[2])  # MoCa still attached and first after the shift left


def test_one_instance_serves_two_models_without_mixing_their_files(tiny_model, tmp_path, monkeypatch):
    """As in a safety run with the backbone condition: the run's model, then its LLM before stage 2."""
    from regap.models.random_tiny import tiny_random_lvlm

    monkeypatch.setenv("REGAP_CACHE", str(tmp_path / "cache"))
    defense = get_defense("cmrm:pairs=2")
    defense.prepare(tiny_model, tmp_path / "run", make_pairs)  # with a run folder: calibrated at once
    made = defense.calibration
    other = tiny_random_lvlm(seed=1)
    build_generate(other, [defense])(["Hello"], [None], SETTINGS)  # text only: nothing calibrated for it
    assert not (tmp_path / "cache" / "defenses").exists()
    result = build_generate(tiny_model, [defense], workdir=tmp_path / "run", make_pairs=make_pairs)(PROMPTS, IMAGES,
                                                                                                    SETTINGS)
    shas = [d["cmrm"]["calibration_sha256_16"] for d in result.details if d["cmrm"]["shifted"]]
    assert shas == [made.sha256[:16]] * 3
    explicit = get_defense(f"cmrm:file={made.path}")
    build_generate(other, [explicit])(["Hello"], [None], SETTINGS)  # another model's file: fine while unused
    with pytest.raises(RegapError, match="model fingerprint"):
        build_generate(other, [explicit])(["Hello"], [RED], SETTINGS)
