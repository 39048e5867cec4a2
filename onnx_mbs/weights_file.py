"""Weights as file pages for onnxruntime: large tensors written page-aligned as external
data, which onnxruntime maps instead of copying (CPU), and the analysis form's weights lent
to it while the statistics run (memory: issue 13); models evaluated from a file so written.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import onnx
from onnx import TensorProto

from onnx_mbs.passes.errors import temporary_folder_error
from onnx_mbs.passes.external_data import WEIGHTS_FILE, placed_apart, weights_apart
from onnx_mbs.passes.scratch import scratch_folder
from onnx_mbs.runtime import release_freed_memory

# onnxruntime maps external tensors at page-aligned offsets instead of copying them (CPU).
PAGE = 4096


def write_with_weights(model: onnx.ModelProto, weights: Sequence[TensorProto], path: Path) -> None:
    """Write `model` with `weights` as initializers ahead of its own, one tensor at a time:
    large ones as external data in WEIGHTS_FILE beside `path` (appended to it if it is
    there), the rest embedded; weights set aside there already stay references.
    onnxruntime maps page-aligned external tensors instead of copying them (CPU): the
    session holds them once, as file pages (memory: issue 13)."""
    own = list(model.graph.initializer)
    del model.graph.initializer[:]
    with open(path.parent / WEIGHTS_FILE, "ab") as data:
        model.graph.initializer.extend(placed_apart(t, data, PAGE) for t in weights)
    model.graph.initializer.extend(own)
    with open(path, "wb") as f:
        f.write(model.SerializeToString())


class HeldModel:
    """A model with a single owner, so that its weights can be lent out and their memory
    freed meanwhile (`weights_aside`). Wrap it and keep no other reference:
    `held = HeldModel(loaded.model)`, then `held.take()` hands it back."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self._model: onnx.ModelProto | None = model

    @property
    def model(self) -> onnx.ModelProto:
        """The model, while it is here (not lent, not taken)."""
        if self._model is None:
            raise RuntimeError("the model is lent out or was taken")
        return self._model

    @property
    def lent(self) -> bool:
        return self._model is None

    def take(self) -> onnx.ModelProto:
        """The model, handed back; this holder lets it go."""
        model = self.model
        self._model = None
        return model


@contextmanager
def runnable_file(model: onnx.ModelProto | HeldModel) -> Iterator[Path]:
    """The path of `model` written for onnxruntime to map, in a scratch folder removed
    afterwards: its large weights page-aligned as external data. A session made from it
    holds them once, as file pages, where one made from the model held a serialized copy
    and its own beside the caller's (eval of ResNet-1202: 6x the file). A HeldModel is let
    go once written, so no parsed copy of its weights is held while the session runs."""
    with scratch_folder() as folder:
        path = folder / "model.onnx"
        source = model.model if isinstance(model, HeldModel) else model
        try:
            light, apart = weights_apart(source, folder, PAGE)
            del source, apart
            if isinstance(model, HeldModel):
                model.take()
                release_freed_memory()
            with open(path, "wb") as f:
                f.write(light.SerializeToString())
        except OSError as e:
            raise temporary_folder_error(e) from None
        del light
        yield path


@contextmanager
def weights_aside(held: HeldModel) -> Iterator[tuple[onnx.ModelProto, Path]]:
    """Lend the held model's weights to onnxruntime while the statistics run.

    Yields (a copy of the model whose large weights are references, the folder whose
    WEIGHTS_FILE holds them) for `collect_stats(..., weights_folder=)`, and meanwhile
    holds no parsed copy of them: `held` lets the model go and, afterwards, holds the
    model read back from the file, equal to what it was. Protobuf frees a model's memory
    only with the whole model, so emptying its tensors would not do (issue 13).
    """
    with scratch_folder() as folder:
        try:
            light, apart = weights_apart(held.model, folder, PAGE)
        except OSError as e:
            raise temporary_folder_error(e) from None
        # name -> whether its data_location field was set, to give each back as it was
        lent = {t.name: t.HasField("data_location") for t in apart}
        del apart
        held.take()  # read back below
        release_freed_memory()
        try:
            yield light, folder
        finally:
            held._model = _taken_back(light, folder, lent)


def _taken_back(model: onnx.ModelProto, folder: Path, lent: dict[str, bool]) -> onnx.ModelProto:
    """`model` with the weights `weights_aside` lent from it read back in place, each
    tensor's fields as they were."""
    with open(folder / WEIGHTS_FILE, "rb") as data:
        for tensor in model.graph.initializer:
            if tensor.name not in lent:
                continue
            where = {e.key: e.value for e in tensor.external_data}
            data.seek(int(where["offset"]))
            tensor.raw_data = data.read(int(where["length"]))
            del tensor.external_data[:]
            if lent[tensor.name]:
                tensor.data_location = TensorProto.DEFAULT
            else:
                tensor.ClearField("data_location")
    return model
