"""Context parallelism: every rank of the group that shards the sequence must cache with the same
config, or one rank would skip the middle blocks (and their collectives) while another runs them."""
from __future__ import annotations

import dataclasses

from ..config import DBCacheConfig, TaylorSeerCalibratorConfig
from ..errors import ConfigError, NoCacheableChain


def chains_group(chains) -> str | None:
    """The process group the chains' state is reduced over (one per graph), or None."""
    return next((c.layout.group for c in chains if c.layout.group is not None), None)


def model_group(module) -> str | None:
    """The process group diffusers' ``enable_parallelism`` shards ``module``'s sequence over, by name
    (ring x Ulysses flattened), or None: what the eager cache, which sees no graph, reduces over."""
    cp = getattr(getattr(module, "_parallel_config", None), "context_parallel_config", None)
    mesh = getattr(cp, "_flattened_mesh", None)
    if mesh is None or mesh.size() < 2:
        return None
    return mesh.get_group().group_name


def own_shard(x, like, group: str):
    """This rank's part of ``x`` where ``like`` is its shard: ``x`` split in equal parts along the one dim
    where it is group-size times larger, as diffusers shards a block's input inside the block's own hook
    (Wan splits the sequence at ``blocks.0``), which the eager cache's wrapper around the block sees unsplit.

    Raises:
        NoCacheableChain: when no dim relates the shapes that way (an uneven "anything" split).
    """
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    pg = _resolve_process_group(group)
    dims = [d for d in range(x.dim()) if x.dim() == like.dim() and x.shape[d] == like.shape[d] * pg.size()
            and x.shape[:d] + x.shape[d + 1:] == like.shape[:d] + like.shape[d + 1:]]
    if len(dims) != 1:
        raise NoCacheableChain(f"context parallelism: the first block's input {tuple(x.shape)} and output "
                               f"{tuple(like.shape)} are not related by an even split over {pg.size()} ranks")
    return x.chunk(pg.size(), dim=dims[0])[dist.get_rank(pg)]


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
