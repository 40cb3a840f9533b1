"""Item-sharded RecVAE on torch.distributed: fc1, the old encoder's fc1 and the decoder split by item
rows over the "items" dimension of a ("data", "items") device mesh; everything else replicated.

Inside an initialised process group of more than one process (torchrun), recvae_fast.fit trains a
ShardedRecVAE and recvae_fast.evaluate / recommend score one; the explicit API: `fit_sharded` trains,
`recommend_sharded` and `evaluate_sharded` score, `save_checkpoint` / `load_checkpoint` go through torch.distributed.checkpoint,
`load_into_recvae` reads a checkpoint into a one-device RecVAE without a process group, and
`gather_full_state_dict` gives the authors'-format state_dict on rank 0.
"""
from .checkpoint import gather_full_state_dict, latest_checkpoint, load_checkpoint, load_into_recvae, save_checkpoint
from .inference import evaluate_sharded, recommend_sharded
from .mesh import ItemLayout, init_distributed, item_layout, make_item_mesh, shard_bounds
from .model import ShardedRecVAE
from .training import fit_sharded, sharded_train_step

__all__ = [
    "ItemLayout", "init_distributed", "item_layout", "make_item_mesh", "shard_bounds", "ShardedRecVAE", "fit_sharded",
    "sharded_train_step", "recommend_sharded", "evaluate_sharded", "save_checkpoint", "load_checkpoint",
    "latest_checkpoint", "load_into_recvae", "gather_full_state_dict",
]
