"""The retraining schedule: the default learning rate for a batch size, warm-up, cosine decay.

Torch-free, so that the command line can state the defaults without importing torch.
"""

from __future__ import annotations

import math

DEFAULT_LR_PER_64 = 0.01  # the default learning rate at a global batch of 64
DEFAULT_WARMUP = 0.05  # the fraction of all steps spent warming up


def default_lr(batch_size: int) -> float:
    """The linear scaling rule (Goyal et al. 2017): 0.01 for every 64 images of the global batch."""
    return DEFAULT_LR_PER_64 * batch_size / 64


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps to the full rate, then cosine to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))
