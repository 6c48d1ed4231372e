"""Process groups and the three ways to spread training over ranks.

- data parallel (:mod:`.data_parallel`): every rank holds the whole model; gradients are
  averaged with bucketed all-reduces; ZeRO-1 (``--shard-optimizer``) spreads the optimizer
  state over ranks by leaf.
- FSDP (:mod:`.fsdp`): parameters, gradients and optimizer state are DTensors sharded on their
  first axis; a block's weights are gathered where the block runs.
- DCP checkpoints (:mod:`.dcp`): every rank writes its shards; a folder resumes on any number
  of ranks.
"""

from gptfn.distributed.data_parallel import (
    BUCKET_BYTES,
    DistEnv,
    all_reduce_mean,
    assign_owners,
    broadcast_from_owners,
    gather_to_main,
    mean_scalar,
    setup,
    teardown,
)
from gptfn.distributed.dcp import load_dcp, read_dcp, read_dcp_meta, save_dcp
from gptfn.distributed.fsdp import (
    gather,
    gather_tree,
    is_sharded,
    local,
    local_bytes,
    make_mesh,
    parse_mesh,
    regather_saved,
    shard,
    unshard,
)

__all__ = [
    "BUCKET_BYTES",
    "DistEnv",
    "all_reduce_mean",
    "assign_owners",
    "broadcast_from_owners",
    "gather",
    "gather_to_main",
    "gather_tree",
    "is_sharded",
    "load_dcp",
    "local",
    "local_bytes",
    "make_mesh",
    "mean_scalar",
    "parse_mesh",
    "read_dcp",
    "read_dcp_meta",
    "regather_saved",
    "save_dcp",
    "setup",
    "shard",
    "teardown",
    "unshard",
]
