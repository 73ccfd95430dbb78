"""Every transformer class diffusers ships under ``diffusers.models.transformers``, found by walking the
package (no hand-kept list), and the ones the matrix does not count as diffusion transformers, each with
the reason read off its interface."""
from __future__ import annotations

import importlib
import inspect
import pkgutil

# Classes that are not latent denoisers with repeated DiT blocks: the coverage matrix lists them with
# this reason and leaves them out of the percentage. Everything else found under
# diffusers.models.transformers is counted.
NOT_DIT = {
    "PriorTransformer": "prior model: denoises a CLIP image embedding (unCLIP / Kandinsky prior), not a latent",
    "T5FilmDecoder": "spectrogram decoder of a music model (encodings and masks in, no latent diffusion blocks)",
    "TransformerTemporalModel": "UNet-era temporal attention layer used inside a UNet, not a whole denoiser",
    "MiniMaxMusic3RVQDepthDecoder": "autoregressive RVQ depth decoder (inputs_embeds in, codebook logits out)",
    "RFD4ProteinaTransformer": "protein structure model (backbone coordinates and atom masks), not a latent denoiser",
    "Cosmos3OmniTransformer": "token-sequence omni model: a packed multimodal token stream with per-modality "
                              "index tensors, no latent tensor input",
}


def transformer_classes() -> list[type]:
    """The ``ModelMixin`` subclasses defined in the modules of ``diffusers.models.transformers``, by
    module then name."""
    import diffusers.models.transformers as package
    from diffusers.models.modeling_utils import ModelMixin

    found: dict[str, type] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and issubclass(cls, ModelMixin):
                found.setdefault(name, cls)
    return list(found.values())


def exclusion(cls: type) -> str | None:
    """Why ``cls`` is not a diffusion transformer the matrix counts, or None."""
    return NOT_DIT.get(cls.__name__)


def pipelines_by_transformer() -> dict[str, list[str]]:
    """The diffusers pipeline classes per transformer class they take, read from each pipeline's
    ``__init__`` annotations (``transformer: FluxTransformer2DModel``); pipelines whose module does not
    import here (a missing optional dependency) are skipped."""
    import diffusers

    found: dict[str, set[str]] = {}
    for name in sorted(n for n in dir(diffusers) if n.endswith("Pipeline") and n != "DiffusionPipeline"):
        try:
            cls = getattr(diffusers, name)
            hints = inspect.signature(cls.__init__).parameters
        except Exception:  # noqa: BLE001 - an optional dependency missing: the pipeline is not listed
            continue
        for param in ("transformer", "transformer_2"):
            hint = hints.get(param)
            annotation = getattr(hint, "annotation", None) if hint is not None else None
            for cls_name in _class_names(annotation):
                found.setdefault(cls_name, set()).add(name)
    return {k: sorted(v) for k, v in found.items()}


def _class_names(annotation) -> list[str]:
    if annotation is None or annotation is inspect.Parameter.empty:
        return []
    if isinstance(annotation, type):
        return [annotation.__name__]
    import re

    return re.findall(r"[A-Za-z0-9_]+Model[A-Za-z0-9_]*|[A-Za-z0-9_]+Transformer[A-Za-z0-9_]*", str(annotation))
