"""nanoblock: nanoGPT's transformer Block as hand-written CPU and CUDA kernels.

    import nanoblock
    block = nanoblock.Block(nanoblock.GPTConfig(n_embd=384, n_head=6))
    y = block(x)                  # x [B, T, n_embd]

`nanoblock.Block` is a drop-in for nanoGPT's `Block` (same config fields, same
parameter names); `nanoblock.GPT` is nanoGPT's GPT built of them.
"""
__version__ = "0.1.0"

from . import ops  # noqa: F401  (loads the compiled ops, torch.ops.nanoblock)
from .block import Block, GPTConfig  # noqa: E402
from .model import GPT, patch  # noqa: E402

__all__ = ["Block", "GPT", "GPTConfig", "patch", "ops", "__version__"]
