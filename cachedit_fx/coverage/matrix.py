"""Run one transformer class tiny: uncached, through ``enable_cache(compile=False)`` and through the
``cachedit`` backend (inner eager), and report what each path did — the chain it cached, its pattern,
the cached steps and the output's relative L1 distance to the uncached run, or the one warning that
says why it ran uncached, or the exception."""
from __future__ import annotations

import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field

import torch

from ..install.api import disable_cache, enable_cache, summary
from ..runtime.handle import chain_lists
from ..zoo import denoise
from . import catalog, inputs, tiny
from .status import CACHES, ERROR, NOT_DIT, UNCACHED

STEPS = 6
# Random weights change more from step to step than trained ones (their residual diffs run 0.3-2.5 over a
# 6-step loop), so the matrix's threshold is high: it asks whether a step can be skipped at all.
CACHE = dict(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=1.5, max_warmup_steps=2)


@dataclass
class PathResult:
    """What one path (enable_cache or the backend) did with the model."""

    status: str  # CACHES | UNCACHED | ERROR
    chain: str | None = None
    pattern: str | None = None
    cached_steps: list[int] = field(default_factory=list)
    rel_l1: float | None = None
    reason: str | None = None  # the warning (UNCACHED), the exception (ERROR), or a side-list note


@dataclass
class ClassResult:
    """One transformer class's row of the matrix."""

    name: str
    module: str
    status: str  # CACHES | UNCACHED | ERROR | NOT_DIT; the enable_cache path's, the product's entry point
    reason: str | None = None
    layout: str | None = None
    block_lists: dict[str, int] = field(default_factory=dict)  # ModuleList path -> entries
    main_list: str | None = None
    enable_cache: PathResult | None = None
    backend: PathResult | None = None
    seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Drive:
    """What :func:`~cachedit_fx.zoo.denoise` reads of a family: the argument names and scale."""

    latent_arg: str
    timestep_arg: str
    timestep_max: float = 1000.0


def block_lists(model: torch.nn.Module) -> dict[str, int]:
    """ModuleLists of >= 2 entries of one class with submodules of their own (blocks, not an
    attention's ``to_out = [Linear, Dropout]``), outside any other such list's blocks."""
    found: dict[str, int] = {}
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.ModuleList) or len(m) < 2 or len({type(b) for b in m}) != 1:
            continue
        if not any(True for _ in m[0].children()) or any(name.startswith(f"{p}.") for p in found):
            continue
        found[name] = len(m)
    return found


def main_list(model: torch.nn.Module) -> str | None:
    """The block list holding most parameters (the later one on a tie): the backbone, not a refiner."""
    lists = [(sum(p.numel() for p in model.get_submodule(n).parameters()), k, n)
             for k, n in enumerate(block_lists(model))]
    return max(lists)[2] if lists else None


def _one_line(e: BaseException) -> str:
    frame = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    where = f" ({frame.filename.rsplit('/', 1)[-1]}:{frame.lineno})" if frame else ""
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}{where}"[:400]


def _first_tensor(out):
    out = out[0] if isinstance(out, (tuple, list)) else out
    out = getattr(out, "sample", out)
    return out[0] if isinstance(out, (tuple, list)) else out


def find_layout(model) -> tuple[inputs.Layout, dict]:
    """The first latent layout the model runs on and predicts in, with its call arguments.

    Raises:
        RuntimeError: no layout runs (the last error).
    """
    first = None  # the most likely layout's error says most
    tries = [(layout, optional) for layout in inputs.candidates(model) for optional in (False, True)]
    for layout, optional in tries:
        try:
            kwargs = inputs.call_inputs(model, layout, optional=optional)
            with torch.no_grad():
                out = _first_tensor(model(**kwargs))
        except KeyError as e:
            raise RuntimeError(f"no input rule for the required forward argument {e.args[0]!r}") from None
        except Exception as e:  # noqa: BLE001 - the next layout may fit
            first = first or e
            continue
        latent = kwargs[inputs.latent_name(model)]
        if isinstance(out, torch.Tensor) and _predicts(out, latent):
            return layout, kwargs
        first = first or RuntimeError(f"output shape {tuple(getattr(out, 'shape', ()))} does not match the "
                                      f"latent {tuple(latent.shape)}")
    raise RuntimeError(_one_line(first) if first else "no latent layout")


def _predicts(out: torch.Tensor, latent: torch.Tensor) -> bool:
    """Is ``out`` a prediction in the latent's space (its shape, more channels: learned sigma, a packed
    latent's tokens after the prompt's: a joint sequence, or fewer channels: the noisy ones of a latent
    that carries its conditioning channels after them)?"""
    if out.shape == latent.shape:
        return True
    return out.dim() == latent.dim() and out.shape[0] == latent.shape[0] and out.shape[2:] == latent.shape[2:] \
        and (out.shape[1] % latent.shape[1] == 0 or out.shape[1] < latent.shape[1]
             or (latent.dim() == 3 and out.shape[1] > latent.shape[1]))


def _rel_l1(x, ref) -> float:
    if isinstance(x, (list, tuple)):
        x, ref = torch.cat([t.flatten() for t in x]), torch.cat([t.flatten() for t in ref])
    return float((x - ref).abs().mean() / ref.abs().mean().clamp_min(1e-12))


def _path_result(model, final, reference, caught, main: str | None) -> PathResult:
    stats = summary(model, logging=False)
    cached = [s for s in stats if s.chain]
    messages = [str(w.message) for w in caught if "cachedit" in str(w.message)]
    rel = _rel_l1(final, reference)
    if not cached:
        reason = next((s.unmatched for s in stats if s.unmatched), None) or (messages[0] if messages else
                                                                             "no cachedit graph ran")
        return PathResult(UNCACHED, rel_l1=rel, reason=reason)
    best = max(cached, key=lambda s: s.n_blocks)
    steps = sorted({i for s in cached for i in s.cached_steps})
    note = None
    if main is not None and not any(main in chain_lists(s.chain) for s in cached):
        note = f"the main block list {main} does not cache; only {best.chain} does"
        note += f" ({messages[0]})" if messages else ""
    elif not steps:
        diffs = {k: round(v, 2) for s in cached for k, v in s.residual_diffs.items()}
        note = (f"{best.chain} compiled cached, but no step was skipped (residual diffs {diffs or 'not finite'}, "
                f"threshold {CACHE['residual_diff_threshold']})")
    status = CACHES if note is None else UNCACHED
    return PathResult(status, best.chain, best.pattern, steps, rel, note)


def _run_path(model, kwargs, drive, reference, main, compile_with) -> PathResult:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            call = compile_with(model)
            final, _ = denoise(model, drive, kwargs, num_steps=STEPS, call=call)
        except Exception as e:  # noqa: BLE001 - reported in the matrix
            return PathResult(ERROR, reason=_one_line(e))
    return _path_result(model, final, reference, caught, main)


def _via_enable_cache(model):
    enable_cache(model, compile=False, **CACHE)
    return model


def _via_backend(model, inner: str = "eager"):
    from ..capture.dynamo import private_code
    from ..config import DBCacheConfig

    # The forward's private code copy: diffusers' shared peft wrapper would otherwise count every
    # class's compile against one recompile limit (8) in this process.
    return torch.compile(private_code(model.forward), backend="cachedit", dynamic=False,
                         options={"inner": inner, "cache_config": DBCacheConfig(**CACHE)})


def subject(cls: type):
    """The model, one call's arguments, how to drive the loop and the latent layout's name: the zoo's
    transformer and hand-made inputs where a zoo family has this class, else a tiny build and the
    first latent layout it runs on."""
    from .. import zoo

    family = zoo.family_for_transformer(cls)
    if family is not None:
        model, kwargs = zoo.build_transformer(family.name)
        return model, kwargs, family, f"zoo:{family.name}"
    model = tiny.build(cls)
    layout, kwargs = find_layout(model)
    drive = _Drive(inputs.latent_name(model), inputs.timestep_name(model) or inputs.latent_name(model))
    return model, kwargs, drive, layout.name


def run_class(cls: type, backend: bool = True) -> ClassResult:
    """The matrix row of ``cls`` (built tiny, seeded)."""
    started = time.perf_counter()
    row = ClassResult(cls.__name__, cls.__module__.rsplit(".", 1)[-1], ERROR)
    excluded = catalog.exclusion(cls)
    if excluded:
        row.status, row.reason = NOT_DIT, excluded
        return row
    try:
        model, kwargs, drive, row.layout = subject(cls)
        row.block_lists, row.main_list = block_lists(model), main_list(model)
    except Exception as e:  # noqa: BLE001 - reported in the matrix
        row.reason = _one_line(e) if not isinstance(e, RuntimeError) else str(e)
        row.seconds = time.perf_counter() - started
        return row
    with torch.no_grad():
        reference, _ = denoise(model, drive, kwargs, num_steps=STEPS)
    row.enable_cache = _run_path(model, kwargs, drive, reference, row.main_list, _via_enable_cache)
    disable_cache(model)
    if backend:
        row.backend = _run_path(model, kwargs, drive, reference, row.main_list, _via_backend)
    row.status, row.reason = row.enable_cache.status, row.enable_cache.reason
    row.seconds = time.perf_counter() - started
    return row


def run_all(names: list[str] | None = None, backend: bool = True, log=None) -> list[ClassResult]:
    rows = []
    for cls in catalog.transformer_classes():
        if names and cls.__name__ not in names:
            continue
        rows.append(run_class(cls, backend))
        if log is not None:
            r = rows[-1]
            log(f"{r.name}: {r.status} {r.enable_cache.chain if r.enable_cache else ''} "
                f"{r.reason or ''} [{r.seconds:.1f}s]")
    return rows
