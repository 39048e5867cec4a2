"""Which onnxruntime optimisation level repays its build: a cost model of the levels'
build time against the time their runs save, measured on the CPU provider.
"""

from __future__ import annotations

# Weights from which a reordered copy of them weighs on memory (issue 13 budgets the work's
# memory as a multiple of the model file); stats.piles_up reads it too.
LARGE_WEIGHTS_MB = 32

# Measured on the CPU provider (2 cores, instrumented models, runs as `collect_stats` makes
# them), each level's build over the one below and what its runs save per GMAC:
#
# - layout (NCHWc, "full") over extended: it reorders every weight, 2 ms a MB, and its
#   graph work grows faster than the node count, about 3.7 us * nodes**1.5 (ResNet-1202's
#   6,620 instrumented nodes: 2 s; MobileNetV2's 215: 0.015 s). Its runs save 11-15 ms a
#   GMAC on the ResNets at 224 and 30-46 ms on the MobileNets (16 images,
#   bench/results/levels.json and bench/README.md); priced at 11 ms. But it holds reordered
#   copies of the weights: work memory from 2.0-2.9x the file to 3.5-5.0x on ResNet-18,
#   -50 and -101, past issue 13's 3x. So where the weights pass LARGE_WEIGHTS_MB its saving
#   is set at 2 ms a GMAC on purpose: a short pass (ResNet-50 and -101 on 16 images) stays
#   at extended, and the level pays only over longer passes. Below it the copies cost at
#   most tens of MB (MobileNetV2: +30 MB), and the level is priced at its measured saving.
# - extended over none (fusions, constant folding): 0.04 to 0.11 ms a node, 1.4 to 2.1 ms
#   a GMAC; the cheap build and large saving are taken, so the doubtful case keeps it.
_LAYOUT_S_PER_NODE_TO_1_5 = 3.7e-6
_LAYOUT_S_PER_MB = 2e-3
_LAYOUT_SAVES_S_PER_GMAC = 11e-3
_LAYOUT_SAVES_S_PER_GMAC_ON_LARGE_WEIGHTS = 2e-3
_EXTENDED_S_PER_NODE = 4e-5
_EXTENDED_SAVES_S_PER_GMAC = 2.5e-3


def optimization_level(nodes: int, weight_mb: float, samples: int, macs_per_sample: int) -> str:
    """The highest onnxruntime optimisation level ("full", "extended" or "none") whose
    build cost over the level below is repaid over `samples` runs: ResNet-1202 on 16
    images would spend 2 s building the layout level to save 0.5 s, and 0.3 to 0.9 s
    building the fusions to save 0.1 s; MobileNetV2 builds the layout level in 0.04 s and
    saves 0.2 s. On large weights the layout level is priced to stay out of short passes,
    for its memory (see the constants above)."""
    gmacs = samples * macs_per_sample / 1e9
    layout_build = _LAYOUT_S_PER_NODE_TO_1_5 * nodes**1.5 + _LAYOUT_S_PER_MB * weight_mb
    layout_saves = (
        _LAYOUT_SAVES_S_PER_GMAC_ON_LARGE_WEIGHTS
        if weight_mb > LARGE_WEIGHTS_MB
        else _LAYOUT_SAVES_S_PER_GMAC
    )
    if gmacs * layout_saves >= layout_build:
        return "full"
    if gmacs * _EXTENDED_SAVES_S_PER_GMAC >= _EXTENDED_S_PER_NODE * nodes:
        return "extended"
    return "none"
