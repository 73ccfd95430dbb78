"""The shipped digits DiT (a trained FluxTransformer2DModel) through its pipeline: recognisable digits,
real caching at real thresholds with the classifier's accuracy kept, and tune's calibration with zero
recompiles (they share one compile; the ``tune`` command: tests/tools/test_tune.py). Needs scikit-learn
(the dataset and the classifier)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import cachedit_fx
from cachedit_fx.digits import MODEL_DIR, load_digits_pipeline
from cachedit_fx.install.hook import cache_hook

pytest.importorskip("sklearn", reason="scikit-learn (pip install 'cachedit-fx[cli]')")
from cachedit_fx.digits.classifier import DigitClassifier  # noqa: E402

STEPS = 28
LABELS = list(range(10)) * 2


def generate(pipe, steps=STEPS, labels=LABELS, seed=0):
    return pipe(labels=labels, num_inference_steps=steps, guidance_scale=2.0,
                generator=torch.Generator().manual_seed(seed), output_type="pt").images


@pytest.fixture(scope="module")
def classifier():
    return DigitClassifier()


@pytest.fixture(scope="module")
def uncached():
    return generate(load_digits_pipeline())


def test_shipped_folder_is_a_diffusers_pipeline_in_fp16():
    index = json.load(open(os.path.join(MODEL_DIR, "model_index.json")))
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    from safetensors import safe_open

    with safe_open(os.path.join(MODEL_DIR, "transformer", "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}


def test_uncached_digits_are_what_was_asked(classifier, uncached):
    assert uncached.shape == (len(LABELS), 1, 8, 8) and 0 <= uncached.min() and uncached.max() <= 1
    assert classifier.accuracy(uncached, LABELS) >= 0.9


def test_pipeline_refuses_bad_labels_and_output_types():
    pipe = load_digits_pipeline()
    with pytest.raises(ValueError, match="labels"):
        pipe(labels=[10], num_inference_steps=2)
    with pytest.raises(ValueError, match="output_type"):
        pipe(labels=[1], num_inference_steps=2, output_type="jpg")


@pytest.fixture(scope="module")
def cached_pipe():
    """The pipeline cached through the compiled path (an aot_eager inner), counting the backend's compiles:
    the tests below share its one compile."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    compiles = []

    def counting(gm, example_inputs):
        compiles.append(gm)
        return aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward))(gm, example_inputs)

    pipe = cachedit_fx.enable_cache(load_digits_pipeline(), inner=counting, Fn_compute_blocks=1,
                                    Bn_compute_blocks=0, max_warmup_steps=4)
    return pipe, compiles


@pytest.mark.slow
def test_realistic_threshold_caches_both_cfg_branches_and_keeps_accuracy(cached_pipe, classifier, uncached):
    pipe, _ = cached_pipe
    cachedit_fx.refresh_context(pipe, residual_diff_threshold=0.12)
    cached = generate(pipe)
    stats, = cachedit_fx.summary(pipe, logging=False)
    assert stats.steps == stats.cfg_steps == STEPS  # separate CFG: a state per branch
    assert len(stats.cached_steps) >= STEPS // 4 and len(stats.cfg_cached_steps) >= STEPS // 4
    assert not torch.equal(cached, uncached)
    assert classifier.accuracy(cached, LABELS) >= classifier.accuracy(uncached, LABELS) - 0.1
    mse = float(((cached - uncached) ** 2).mean())
    assert 10 * np.log10(1 / mse) > 30


@pytest.mark.slow
def test_tune_reaches_a_speedup_with_no_recompile(cached_pipe, classifier, capsys):
    pipe, compiles = cached_pipe
    result = cachedit_fx.tune(pipe, dict(labels=LABELS, num_inference_steps=STEPS, guidance_scale=2.0,
                                         generator=torch.Generator().manual_seed(0), output_type="pt"),
                              target_speedup=2.0, score=lambda out: classifier.accuracy(out.images, LABELS),
                              score_name="accuracy")
    assert len(compiles) == 1 and result.graphs_compiled == 0
    assert result.reached, result.message
    assert abs(result.chosen.speedup - 2.0) <= 0.1 and 0.0 < result.chosen.threshold < 1.0
    assert cache_hook(pipe.transformer).handle.cache_config.residual_diff_threshold == result.chosen.threshold
    speedups = [t.speedup for t in result.trials]
    assert speedups == sorted(speedups) and result.trials[0].threshold == 0 and result.trials[0].cached == 0
    assert "tune [" in capsys.readouterr().err and "accuracy" in result.table()


@pytest.mark.slow
def test_tune_says_when_a_speedup_cannot_be_reached(cached_pipe):
    pipe, compiles = cached_pipe
    n = len(compiles)
    result = cachedit_fx.tune(pipe, dict(labels=LABELS, num_inference_steps=8, guidance_scale=2.0,
                                         generator=torch.Generator().manual_seed(0), output_type="pt"),
                              target_speedup=50.0, max_threshold=0.3, progress=False)
    assert not result.reached and "cannot reach 50.00x" in result.message
    assert len(compiles) == n and result.graphs_compiled == 0
