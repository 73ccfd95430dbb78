"""Inductor in a child process, the rewritten graph running eagerly until it is done.

With ``background_compile``, the graph Dynamo captured and the passes rewrote is sent (backend/wire.py,
with its inputs' sizes, dtypes and devices) to ``python -m cachedit_fx.backend.background``, which
compiles it with Inductor on fake inputs and leaves the result in Inductor's and AOTAutograd's on-disk
caches. Meanwhile every call runs the rewritten graph as it is (the cond decides on the host, the same
decisions as the compiled graph's). The first call after the child exits compiles the same graph in this
process, which finds both caches filled and loads instead of compiling (that call took 3.7-4.9 s at
FLUX.1's depth on this machine, against a 52-60 s compile), and from then on calls the compiled graph.

Only static-shape inference graphs go to a child: a dynamic-shape compile adds its size guards to
Dynamo's, which a compile in another process cannot. A child that fails, or whose result is not found,
means a compile in this process, with one warning.
"""
from __future__ import annotations

import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass

import torch

from . import wire

logger = logging.getLogger("diffusers.cachedit_fx")  # shown by diffusers.utils.logging.set_verbosity_info()
CHILD = [sys.executable, "-m", "cachedit_fx.backend.background"]  # + the payload's path


@dataclass(frozen=True)
class InputSpec:
    """What the compile needs of a tensor input: its metadata, never its values."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: str
    requires_grad: bool
    parameter: bool

    def fake(self):
        value = torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=self.device)
        if self.parameter:
            return torch.nn.Parameter(value, requires_grad=self.requires_grad)
        return value.requires_grad_(self.requires_grad)


@dataclass(frozen=True)
class Payload:
    """Everything both processes compile from, so that both key Inductor's caches alike."""

    graph: bytes  # wire.dumps
    inputs: tuple  # InputSpec per tensor input, the value itself otherwise
    config_patches: dict
    inductor_config: bytes  # torch._inductor.config.save_config_portable(), pickled
    threads: int  # Inductor's CPU kernels are generated for this many threads

    def compile(self):
        """The graph compiled by Inductor (fake inputs; the result is called with real ones)."""
        from torch._inductor.compile_fx import compile_fx
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        with FakeTensorMode(shape_env=ShapeEnv()):  # torch.cond's fake kernel merges branch outputs in a ShapeEnv
            inputs = [x.fake() if isinstance(x, InputSpec) else x for x in self.inputs]
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with torch._inductor.config.patch(pickle.loads(self.inductor_config)), torch.no_grad():
                return compile_fx(wire.loads(self.graph), inputs, config_patches=self.config_patches or None)
        finally:
            torch.set_num_threads(threads)


def _in_this_process_only(gm) -> str | None:
    """What in ``gm`` only this process can run: an island (a module the graph calls by id, whose fake
    kernel replays this process's records) or a collective (its process group lives here)."""
    for module in gm.modules():
        for node in module.graph.nodes if isinstance(module, torch.fx.GraphModule) else ():
            namespace = getattr(node.target, "namespace", None)
            if namespace == "cachedit" and "island" in str(node.target):
                return "the graph calls islands (modules only this process runs)"
            if namespace in ("_c10d_functional", "c10d_functional"):
                return "the graph holds collectives (its process group lives in this process)"
    return None


def why_not(gm, example_inputs) -> str | None:
    """Why a graph compiles in this process rather than in a child; None: it can go."""
    if torch.is_grad_enabled():
        return "grad mode is on"
    reason = _in_this_process_only(gm)
    if reason is not None:
        return reason
    for x in example_inputs:
        if isinstance(x, (torch.SymInt, torch.SymFloat)):
            return "its sizes are dynamic (Inductor's size guards must reach Dynamo's)"
        if isinstance(x, torch.Tensor):
            if type(x) not in (torch.Tensor, torch.nn.Parameter):
                return f"an input is a {type(x).__name__}, not a plain tensor"
            if x.storage_offset() or any(isinstance(s, torch.SymInt) for s in (*x.shape, *x.stride())):
                return "an input is a view into a larger storage, or its sizes are dynamic"
    return None


def _spec(x):
    if not isinstance(x, torch.Tensor):
        return x
    return InputSpec(tuple(x.shape), tuple(x.stride()), x.dtype, str(x.device), x.requires_grad,
                     isinstance(x, torch.nn.Parameter))


def payload(gm, example_inputs, config_patches: dict) -> Payload:
    """Raises what wire.dumps raises for a graph it cannot send."""
    return Payload(wire.dumps(gm), tuple(_spec(x) for x in example_inputs), dict(config_patches),
                   pickle.dumps(torch._inductor.config.save_config_portable()), torch.get_num_threads())


def _cache_dir_env() -> dict:
    """The child writes where this process reads: Inductor's cache directory, resolved here."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir()}


class BackgroundCompiled:
    """The callable the backend returns: the graph run eagerly while the child compiles it, then the
    compiled graph. ``eager_calls`` / ``compiled_calls`` count the calls each served; ``status`` is
    ``compiling``, ``compiled``, or why this process compiled it itself."""

    def __init__(self, gm, job: Payload):
        self._eager, self._job, self._compiled, self._pending = gm.forward, job, None, True
        self.eager_calls = self.compiled_calls = 0
        self.status = "compiling"
        self._folder = tempfile.mkdtemp(prefix="cachedit-background-")
        self._path = os.path.join(self._folder, "payload.pkl")
        self._log = os.path.join(self._folder, "child.log")
        with open(self._path, "wb") as f:
            pickle.dump(job, f)
        with open(self._log, "wb") as log:
            self._child = subprocess.Popen([*CHILD, self._path], stdout=log,
                                           stderr=subprocess.STDOUT, env=_cache_dir_env())
        logger.info("cachedit: Inductor compiles the graph in process %d; calls run it eagerly until then",
                    self._child.pid)

    def __call__(self, *args):
        if self._pending and self._child.poll() is not None:
            self._pending = False
            self._switch()
        if self._compiled is None:
            self.eager_calls += 1
            return self._eager(*args)
        self.compiled_calls += 1
        return self._compiled(*args)

    def wait(self, timeout: float | None = None) -> None:
        """Block until the child is done (the next call switches)."""
        self._child.wait(timeout)

    def _switch(self) -> None:
        """Load (or, where the child's result is missing, compile) the graph here; a compile that fails
        here too leaves the graph running eagerly, with the warning."""
        from torch._dynamo.utils import counters

        code, tail = self._child.returncode, _tail(self._log)
        shutil.rmtree(self._folder, ignore_errors=True)
        hits = counters["aot_autograd"]["autograd_cache_hit"]
        try:
            self._compiled = self._job.compile()
        except Exception as e:  # noqa: BLE001 - reported once; the eager graph keeps serving
            self.status = f"Inductor failed on the graph ({type(e).__name__}: {e}); it keeps running eagerly"
        else:
            if code != 0:
                self.status = f"the child process failed (exit {code}): {tail}"
            elif counters["aot_autograd"]["autograd_cache_hit"] == hits:
                self.status = "the child's result was not in AOTAutograd's cache (compiled again here)"
            else:
                self.status = "compiled"
                logger.info("cachedit: the background compile is done; calls run the compiled graph")
                return
        warnings.warn(f"cachedit: background compile: {self.status}", stacklevel=3)


def _tail(path: str, lines: int = 5) -> str:
    with open(path, errors="replace") as f:
        return " | ".join(f.read().strip().splitlines()[-lines:])


def main(argv: list[str]) -> int:
    with open(argv[0], "rb") as f:
        job: Payload = pickle.load(f)
    job.compile()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
