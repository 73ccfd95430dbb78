"""cache-dit's ``QuantizeConfig`` / ``QuantizeBackend``: which layers of which components to quantize,
and to what. The fields and defaults are cache-dit 1.5.3's; ``install/quantize.py`` applies them through
torchao's ``quantize_`` (``enable_cache(quantize_config=...)`` or ``cachedit_fx.quantize``)."""
from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable

from .fields import check_bool, fail

# cache-dit's torchao quant types (quantization/torchao/quantize_ao.py), in its precision-plan order.
QUANT_TYPES = ("float8_per_tensor", "float8_per_row", "float8_per_block", "float8_weight_only", "nvfp4",
               "nvfp4_weight_only", "int8_per_tensor", "int8_per_row", "int8_weight_only", "int4_weight_only")


class QuantizeBackend(enum.Enum):
    """cache-dit's quantization backends; cachedit-fx quantizes through torchao (AUTO resolves to it)."""

    AUTO = "AUTO"
    TORCHAO = "TORCHAO"
    CACHE_DIT = "CACHE_DIT"  # cache-dit's SVDQuant CUDA extension: not available here
    NONE = "NONE"

    @classmethod
    def from_str(cls, value: str) -> "QuantizeBackend":
        aliases = {"ao": cls.TORCHAO, "torchao": cls.TORCHAO, "cache_dit": cls.CACHE_DIT, "cache-dit": cls.CACHE_DIT,
                   "cachedit": cls.CACHE_DIT, "auto": cls.AUTO, "none": cls.NONE}
        found = aliases.get(value.lower()) or next((m for m in cls if m.value.lower() == value.lower()), None)
        if found is None:
            fail("QuantizeConfig.backend", "one of 'auto', 'torchao' / 'ao'", value)
        return found


@dataclasses.dataclass
class QuantizeConfig:
    """What to quantize (cache-dit's fields and defaults).

    ``quant_type``: one of :data:`QUANT_TYPES` (on CPU: ``int8_weight_only``, ``int8_per_row``,
    ``int8_per_tensor``, ``float8_weight_only``). ``exclude_layers``: layer-name substrings left alone.
    ``regional_quantize``: quantize only the linears inside the model's repeated blocks (diffusers'
    ``_repeated_blocks``, or ``repeated_blocks`` class names). ``filter_fn(module, name) -> bool`` replaces
    the exclusions. ``components_to_quantize``: pipeline components (a list, or a dict of per-component
    overrides); None: the transformer(s). ``precision_plan``: ``{layer-name substring: quant_type}``.
    SVDQuant (``svdq_*``, ``calibrate_fn``, ``serialize_to``, ``svdq_kwargs``) is refused by name.
    """

    backend: str | QuantizeBackend = QuantizeBackend.AUTO
    quant_type: str = "float8_per_row"
    exclude_layers: list | None = dataclasses.field(default_factory=lambda: ["embedder", "embed", "modulation",
                                                                             "mod"])
    regional_quantize: bool = True
    repeated_blocks: list[str] = dataclasses.field(default_factory=list)
    filter_fn: Callable[..., bool] | None = None
    components_to_quantize: list[str] | dict[str, dict] | None = None
    per_tensor_fallback: bool = True
    precision_plan: dict[str, str] | None = None
    calibrate_fn: Callable[..., Any] | None = None
    serialize_to: str | None = None
    svdq_kwargs: dict | None = None
    verbose: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.quant_type, str):
            self.quant_type = self.quant_type.lower()
        if isinstance(self.backend, str):
            self.backend = QuantizeBackend.from_str(self.backend)
        if self.backend is QuantizeBackend.AUTO:
            self.backend = QuantizeBackend.CACHE_DIT if self.is_svdq() else QuantizeBackend.TORCHAO
        if self.backend is not QuantizeBackend.TORCHAO or self.is_svdq():
            fail("QuantizeConfig.backend / quant_type", "torchao with one of " + ", ".join(QUANT_TYPES) +
                 " (cache-dit's SVDQuant backend needs its CUDA extension, which cachedit-fx does not ship)",
                 f"{self.backend.value} / {self.quant_type}")
        if self.quant_type not in QUANT_TYPES:
            fail("QuantizeConfig.quant_type", "one of " + ", ".join(QUANT_TYPES), self.quant_type)
        for name in ("calibrate_fn", "serialize_to", "svdq_kwargs"):
            if getattr(self, name) is not None:
                fail(f"QuantizeConfig.{name}", "None (it configures cache-dit's SVDQuant workflow)", getattr(self, name))
        for name in ("regional_quantize", "per_tensor_fallback", "verbose"):
            check_bool(f"QuantizeConfig.{name}", getattr(self, name))
        for layer, quant_type in (self.precision_plan or {}).items():
            if str(quant_type).lower() not in QUANT_TYPES:
                fail(f"QuantizeConfig.precision_plan[{layer!r}]", "one of " + ", ".join(QUANT_TYPES), quant_type)
        if self.components_to_quantize is not None and not isinstance(self.components_to_quantize, (list, dict)):
            fail("QuantizeConfig.components_to_quantize", "None, a list of component names or a dict",
                 self.components_to_quantize)

    def is_svdq(self) -> bool:
        return isinstance(self.quant_type, str) and self.quant_type.startswith("svdq")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def update(self, **kwargs) -> "QuantizeConfig":
        """cache-dit's update: set the known, non-None fields, resolve the backend again."""
        for key, value in kwargs.items():
            if hasattr(self, key) and value is not None:
                setattr(self, key, value)
        if "backend" not in kwargs:
            self.backend = QuantizeBackend.AUTO
        self.__post_init__()
        return self

    def strify(self) -> str:
        """cache-dit's tag: the quant type, or ``<component:type>`` per component of a dict."""
        if not isinstance(self.components_to_quantize, dict):
            return self.quant_type
        return "".join(f"<{c}:{d.get('quant_type', self.quant_type).lower()}>"
                       for c, d in self.components_to_quantize.items())

    def component_quant_types(self) -> dict[str, str]:
        if self.components_to_quantize is None:
            return {"transformer": self.quant_type}
        if isinstance(self.components_to_quantize, list):
            return {c: self.quant_type for c in self.components_to_quantize}
        return {c: d.get("quant_type", self.quant_type) for c, d in self.components_to_quantize.items()}

    @classmethod
    def expand_configs(cls, config: "QuantizeConfig") -> list["QuantizeConfig"]:
        """One config per component of ``components_to_quantize`` (a dict's entries override fields)."""
        if config.components_to_quantize is None:
            return [config]
        if isinstance(config.components_to_quantize, list):
            return [dataclasses.replace(config, components_to_quantize=[c]) for c in config.components_to_quantize]
        fields = {f.name for f in dataclasses.fields(cls)} - {"components_to_quantize"}
        out = []
        for component, overrides in config.components_to_quantize.items():
            unknown = sorted(set(overrides) - fields)
            if unknown:
                fail(f"QuantizeConfig.components_to_quantize[{component!r}]", f"keys among {sorted(fields)}",
                     unknown)
            out.append(dataclasses.replace(config, components_to_quantize=[component], **overrides))
        return out

    @classmethod
    def from_kwargs(cls, **kwargs) -> "QuantizeConfig":
        """cache-dit's legacy keywords: the known fields, the rest dropped."""
        return cls(**{k: v for k, v in kwargs.items() if k in cls.__dataclass_fields__})
