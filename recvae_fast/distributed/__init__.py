"""Item-sharded RecVAE on torch.distributed: fc1, the old encoder's fc1 and the decoder split by item
rows over the "items" dimension of a ("data", "items") device mesh; everything else replicated."""
from .mesh import ItemLayout, item_layout, make_item_mesh, shard_bounds
from .model import ShardedRecVAE

__all__ = ["ItemLayout", "item_layout", "make_item_mesh", "shard_bounds", "ShardedRecVAE"]
