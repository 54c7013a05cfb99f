"""One typed-config loader (`regap.config`) for the training and the study configs: the same strict
rules in both, one override parser, one-line errors naming the key, the type and the source."""

from __future__ import annotations

from pathlib import Path

import pytest

from regap.config import load_yaml
from regap.errors import RegapError
from regap.study.config import load_study_config, shipped_study_configs
from regap.train.config import TrainConfig, load_config, shipped_configs


def _train_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text("stage: 1\ndata: {json: x.json}\n" + body)
    return path


def _study_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(body)
    return path


@pytest.mark.parametrize("body, message", [
    ("epochs: 2.0\n", r"'epochs' in .*c\.yaml must be an integer, got 2\.0"),  # no float for an int
    ("lora: {target_modules: q_proj}\n", r"'lora\.target_modules' in .* must be a list of strings or null"),
    ("model: 7\n", r"'model' in .* must be a string, got 7"),  # no number for a string
    ("gradient_checkpointing: 1\n", r"'gradient_checkpointing' in .* must be true or false, got 1"),
    ("observe: {trackers: tensorboard}\n", r"\(write \[tensorboard\] for a list of one\)"),
    ("data: 5\n", r"'data' in .* must be a mapping of keys"),
])
def test_training_config_rejects_what_the_study_config_rejects(tmp_path, body, message):
    with pytest.raises(RegapError, match=message):
        load_config(_train_file(tmp_path, body))


@pytest.mark.parametrize("body, message", [
    ("stage1: {steps: 2.0}\n", r"study config key 'stage1\.steps' in .*s\.yaml must be an integer, got 2\.0"),
    ("stage2: {lora_targets: q_proj}\n", r"'stage2\.lora_targets' in .* must be a list of strings or null"),
    ("name: 7\n", r"'name' in .* must be a string, got 7"),
    ("moca: 1\n", r"'moca' in .* must be true or false, got 1"),
])
def test_study_config_follows_the_same_rules(tmp_path, body, message):
    with pytest.raises(RegapError, match=message):
        load_study_config(_study_file(tmp_path, body))


def test_yaml_12_booleans_and_numbers():
    # `no` / `off` stay strings; `1e-3` (no dot) is a number, not YAML 1.1's string
    assert load_yaml("a: no\nb: off\nc: 1e-3\nd: 2.0e-4\ne: true\nf: 3\ng: .inf\nh: null") == \
        {"a": "no", "b": "off", "c": 1e-3, "d": 2e-4, "e": True, "f": 3, "g": float("inf"), "h": None}


def test_yaml_quirks_read_as_meant_in_both_configs(tmp_path):
    config = load_config(_train_file(tmp_path, "mixed_precision: no\nlr: 1e-3\n"))
    assert (config.mixed_precision, config.lr) == ("no", 1e-3)
    study = load_study_config(_study_file(tmp_path, "stage2: {projector_lr: 2e-4}\n"))
    assert study.stage2.projector_lr == 2e-4


def test_documented_overrides_parse():
    config = load_config("tiny-stage2", ["regap.lam=0", "lora.target_modules=[q_proj,v_proj]", "mixed_precision=no",
                                         "projector=runs/tiny-s1", "tune=lora", "moca.enabled=true",
                                         "data.json=/data/captions.json", "template=null"])
    assert config.regap.lam == 0.0 and isinstance(config.regap.lam, float)
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert (config.mixed_precision, config.projector, config.tune, config.moca.enabled) == \
        ("no", "runs/tiny-s1", "lora", True)
    assert config.template is None
    study = load_study_config("tiny-study", ["seeds=[0,1]", "stage2.steps=128", "name=2024", "lambdas=[0,1]",
                                             "regap_lambda=1"])
    assert (study.seeds, study.stage2.steps, study.name, study.lambdas) == ([0, 1], 128, "2024", [0.0, 1.0])


@pytest.mark.parametrize("override, message", [
    ("epochs=2.0", r"'epochs' in override 'epochs=2\.0' must be an integer"),
    ("lora.target_modules=q_proj", r"'lora\.target_modules' in override .* must be a list of strings"),
    ("cpu=yes", r"'cpu' in override 'cpu=yes' must be true or false, got 'yes'"),
    ("regap.lam.x=1", r"config key 'regap\.lam' in override .* has no sub-keys"),
])
def test_a_bad_override_names_itself(override, message):
    with pytest.raises(RegapError, match=message):
        load_config("tiny-stage1", [override])


def test_every_shipped_config_loads():
    for name in shipped_configs():
        assert isinstance(load_config(name).resolved(), TrainConfig)
    for name in shipped_study_configs():
        load_study_config(name)
    assert {"tiny-study", "tiny-study-blind"} <= set(shipped_study_configs())


def test_a_run_folders_written_config_reads_back(tmp_path):
    config = load_config("tiny-stage1", ["mixed_precision=no", "lr=1e-5"]).resolved()
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    assert load_config(path) == config


def test_a_free_form_mapping_takes_dotted_and_whole_overrides():
    dotted = load_study_config("tiny-study", ["safety.judge_options.relevance.threshold=0.6"])
    whole = load_study_config("tiny-study", ["safety.judge_options={relevance: {threshold: 0.6}}"])
    assert dotted.safety.judge_options == whole.safety.judge_options == {"relevance": {"threshold": 0.6}}
    with pytest.raises(RegapError, match=r"'safety\.judge_options' in override .* must be a mapping of keys"):
        load_study_config("tiny-study", ["safety.judge_options=[1]"])
