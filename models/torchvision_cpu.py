"""Import torchvision next to the CPU torch this project pins.

PyPI's torchvision wheel is built against a CUDA torch; next to the CPU torch its
C++ ops do not load and `import torchvision` fails with "operator torchvision::nms
does not exist". Its model code is pure Python and never calls those ops, so when
(and only when) that happens the two modules that register them are replaced by
empty ones and torchvision is imported again. Models build, run and export to ONNX;
torchvision.ops (nms, roi_align) stay unavailable. A torchvision built for the same
torch imports untouched.

    from onnx_mbs.models.torchvision_cpu import import_torchvision

    torchvision = import_torchvision()
    model = torchvision.models.resnet18()

Libraries that import torchvision themselves (timm, torchmetrics, so Olive) work
once this has run.
"""

from __future__ import annotations

import importlib
import sys
import types

# The modules that register torchvision's C++ ops with torch at import time.
OP_REGISTRATIONS = ("torchvision._meta_registrations", "torchvision._autograd_registrations")


def import_torchvision() -> types.ModuleType:
    """`torchvision`, with its op registrations left out when they cannot load (see above)."""
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as error:
        if "torchvision::" not in str(error):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # the half-imported package
    for name in OP_REGISTRATIONS:
        sys.modules[name] = types.ModuleType(name)
    return importlib.import_module("torchvision")
