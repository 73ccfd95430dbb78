"""A cache-dit 1.5.3 script using its whole ``enable_cache`` (tests/compat/cache_dit_script.py):
``load_configs`` (cache + TaylorSeer, Ulysses-2, the attention backend, int8 quantization from one YAML
file) and the same configs written out as ``QuantizeConfig`` / ``ParallelismConfig`` /
``attention_backend``, run unchanged after ``import cachedit_fx as cache_dit`` under
``torchrun --nproc_per_node 2`` (gloo), against the same script in one process without the parallelism.
Every rank takes the single-process decisions and draws its image; a collective timeout and a process
timeout turn a hang into a failure.

cache-dit itself cannot be the reference here: it refuses quantization without CUDA and its
context-parallel planners need einops (``tests/compat/test_cache_dit.py`` compares a quantized Flux
with cache-dit itself, quantized by each library's ``quantize``)."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]
pytest.importorskip("torchao", reason="torchao 0.18.0 (pip install 'cachedit-fx[quant]')")
pytest.importorskip("yaml", reason="PyYAML (load_configs reads YAML)")

SCRIPT = pathlib.Path(__file__).with_name("cache_dit_script.py")
ROOT = SCRIPT.parents[2]
TIMEOUT_S = 120  # a collective that waits longer fails the rank
YAML = """\
cache_config:
  Fn_compute_blocks: 1
  Bn_compute_blocks: 0
  residual_diff_threshold: 0.45
  max_warmup_steps: 2
  enable_taylorseer: true
  taylorseer_order: 1
{parallelism}attention_backend: native
quantize_config:
  quant_type: int8_weight_only
"""
ULYSSES = "parallelism_config:\n  ulysses_size: 2\n"


def _run(config: str, out: pathlib.Path, ranks: int) -> list[dict]:
    out.mkdir()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] \
        if ranks > 1 else [sys.executable]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    done = subprocess.run([*launcher, str(SCRIPT), config, str(out), str(TIMEOUT_S)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=8 * TIMEOUT_S)
    assert done.returncode == 0, f"{ranks} rank(s), {config}: exit {done.returncode}\n{done.stderr[-6000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(ranks)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{spelling: (the 2 torchrun ranks' results, the single process's)}."""
    directory = tmp_path_factory.mktemp("cache_dit_script")
    (directory / "parallel.yaml").write_text(YAML.format(parallelism=ULYSSES))
    (directory / "single.yaml").write_text(YAML.format(parallelism=""))
    return {"load_configs": (_run(str(directory / "parallel.yaml"), directory / "yaml2", 2),
                             _run(str(directory / "single.yaml"), directory / "yaml1", 1)[0]),
            "written out": (_run("written", directory / "written2", 2), _run("written", directory / "written1", 1)[0])}


@pytest.mark.parametrize("spelling", ["load_configs", "written out"])
def test_the_script_runs_unchanged_on_two_ranks_and_decides_as_one_process(runs, spelling):
    ranks, want = runs[spelling]
    assert want["quantized"] == "Int8Tensor" and not want["sharded"] and want["backend"].endswith("NATIVE")
    assert want["graphs"] == 1 and all(r["graphs"] == 1 for r in ranks)
    assert want["cached"] and want["cached"][0] and len(want["cached"][0]) < 7, want["cached"]
    for rank, got in enumerate(ranks):
        assert got["quantized"] == "Int8Tensor" and got["sharded"] and got["backend"].endswith("NATIVE"), (rank, got)
        assert got["cached"] == want["cached"], (rank, got["cached"], want["cached"])
        torch.testing.assert_close(got["image"], want["image"], rtol=1e-5, atol=1e-5)


def test_both_spellings_are_one_config(runs):
    (_, from_yaml), (_, written) = runs["load_configs"], runs["written out"]
    assert from_yaml["cached"] == written["cached"]
    torch.testing.assert_close(from_yaml["image"], written["image"], rtol=0, atol=0)
