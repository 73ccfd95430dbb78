"""cache-dit's ``ParallelismConfig`` / ``ParallelismBackend``: how the transformer is sharded over the
ranks of ``torch.distributed``. The fields and defaults are cache-dit 1.5.3's; ``install/parallel.py``
maps them onto diffusers' own context parallelism (``ContextParallelConfig`` + ``enable_parallelism``)
and tensor parallelism (``TensorParallelConfig``). What diffusers cannot do is refused by name here."""
from __future__ import annotations

import dataclasses
import enum
from typing import Any

from .fields import fail


class ParallelismBackend(enum.Enum):
    """cache-dit's parallelism backends. CACHE_DIT (alias NATIVE_DIFFUSER) is context parallelism,
    NATIVE_PYTORCH tensor parallelism, NATIVE_HYBRID both; here all run on diffusers' implementation."""

    AUTO = "Auto"
    CACHE_DIT = "CACHE_DIT"
    NATIVE_DIFFUSER = "Native_Diffuser"
    NATIVE_PYTORCH = "Native_PyTorch"
    NATIVE_HYBRID = "Native_Hybrid"
    NONE = "None"

    @classmethod
    def canonicalize(cls, backend: "ParallelismBackend") -> "ParallelismBackend":
        return cls.CACHE_DIT if backend is cls.NATIVE_DIFFUSER else backend

    @classmethod
    def from_str(cls, value: str) -> "ParallelismBackend":
        for member in cls:
            if value.lower() in (member.value.lower(), member.name.lower()):
                return cls.canonicalize(member)
        fail("ParallelismConfig.backend", "one of " + ", ".join(repr(m.value) for m in cls), value)

    def __str__(self) -> str:
        return self.value


_SIZES = ("ulysses_size", "ring_size", "tp_size")
# Fields of cache-dit's own parallel runtime that diffusers' has no counterpart for: (field, why).
_REFUSED = (
    ("use_ray", "cache-dit's Ray engine (one GPU actor per rank, the model shipped to each); run the script "
                "under torchrun instead (see docs/usage.md)"),
    ("ulysses_float8", "cache-dit's float8 all-to-all; diffusers' Ulysses communicates in the model's dtype"),
    ("ulysses_async", "cache-dit's asynchronous Ulysses; diffusers' Ulysses is synchronous"),
    ("extra_parallel_modules", "cache-dit parallelises text encoders / VAEs / ControlNets itself; cachedit-fx "
                               "shards the transformer(s) only"),
    ("extra_parallel_kwargs", "options of cache-dit's own context-parallel runtime"),
)


@dataclasses.dataclass
class ParallelismConfig:
    """The parallel layout (cache-dit's fields and defaults): ``ulysses_size`` / ``ring_size`` (context
    parallelism over the sequence), ``tp_size`` (tensor parallelism of the weights), the attention
    backend the ranks use, and cache-dit's Ray options (refused: ``use_ray``)."""

    backend: ParallelismBackend | str = ParallelismBackend.AUTO
    ulysses_size: int | None = None
    ring_size: int | None = None
    tp_size: int | None = None
    use_ray: bool = False
    ray_num_workers: int | None = None
    ray_address: str | None = None
    ray_runtime_env: dict | None = None
    ray_init_kwargs: dict = dataclasses.field(default_factory=lambda: {"include_dashboard": False})
    ray_worker_options: dict = dataclasses.field(default_factory=dict)
    ray_master_port: int = 0
    ray_auto_shutdown: bool = True
    ray_transfer_backend: str = "auto"
    ray_transfer_custom_obj: bool = True
    ray_use_flashpack: bool = False
    ray_use_compile: bool = False
    ray_transfer_fn: Any = None
    cp_plan: Any = None
    attention_backend: str | None = None
    ulysses_anything: bool | None = False
    ulysses_float8: bool | None = False
    ulysses_async: bool | None = False
    extra_parallel_kwargs: dict = dataclasses.field(default_factory=dict)
    ring_rotate_method: str | None = "p2p"
    ring_convert_to_fp32: bool | None = True
    extra_parallel_modules: list = dataclasses.field(default_factory=list)
    parallel_kwargs: dict = dataclasses.field(default_factory=dict)  # deprecated spelling of the fields above

    def __post_init__(self) -> None:
        for key, value in dict(self.parallel_kwargs or {}).items():
            key = key.removeprefix("experimental_")
            if key not in self.__dataclass_fields__:
                fail("ParallelismConfig.parallel_kwargs", "keys among the fields of ParallelismConfig", key)
            setattr(self, key, value)
        if isinstance(self.backend, str):
            self.backend = ParallelismBackend.from_str(self.backend)
        self.backend = ParallelismBackend.canonicalize(self.backend)
        for name in _SIZES:
            size = getattr(self, name)
            if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
                fail(f"ParallelismConfig.{name}", "None or an int >= 1", size)
        for name, why in _REFUSED:
            if getattr(self, name):
                fail(f"ParallelismConfig.{name}", f"left at its default (not supported: {why})", getattr(self, name))
        if self.backend is ParallelismBackend.AUTO:
            self.backend = (ParallelismBackend.NATIVE_HYBRID if self.hybrid_enabled() else
                            ParallelismBackend.CACHE_DIT if self.cp_enabled() else
                            ParallelismBackend.NATIVE_PYTORCH if self.tp_enabled() else ParallelismBackend.NONE)
        if not self.enabled():  # cache-dit: "No parallelism is enabled"
            fail("ParallelismConfig", "given ulysses_size, ring_size or tp_size > 1 (no parallelism is enabled)",
                 {n: getattr(self, n) for n in _SIZES})
        wanted = (ParallelismBackend.NATIVE_HYBRID if self.hybrid_enabled() else
                  ParallelismBackend.CACHE_DIT if self.cp_enabled() else ParallelismBackend.NATIVE_PYTORCH)
        if self.backend is not wanted:
            fail("ParallelismConfig.backend", f"{wanted} for these sizes", self.backend)
        if self.hybrid_enabled():
            fail("ParallelismConfig", "context parallelism (ulysses_size / ring_size) or tensor parallelism "
                 "(tp_size), not both: diffusers' ParallelConfig refuses the combination", "both")

    def _size(self, name: str) -> int:
        return getattr(self, name) or 1

    def enabled(self) -> bool:
        return any(self._size(n) > 1 for n in _SIZES)

    def cp_enabled(self) -> bool:
        return self._size("ulysses_size") > 1 or self._size("ring_size") > 1

    def tp_enabled(self) -> bool:
        return self._size("tp_size") > 1

    def usp_enabled(self) -> bool:
        return self._size("ulysses_size") > 1 and self._size("ring_size") > 1

    def hybrid_enabled(self) -> bool:
        return self.cp_enabled() and self.tp_enabled()

    def world_size(self) -> int:
        """The ranks the layout spans: ulysses x ring (x tp)."""
        return self._size("ulysses_size") * self._size("ring_size") * self._size("tp_size")

    def strify(self, details: bool = False) -> str:
        """cache-dit's tag (``Ulysses2_Ring2``), or with ``details`` its ``ParallelismConfig(...)`` line."""
        sizes = [(n, getattr(self, n)) for n in _SIZES if getattr(self, n) is not None]
        if details:
            extra = ", ulysses_anything=True" if self.ulysses_anything and self.ulysses_size is not None else ""
            inner = ", ".join(f"{n}={v}" for n, v in sizes)
            return f"ParallelismConfig(backend={self.backend}, {inner}{extra})"
        tags = {"ulysses_size": "Ulysses", "ring_size": "Ring", "tp_size": "TP"}
        parts = [f"{tags[n]}{v}" for n, v in sizes if n != "tp_size"]
        parts += ["UAA"] if self.ulysses_anything else []
        parts += [f"TP{self.tp_size}"] if self.tp_size is not None else []
        return "_".join(parts)
