"""Every zoo family builds offline, runs its pipeline end to end and its bare transformer loop."""
import pytest
import torch

from cachedit_fx import zoo

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", zoo.FAMILY_NAMES)
def test_family_pipeline_runs(name):
    fam = zoo.get(name)
    pipe = fam.build_pipeline()
    assert (type(pipe).__name__, type(pipe.transformer).__name__) == (fam.pipeline_class, fam.transformer_class)
    out = zoo.run_pipeline(pipe, name, num_inference_steps=2)
    assert torch.isfinite(out.float()).all()
    assert out.float().std() > 0, "constant output (a zoo trap: an untrimmed tokenizer length, a train-mode component)"
    again = zoo.run_pipeline(pipe, name, num_inference_steps=2)
    torch.testing.assert_close(out, again)


@pytest.mark.parametrize("name", zoo.FAMILY_NAMES)
def test_family_bare_transformer_loop(name):
    fam = zoo.get(name)
    transformer, inputs = zoo.build_transformer(name)
    uncond = fam.uncond_inputs(transformer, 0) if fam.uncond_inputs else None
    x, outs = zoo.denoise(transformer, fam, inputs, num_steps=3, uncond=uncond)
    assert len(outs) == 3
    flat = x if isinstance(x, torch.Tensor) else torch.cat([t.flatten() for t in x])
    assert torch.isfinite(flat).all()
