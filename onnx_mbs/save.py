"""Writing outputs safely: never over a file the run reads, never a partial file.

Every output (the model, its external data, the --report folder) is written
under a hidden temporary name beside its destination (inside an existing report
folder, on its file system) and renamed into place only once everything is
written, so a failed or interrupted run leaves nothing behind and a report
never appears without its model. Nothing a run did not write is ever removed:
an existing report folder only has the report's own files replaced (see
passes/scratch.py for the temporaries).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import onnx
from onnx.external_data_helper import load_external_data_for_tensor

from onnx_mbs.passes import BadInputError
from onnx_mbs.passes.integrity import model_tensors, refuse_unread_external_data
from onnx_mbs.passes.scratch import TempFolders, is_ours
from onnx_mbs.proto_writer import serialized_size, write_model

TWO_GB = 2**31 - 1


def model_files(model: str | os.PathLike) -> list[Path]:
    """The model file and the external-data files it names (what reading it touches)."""
    path = Path(model)
    files = [path]
    if not _may_name_external_data(path):
        return files
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # unreadable models are refused by whoever loads them
        return files
    # Every tensor onnx.load reads external data for: subgraphs' and functions' too.
    for tensor in model_tensors(proto):
        for entry in tensor.external_data:
            if entry.key == "location":
                files.append(path.parent / entry.value)
    return files


def _may_name_external_data(path: Path) -> bool:
    """False when `path` cannot name external data: its bytes lack the key "location" that
    every external-data entry spells out. A scan of the mapped file, not a parse of it."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return data.find(b"location") >= 0
    except (OSError, ValueError):  # unreadable or empty: whoever loads it says why
        return True


def data_path(spec: object) -> Path | None:
    """The file or folder a --data SPEC reads (an IDX ':train'/':test' suffix dropped)."""
    from onnx_mbs.data.spec import split_suffix

    return split_suffix(os.fspath(spec))[0] if isinstance(spec, (str, os.PathLike)) else None


def check_outputs(
    output: str | os.PathLike | None,
    report: str | os.PathLike | None = None,
    *,
    models: Mapping[str, object] | None = None,
    data: Mapping[str, object] | None = None,
    report_files: Collection[str] = (),
    checkpoint: str | os.PathLike | None = None,
) -> None:
    """Refuse, before any work, outputs that would overwrite what the run reads or cannot be
    written. `models` and `data` map a role ("the input model", "--data"...) to a model path
    or a data spec: models count with their external data, data folders with all inside.
    An existing --report folder may hold only `report_files` (an earlier report, replaced
    file by file): nothing else in it is ever touched, so a folder holding anything else, an
    input or the output is refused. `checkpoint` (the file `retrain --checkpoint` writes) is
    held to the inputs as the output is, and the output may be neither it nor its folder."""
    if output is not None and os.fspath(output) == "-":
        raise BadInputError(
            "output - would write a file named '-', not to stdout: models are written to files "
            "only (stdout carries --json); give a path (./- for a file of that name)"
        )
    sources: list[tuple[Path, str]] = []
    for role, model in (models or {}).items():
        if isinstance(model, (str, os.PathLike)):
            sources += [(path, role) for path in model_files(model)]
    for role, spec in (data or {}).items():
        if (path := data_path(spec)) is not None:
            sources.append((path, role))
    targets = []
    if output is not None:
        targets = [(Path(output), "output"), (Path(f"{output}.data"), "output's external data")]
    if report is not None:
        targets.append((Path(report), "--report folder"))
    if checkpoint is not None:
        file = Path(checkpoint)
        targets.append((file, "--checkpoint file"))
        for path, what in ((file, "checkpoint"), (file.parent, "--checkpoint folder")):
            if output is not None and Path(output).resolve() == path.resolve():
                raise BadInputError(
                    f"output {output} is the {what} {path}, which this run writes; "
                    "choose another path"
                )
    for target, what in targets:
        resolved = target.resolve()
        for source, role in sources:
            src = source.resolve()
            if resolved == src or (src.is_dir() and resolved.is_relative_to(src)):
                where = "is" if resolved == src else "is inside"
                raise BadInputError(
                    f"{what} {target} {where} {role} {source}, which this run reads; "
                    "choose another path (inputs are never modified)"
                )
    if output is not None:
        out = _file_path(output)
        if out.is_dir():
            raise BadInputError(f"output path {out} is a folder; give a file name")
        _check_writable_folder(out.parent, "output")
    if report is not None:
        folder = Path(report)
        if folder.is_symlink() and not folder.exists():
            # No folder to write into, and the report's rename fails on it after the model's.
            raise BadInputError(
                f"--report {folder} is a link to nothing ({os.readlink(folder)}); give a folder "
                "name, or make the folder it points to"
            )
        if folder.exists() and not folder.is_dir():
            raise BadInputError(f"--report {folder} is a file; give a folder name")
        if output is not None and folder.resolve() == Path(output).resolve():
            raise BadInputError(f"--report {folder} is the output model's path; give a folder")
        _check_report_folder(folder, output, sources, report_files)
        _check_writable_folder(folder if folder.is_dir() else folder.parent, "--report")


def _check_report_folder(
    folder: Path,
    output: str | os.PathLike | None,
    sources: list[tuple[Path, str]],
    report_files: Collection[str],
) -> None:
    """The --report folder holds no input, not the output, and nothing but an earlier report."""
    inside = folder.resolve()
    written = [] if output is None else [(Path(output), "the output model")]
    held = [(p, role) for p, role in [*sources, *written] if p.resolve().is_relative_to(inside)]
    if held:
        path, role = held[0]
        raise BadInputError(
            f"--report folder {folder} holds {role} {path}; give a report folder of its own "
            "(the report never shares a folder with what the run reads or writes)"
        )
    if not folder.is_dir():
        return
    try:
        # A report file's name held by a folder or a link is not an earlier report either.
        foreign = sorted(
            p.name
            for p in folder.iterdir()
            if (p.name not in report_files or p.is_symlink() or not p.is_file())
            and not is_ours(p.name)  # a report being written there (see _stage_folder)
        )
    except OSError as error:
        raise BadInputError(f"cannot read --report folder {folder}: {error.strerror}") from None
    if foreign:
        more = f" (+{len(foreign) - 3} more)" if len(foreign) > 3 else ""
        shown = ", ".join(foreign[:3]) + more
        raise BadInputError(
            f"--report folder {folder} holds files onnx-mbs did not write ({shown}); give a new "
            "or empty folder (nothing in it was touched)"
        )


def _file_path(output: str | os.PathLike) -> Path:
    """`output` as a file's path. A name ending in a separator means a folder, which Path
    forgets ("new/" becomes "new"): writing would make a file of the folder's name."""
    name = os.fspath(output)
    if name.endswith(tuple(filter(None, (os.sep, os.altsep)))):
        raise BadInputError(f"output path {name} names a folder; give a file name")
    return Path(name)


def _check_writable_folder(folder: Path, what: str) -> None:
    if not folder.resolve().is_dir():
        raise BadInputError(f"{what} folder {folder} does not exist; create it first")
    probe = TempFolders()
    try:
        probe.make(folder)
    except OSError as error:
        raise BadInputError(f"cannot write to {what} folder {folder}: {error.strerror}") from None
    finally:
        probe.remove_all()


def check_output_path(output: str | os.PathLike, *inputs: str | os.PathLike | None) -> Path:
    """Refuse an output that would overwrite an input model or land in a missing folder."""
    check_outputs(output, models={f"input {k + 1}": m for k, m in enumerate(inputs)})
    return Path(output)


def default_output(model: str | os.PathLike) -> Path:
    """`model.onnx` -> `model.mbs.onnx` beside it: `onnx-mbs reduce model.onnx` needs no -o."""
    path = Path(model)
    stem = path.name[: -len(".onnx")] if path.name.endswith(".onnx") else path.name
    return path.with_name(f"{stem}.mbs.onnx")


def save_model(
    model: onnx.ModelProto,
    output: str | os.PathLike,
    report: tuple[str | os.PathLike, Callable[[Path], object]] | None = None,
) -> Path:
    """Write `model` to `output` atomically (external data beside it past 2 GB).

    `report`, a (folder, writer) pair, is written into a temporary folder and
    appears together with the model. The caller's model is left as it was.
    """
    out = _file_path(output)
    refuse_unread_external_data(
        model, "the model", "load it with its external data to save it; nothing was written"
    )
    with _staging(out.parent) as stage:
        staged = [*_stage_model(model, out, stage)]
        if report is not None:
            try:  # staged beside the report's folder, which may be on another (full) disk
                staged.append(_stage_folder(Path(report[0]), report[1], stage))
            except OSError as error:
                raise _cannot_write(Path(report[0]), error) from None
        _publish(staged)
    return out


def save_folder(folder: str | os.PathLike, writer: Callable[[Path], object]) -> Path:
    """Write a folder (e.g. a report without a model) atomically through `writer(tmp_folder)`."""
    target = Path(folder)
    with _staging(target.parent) as stage:
        _publish([_stage_folder(target, writer, stage)])
    return target


@contextmanager
def _staging(folder: Path) -> Iterator[Callable[[Path], Path]]:
    """Hand out temporary names; remove whatever is left of them however the block ends
    (errors, Ctrl-C, SIGTERM). OS errors become one line: the disk is full, read-only..."""
    temps = TempFolders()
    try:
        yield temps.make
    except OSError as error:
        raise _cannot_write(folder, error) from None
    finally:
        temps.remove_all()


def _cannot_write(where: Path, error: OSError) -> BadInputError:
    return BadInputError(f"cannot write to {where}: {error.strerror or error}; nothing was written")


def _stage_model(
    model: onnx.ModelProto, out: Path, temp: Callable[[Path], Path]
) -> list[tuple[Path, Path]]:
    folder = temp(out.parent)
    tmp = folder / out.name
    if serialized_size(model) > TWO_GB:
        data = f"{out.name}.data"
        _check_own_data(out, out.parent / data)
        held = [  # each with whether its data_location was set (to DEFAULT): kept so
            (t, t.HasField("data_location"))
            for t in model_tensors(model)
            if t.data_location != onnx.TensorProto.EXTERNAL
        ]
        try:
            onnx.save(model, tmp, save_as_external_data=True, location=data)
        finally:  # however it ended (a full disk, Ctrl-C): the caller's model as it was
            _weights_back(held, folder)
        _set_mode(folder / data, 0o666)
        staged = [(folder / data, out.parent / data)]
    else:
        write_model(model, tmp)  # a tensor at a time: no serialized copy of the weights
        staged = []
    _set_mode(tmp, 0o666)
    return [*staged, (tmp, out)]  # the model last: it never appears without its data


def _weights_back(held: list[tuple[onnx.TensorProto, bool]], folder: Path) -> None:
    """The tensors `held` in memory before `onnx.save` moved them to external data in
    `folder` (each with whether its data_location was set), in memory again as they were:
    onnx.save clears a tensor's bytes once they are written, so after an error some are in
    the file and the rest only marked."""
    for tensor, located in held:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        if not tensor.HasField("raw_data"):
            load_external_data_for_tensor(tensor, str(folder))
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
        if not located:
            tensor.ClearField("data_location")


def _check_own_data(out: Path, data: Path) -> None:
    """Refuse to replace `data`, the external data `out` is about to get, unless it is the
    external data of the `out` this write replaces: any other file of that name holds
    another model's weights (or those of no model onnx-mbs can see)."""
    if not os.path.lexists(data):
        return
    named = {os.path.normpath(p) for p in model_files(out)[1:]} if out.is_file() else set()
    if os.path.normpath(data) not in named:
        raise BadInputError(
            f"output's external data {data} exists and is not {out}'s own (another model's "
            "weights?); nothing was written: choose another output name"
        )


def _stage_folder(
    target: Path, writer: Callable[[Path], object], temp: Callable[[Path], Path]
) -> tuple[Path, Path]:
    if target.is_dir():
        # Its files are renamed into it, so they are staged inside it: on its own file
        # system (a mount point, or a link to one, refuses renames from beside it).
        folder = temp(target)
    else:
        folder = temp(target.parent) / target.name
        folder.mkdir()
    writer(folder)
    _set_mode(folder, 0o777)
    for path in folder.iterdir():
        _set_mode(path, 0o666)
    return folder, target


def _publish(staged: list[tuple[Path, Path]]) -> None:
    """Rename every staged path into place. A folder that exists already (an earlier report)
    gets the staged files renamed into it one by one: nothing else in it is touched."""
    for tmp, final in staged:
        if tmp.is_dir() and final.is_dir():
            for path in sorted(tmp.iterdir()):
                os.replace(path, final / path.name)
        else:
            os.replace(tmp, final)


def _set_mode(path: Path, full: int) -> None:
    """What a plain open()/mkdir() would give: `full` less the umask (mkstemp/mkdtemp use 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, full & ~umask)
