"""Data-parallel training across processes or Macs, on MLX's own distributed engine (`mlx.launch`).

`mlx.launch -n 2 -- gemma-mlx train ...` (or `--hostfile hosts.json` for several Macs) starts one
process per rank with the same command. Every rank reads the same data and model (at the same
paths) and computes the same epoch plan; each takes its own slice of every global batch, so the
global batch and the losses are those of one process, and no example is used twice. Rank 0 decides
(up to date, resume, start over), writes every output and prints the progress; the other ranks
follow what it broadcasts and stay quiet. Outside the launcher the world is one process and every
helper here is a no-op.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

LOST_PEER = "connection to a peer was lost"  # what MLX's ring backend raises when another rank died


@dataclass(frozen=True)
class World:
    rank: int
    size: int

    @property
    def main(self) -> bool:
        """Rank 0: the one that decides, writes and reports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


@lru_cache(maxsize=1)
def world() -> World:
    """The ranks this process is part of (one, unless started by mlx.launch)."""
    import mlx.core as mx

    group = mx.distributed.init()  # a singleton group when no launcher set one up
    return World(group.rank(), group.size())


def available_backends() -> list[str]:
    """The distributed backends this MLX build can start (for `gemma-mlx info`)."""
    import mlx.core as mx

    return [b for b in ("ring", "mpi", "jaccl", "nccl") if mx.distributed.is_available(backend=b)]


def shard(indices: list[int], here: World | None = None) -> list[int]:
    """This rank's contiguous slice of one global batch; together the slices are the batch, once each.

    A batch smaller than the number of ranks leaves some ranks an empty slice, never a repeat.
    """
    here = here or world()
    base, extra = divmod(len(indices), here.size)
    start = here.rank * base + min(here.rank, extra)
    return indices[start: start + base + (1 if here.rank < extra else 0)]


def all_sum(value):
    """The sum over ranks of an mx.array or a tree of them (the value itself with one rank)."""
    import mlx.core as mx
    from mlx.utils import tree_map

    if not world().distributed:
        return value
    return tree_map(lambda x: mx.distributed.all_sum(x), value)


def sum_numbers(numbers: dict[str, float]) -> dict[str, float]:
    """Sums over ranks of a few named numbers, in one message."""
    import mlx.core as mx

    if not world().distributed:
        return dict(numbers)
    keys = sorted(numbers)
    total = mx.distributed.all_sum(mx.array([float(numbers[k]) for k in keys], dtype=mx.float32))
    return dict(zip(keys, total.tolist()))


def broadcast_tree(tree) -> list[tuple[str, object]]:
    """Rank 0's arrays on every rank, as sorted (dotted key, array) pairs: resumed weights and optimizer state.

    Rank 0 first sends the keys, shapes and dtypes, so the other ranks need not hold the same tree
    (a fresh optimizer's state has fewer entries than a saved one); every rank then sums the arrays
    in the same, sorted order, the others sending zeros.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    here = world()
    flat = dict(tree_flatten(tree)) if here.main else {}
    if not here.distributed:
        return sorted(flat.items())
    spec = broadcast_json({key: [list(value.shape), str(value.dtype).rsplit(".", 1)[-1]] for key, value in flat.items()}
                          if here.main else None)
    pairs = []
    for key in sorted(spec):
        shape, dtype = spec[key]
        mine = flat[key] if here.main else mx.zeros(shape, dtype=getattr(mx, dtype))
        pairs.append((key, mx.distributed.all_sum(mine)))
    mx.eval([value for _, value in pairs])
    return pairs


def broadcast_json(value=None):
    """Rank 0's JSON-able value on every rank (a decision, a resume state, the run's paths)."""
    import mlx.core as mx
    import numpy as np

    here = world()
    if not here.distributed:
        return value
    payload = json.dumps(value).encode() if here.main else b""
    length = int(mx.distributed.all_sum(mx.array([len(payload)], dtype=mx.int32)).item())
    buffer = np.zeros(length, dtype=np.uint8)
    if here.main:
        buffer[:] = np.frombuffer(payload, dtype=np.uint8)
    data = mx.distributed.all_sum(mx.array(buffer, dtype=mx.int32))  # int32: uint8 sums would wrap
    return json.loads(np.array(data).astype(np.uint8).tobytes().decode())


def lost_peer(error: BaseException) -> bool:
    """True for the error a rank sees when another rank stopped (failed, interrupted, killed)."""
    return isinstance(error, RuntimeError) and LOST_PEER in str(error)
