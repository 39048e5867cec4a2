"""onnxruntime sessions and execution-provider choice.

onnxruntime-gpu lists CUDAExecutionProvider even on machines where CUDA cannot
run, and asking for it there makes onnxruntime print a loud error from C++.
So CUDA is only chosen after quiet checks: the driver answers with a device,
the CUDA provider library and cuDNN load, and a tiny session really runs on it.
pip's CUDA and cuDNN (the nvidia-* packages torch also uses) are not on the
loader's path, so they are preloaded first, as onnxruntime-gpu recommends.

onnxruntime itself is imported by the functions that use it: `reduce` without data runs
no session and does not pay its import (issue 23).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnx_mbs.data.ready import numpy_type, takes_floats
from onnx_mbs.data.sources import Batch, DataSource, batch_inputs
from onnx_mbs.passes.errors import BadInputError, option

if TYPE_CHECKING:
    import onnxruntime as ort

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
REQUESTS = ("auto", "cpu", "cuda")
T = TypeVar("T")
R = TypeVar("R")
OPTIMIZATION_LEVELS = {  # names of onnxruntime's GraphOptimizationLevel members
    "full": "ORT_ENABLE_ALL",
    "extended": "ORT_ENABLE_EXTENDED",
    "none": "ORT_DISABLE_ALL",
}

# Nothing but fatal errors: onnxruntime logs its errors on stderr before raising them, and
# every error reaches the user as one line anyway (its warnings are noise for users).
_QUIET = 4


def check_request(request: str) -> None:
    """Refuse a providers request that is not "auto", "cpu" or "cuda", naming the option."""
    if request not in REQUESTS:
        raise BadInputError(f"unknown {option('--providers')} {request!r}: use auto, cpu or cuda")


def choose_providers(request: str = "auto") -> list[str]:
    """Providers for `request` ("auto", "cpu" or "cuda"); CUDA only when it can really run."""
    check_request(request)
    if request == "cpu":
        return [CPU]
    reason = cuda_unavailable_reason()
    if reason is None:
        return [CUDA, CPU]
    if request == "cuda":
        raise BadInputError(
            f"CUDA requested but {reason}; use {option('--providers', 'cpu')} (or auto)"
        )
    return [CPU]


def usable_onnxruntime():
    """onnxruntime, imported and checked to be a whole install: onnxruntime and
    onnxruntime-gpu share the package folder, and uninstalling one of the two (as an install
    that pulls in the other invites) leaves an empty namespace package behind."""
    try:
        import onnxruntime as ort
    except ImportError as error:
        raise BadInputError(
            f"onnxruntime cannot be imported ({error}); install it: pip install onnxruntime-gpu "
            "(or onnxruntime)"
        ) from None
    if not hasattr(ort, "InferenceSession"):
        raise BadInputError(
            "onnxruntime is broken (its package folder holds no onnxruntime: was onnxruntime or "
            "onnxruntime-gpu uninstalled beside the other?); reinstall the one you use: "
            "pip install --force-reinstall onnxruntime-gpu (or onnxruntime)"
        )
    return ort


@functools.cache
def cuda_unavailable_reason() -> str | None:
    """Why CUDA cannot run here, or None when it can. Prints nothing; cached per process."""
    ort = usable_onnxruntime()

    if CUDA not in ort.get_available_providers():
        return "this onnxruntime build has no CUDAExecutionProvider (install onnxruntime-gpu)"
    reason = _driver_reason()
    if reason is not None:
        return reason
    _preload_cuda_libraries()
    for library in (_cuda_provider_library(), _cudnn_soname()):
        try:
            ctypes.CDLL(library)
        except OSError as error:
            return f"a CUDA library does not load ({_first_line(error)})"
    return _probe_session_reason()


def _driver_reason() -> str | None:
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no NVIDIA driver (libcuda.so.1 does not load)"
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return "the NVIDIA driver does not initialise (no usable GPU)"
    if count.value < 1:
        return "the NVIDIA driver reports no GPU"
    return None


def _preload_cuda_libraries() -> None:
    """Load CUDA and cuDNN from pip's nvidia-* packages (onnxruntime-gpu 1.21+), silently:
    where they are missing the checks below say why CUDA cannot run."""
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    with _silenced_output(), contextlib.suppress(Exception):
        preload()


@contextlib.contextmanager
def _silenced_output():
    """Silence stdout and stderr at the file-descriptor level (C and Python prints alike)."""
    sys.stdout.flush(), sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1), os.dup2(null, 2)
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def _cuda_provider_library() -> str:
    import onnxruntime as ort

    return str(Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so")


def _cudnn_soname() -> str:
    # onnxruntime-gpu 1.18+ is built against cuDNN 9; it loads cuDNN lazily, so check it here.
    return "libcudnn.so.9"


def _probe_session_reason() -> str | None:
    """Run a 1x1 Conv on CUDA with onnxruntime's global logging silenced for the probe."""
    import onnxruntime as ort

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 2, 2])
    w = helper.make_tensor("w", TensorProto.FLOAT, [1, 1, 1, 1], [2.0])
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "probe", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    ort.set_default_logger_severity(4)
    try:
        session = make_session(model, [CUDA, CPU])
        if session.get_providers()[0] != CUDA:
            return "onnxruntime could not create the CUDA provider"
        out = session.run(None, {"x": np.ones((1, 1, 2, 2), np.float32)})[0]
        if not np.allclose(out, 2.0):
            return "a test Conv on CUDA gave wrong results"
    except Exception as error:  # any failure means "not usable", the reason is reported
        return f"a test session on CUDA failed ({_first_line(error)})"
    finally:
        ort.set_default_logger_severity(_QUIET)
    return None


def make_session(
    model: onnx.ModelProto | bytes | str | os.PathLike,
    providers: list[str],
    threads: int = 0,
    level: str = "full",
    side_branches_early: bool = False,
) -> ort.InferenceSession:
    """An InferenceSession that only logs errors; `threads` intra-op threads (0: default).

    `level` is onnxruntime's graph optimisation level: "full" (its default), "extended"
    (no layout transformation, NCHWc on CPU) or "none"; each is slower to build on graphs
    of thousands of nodes and only pays for itself over enough runs. `side_branches_early`
    runs nodes in onnxruntime's priority-based order, which runs a side branch (the
    statistics' reductions) as soon as its input exists; its default order ran the whole
    main path first and held every watched tensor until then (ResNet-1202: 310 against
    139 MB)."""
    ort = usable_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = _QUIET
    options.intra_op_num_threads = threads
    options.graph_optimization_level = getattr(
        ort.GraphOptimizationLevel, OPTIMIZATION_LEVELS[level]
    )
    if side_branches_early:
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif isinstance(model, os.PathLike):
        model = os.fspath(model)
    try:
        return ort.InferenceSession(model, options, providers=list(providers))
    except Exception as error:  # onnxruntime raises its own types (Fail, InvalidGraph...)
        said = _first_line(error)
        if isinstance(model, str):  # often a temporary file (the statistics' model), not theirs
            said = said.replace(f"Load model from {model} failed:", "")
        raise BadInputError(
            f"onnxruntime {ort.__version__} cannot load the model: {said}"
        ) from None


MAX_CONCURRENT_RUNS = 8


def concurrent_runs(providers: list[str], rows: int, samples: int) -> int:
    """How many runs of `rows` samples to have in flight at once (each on one intra-op
    thread): one per core on the CPU provider when a run is a single sample, whose small
    kernels spread poorly over cores (ResNet-101 at 224 and ResNet-1202 at 32: 16 samples
    1.25x faster as 2 single-threaded runs at a time than one after another on 2 threads,
    2 cores); one otherwise."""
    if providers[0] != CPU or rows != 1 or samples < 2:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, samples, MAX_CONCURRENT_RUNS))


def in_order(run: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[tuple[T, R]]:
    """(item, run(item)) for each of `items`, in their order, with up to `workers` runs in
    flight (threads: onnxruntime releases the GIL while it runs). Items are read at most
    2 * workers ahead, so a large data set is never held whole; results are handed back
    in order, so sums over them do not depend on timing."""
    if workers <= 1:
        for item in items:
            yield item, run(item)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque[tuple[T, Future[R]]] = deque()
        for item in items:
            pending.append((item, pool.submit(run, item)))
            if len(pending) >= 2 * workers:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


def release_freed_memory() -> None:
    """Hand memory freed by this process back to the system (glibc keeps it otherwise: a
    closed onnxruntime session or a dropped model copy would stay in the peak of every
    later step; ResNet-1202's statistics left 0.7x the model file behind). No-op elsewhere."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def feed_dtype(session: ort.InferenceSession, input_name: str, ready: bool = False) -> np.dtype:
    """The numpy type to feed `input_name`: preprocessed images are float, half or double;
    model-ready data (`ready`) is fed as it is, in the input's own type (uint8 images a
    graph casts itself, checked when the data was read)."""
    ort_type = _declared_type(session, input_name)
    dtype = _numpy_type_of(ort_type)
    if takes_floats(dtype):
        return dtype
    if ready:
        return ort_numpy_type(ort_type)
    raise BadInputError(_not_float(input_name, ort_type))


def _declared_type(session: ort.InferenceSession, input_name: str) -> str:
    """onnxruntime's type of `input_name` ("tensor(uint8)"), which the data is for."""
    declared = {i.name: i.type for i in session.get_inputs()}
    if input_name not in declared:
        raise BadInputError(
            f"the data is for input {input_name!r} but the model's inputs are {list(declared)}"
        )
    return declared[input_name]


def input_dtype(session: ort.InferenceSession, input_name: str) -> np.dtype | None:
    """numpy's type of `input_name`, which the data is for; None where numpy holds none."""
    return _numpy_type_of(_declared_type(session, input_name))


def ort_numpy_type(ort_type: str) -> np.dtype:
    """The numpy type of an onnxruntime input type such as "tensor(uint8)"."""
    dtype = _numpy_type_of(ort_type)
    if dtype is None:
        raise BadInputError(f"numpy cannot hold an input of type {ort_type}")
    return dtype


def _numpy_type_of(ort_type: str) -> np.dtype | None:
    """`ort_numpy_type`, None where there is none: a type numpy cannot hold, or no tensor (a
    sequence or map input, "seq(tensor(float))")."""
    if not ort_type.startswith("tensor("):
        return None
    try:
        elem = TensorProto.DataType.Value(
            ort_type.removeprefix("tensor(").removesuffix(")").upper()
        )
    except ValueError:  # a type this onnx does not know
        return None
    return numpy_type(elem)


def require_feedable(model: onnx.ModelProto, data: DataSource) -> None:
    """Refuse, before any work, the data `feed_dtype` will refuse for `model`: images are
    preprocessed to floats, which a non-float input (uint8 pixels its graph casts) does not
    take (retraining would otherwise run to the end first). Model-ready data is fed as it is,
    its type checked when it was read."""
    if data.preprocess is None:
        return
    for value in model.graph.input:
        elem = value.type.tensor_type.elem_type
        if value.name == data.input_name and not takes_floats(numpy_type(elem)):
            name = TensorProto.DataType.Name(elem).lower()
            raise BadInputError(_not_float(data.input_name, f"tensor({name})"))


def _not_float(input_name: str, declared: str) -> str:
    return (
        f"model input {input_name!r} has type {declared}; expected a float image tensor "
        f"(to feed it as it is: a model-ready .npz, an array named {input_name!r})"
    )


def pad_to_batch(session: ort.InferenceSession, input_name: str, x: np.ndarray) -> np.ndarray:
    """`x` padded to the model's fixed batch by repeating its last sample (a short last batch
    would not run); callers keep only the first len(x) rows of every per-sample output."""
    declared = next(i.shape for i in session.get_inputs() if i.name == input_name)
    return pad_rows(x, declared[0] if declared else None)


def pad_rows(x: np.ndarray, batch: object) -> np.ndarray:
    """`x` with its last sample repeated up to `batch` rows, when `batch` is a fixed size
    larger than len(x); else `x` itself."""
    if isinstance(batch, int) and 0 < len(x) < batch:
        return np.concatenate([x, np.repeat(x[-1:], batch - len(x), axis=0)])
    return x


def batch_feeds(
    session: ort.InferenceSession, input_name: str, feed_type: np.dtype, batch: Batch
) -> dict[str, np.ndarray]:
    """The inputs to run `batch` with: its x as `feed_type`, the other inputs it gives
    (model-ready data) as they are; each padded to the model's fixed batch."""
    feeds = batch_inputs(batch, input_name)
    feeds[input_name] = feeds[input_name].astype(feed_type, copy=False)
    return {name: pad_to_batch(session, name, array) for name, array in feeds.items()}


def session_provider(session: ort.InferenceSession) -> str:
    """The provider that actually runs the session (the first one onnxruntime kept)."""
    return session.get_providers()[0]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
