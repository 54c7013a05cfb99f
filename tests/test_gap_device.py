"""`analyse(device=...)`: the per-layer fits run where asked, with the CPU's numbers."""

from __future__ import annotations

import pytest
import torch
from hidden_states import synthetic_store

F64 = torch.float64




def test_explicit_cpu_gives_the_default_numbers(tmp_path):
    from regap.gap.measure import analyse

    store = synthetic_store(tmp_path)
    assert analyse(store, n_boot=50, seed=1, device="cpu") == analyse(store, n_boot=50, seed=1)


def test_the_clouds_are_moved_to_the_device_before_fitting(tmp_path, monkeypatch):
    from regap.gap import measure

    seen = []

    class Stop(Exception):
        pass

    def fake_fit(image, text, **options):
        seen.append((image.device.type, text.device.type))
        raise Stop

    monkeypatch.setattr(measure, "fit_layer", fake_fit)
    with pytest.raises(Stop):
        measure.analyse(synthetic_store(tmp_path), n_boot=10, device="meta")
    assert seen == [("meta", "meta")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("ci", ["linear", "exact"])
def test_cuda_analysis_matches_the_cpu(tmp_path, ci):
    from regap.gap.measure import analyse

    store = synthetic_store(tmp_path, pairs=40, d=6)
    cpu = analyse(store, n_boot=100, seed=2, ci=ci, n_sigma=100.0)
    gpu = analyse(store, n_boot=100, seed=2, ci=ci, n_sigma=100.0, device="cuda")
    assert gpu["mir"] == pytest.approx(cpu["mir"], rel=1e-9)
    assert gpu["mir_ci"] == pytest.approx(cpu["mir_ci"], rel=1e-6)
    assert [r["frechet"] for r in gpu["per_layer"]] == pytest.approx([r["frechet"] for r in cpu["per_layer"]], rel=1e-9)
