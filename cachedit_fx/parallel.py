"""Context parallelism: every rank of the group that shards the sequence must cache with the same
config, or one rank would skip the middle blocks (and their collectives) while another runs them."""
from __future__ import annotations

import dataclasses

from .config import DBCacheConfig, TaylorSeerCalibratorConfig
from .errors import ConfigError


def chains_group(chains) -> str | None:
    """The process group the chains' state is reduced over (one per graph), or None."""
    return next((c.layout.group for c in chains if c.layout.group is not None), None)


def check_same_config(group: str, cache: DBCacheConfig, calib: TaylorSeerCalibratorConfig | None) -> None:
    """Compare the configs of every rank in ``group`` (all ranks call this at the same point).

    Raises:
        ConfigError: on every rank, naming the first field the ranks disagree on.
    """
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    pg = _resolve_process_group(group)
    mine = {**{f"cache_config.{k}": v for k, v in dataclasses.asdict(cache).items()},
            **{f"calibrator_config.{k}": v for k, v in (dataclasses.asdict(calib) if calib else {}).items()}}
    every: list = [None] * pg.size()
    dist.all_gather_object(every, mine, group=pg)
    for rank, theirs in enumerate(every):
        for name in sorted(set(mine) | set(theirs)):
            if theirs.get(name) != every[0].get(name):
                raise ConfigError(f"context parallelism: the ranks disagree on {name} (rank 0: "
                                  f"{every[0].get(name)!r}, rank {rank}: {theirs.get(name)!r}); every rank of the "
                                  "group must cache with the same config")
