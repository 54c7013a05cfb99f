"""Loading a LoRA model is quiet: peft reads transformers' deprecated `is_gradient_checkpointing`
on every wrap, and the FutureWarning it raises is silenced exactly there (not globally)."""

from __future__ import annotations

import warnings

from regap.models.loading.saved import load_adapter, peft_wrapping
from regap.models.random_tiny import tiny_random_lvlm

MESSAGE = "is_gradient_checkpointing"


def test_loading_a_lora_model_twice_warns_nothing_about_gradient_checkpointing(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = tiny_random_lvlm()
    with peft_wrapping():
        model.llm = get_peft_model(model.llm, LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.llm.save_pretrained(str(tmp_path / "adapter"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            load_adapter(tiny_random_lvlm(), tmp_path / "adapter")
    assert not [w for w in caught if MESSAGE in str(w.message)], [str(w.message) for w in caught]


def test_only_that_warning_is_silenced():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with peft_wrapping():
            warnings.warn("`is_gradient_checkpointing` is deprecated (raised here, not by transformers)", FutureWarning)
            warnings.warn("another deprecation", FutureWarning)
    assert [str(w.message) for w in caught] == [
        "`is_gradient_checkpointing` is deprecated (raised here, not by transformers)", "another deprecation"]
