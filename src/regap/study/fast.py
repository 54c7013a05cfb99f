"""`regap study --fast`: the study's whole pipeline at test size, on the tiny random model.

It checks that every step runs and that the units aggregate; its numbers mean nothing."""

FAST_OVERRIDES: list[str] = [
    "name=tiny-study-fast", "model=tiny-random", "dtype=float32", "seeds=[0,1]", "lambdas=[0.0,1.0]", "regap_lambda=1.0",
    "data.synth_n=8", "stage1.steps=2", "stage1.global_batch=2", "stage1.per_device_batch=2", "stage1.save_every=1",
    "stage2.steps=2", "stage2.global_batch=2", "stage2.per_device_batch=2", "stage2.save_every=1",
    "gap.pairs=4", "gap.texts_per_pair=1", "gap.attack_pairs=3", "gap.n_boot=50",
    "safety.harmful=3", "safety.benign=2", "safety.max_new_tokens=4",
    "utility.scenes=2", "utility.refusal_limit=2", "utility.max_new_tokens=4",
    "curve.scenes=1", "stats.n_boot=200", "minutes_per_unit=0.3", "minutes_per_evaluation_unit=0.2",
]
