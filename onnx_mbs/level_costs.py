"""Which onnxruntime optimisation level repays its build: a cost model of the levels'
build time against the time their runs save, measured on the CPU provider.
"""

from __future__ import annotations

# Measured on the CPU provider (2 cores, instrumented ResNet-50, -101 and -1202, deploy
# and BatchNorm forms, runs as `collect_stats` makes them): each level's build cost over
# the one below, per node and per MB of weights, and what its runs save per GMAC. The
# layout (NCHWc) level reorders every weight: 0.3 ms a node, 2 ms a MB (ResNet-101 at
# 224: 0.3 s). Its saving is set at 2 ms a GMAC, below what it measures on the ResNets at
# 224 (11-15 ms a GMAC on 16 images, bench/results/levels.json), on purpose: it holds
# reordered copies of the weights (work memory from 2.0-2.9x the file to 3.5-5.0x), so a
# short pass (ResNet-50 and -101 on 16 images) stays at extended and within issue 13's
# memory budget of 3x the file, and the level pays only over longer passes. The extended
# level over none (fusions, constant folding): 0.04 to 0.11 ms a node, 1.4 to 2.1 ms a
# GMAC; the cheap build and large saving are taken, so the doubtful case keeps it.
_LEVEL_COSTS = (("full", 3e-4, 2e-3, 2e-3), ("extended", 4e-5, 0.0, 2.5e-3))


def optimization_level(nodes: int, weight_mb: float, samples: int, macs_per_sample: int) -> str:
    """The highest onnxruntime optimisation level ("full", "extended" or "none") whose
    build cost over the level below is repaid over `samples` runs: ResNet-1202 on 16
    images would spend 2 s building the layout level to save 0.5 s, and 0.3 to 0.9 s
    building the fusions to save 0.1 s. The layout level is priced to stay out of short
    passes, for its memory (see _LEVEL_COSTS)."""
    gmacs = samples * macs_per_sample / 1e9
    for level, s_per_node, s_per_mb, saves_s_per_gmac in _LEVEL_COSTS:
        if gmacs * saves_s_per_gmac >= nodes * s_per_node + weight_mb * s_per_mb:
            return level
    return "none"
