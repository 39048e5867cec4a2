"""`read_model` reads a file once: the checker parses the bytes read, then the model is
parsed from them; what comes back is what `onnx.load` reads, whatever the file holds."""

from __future__ import annotations

import onnx
import pytest
from onnx_builders import conv_relu_model

from onnx_mbs.passes import BadInputError, read_model


def _saved(tmp_path, name: str, **options) -> tuple:
    path = tmp_path / name
    onnx.save(conv_relu_model(), path, **options)
    return path, onnx.load(path)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("plain.onnx", {}),
        ("text.txtpb", {}),  # onnx.save and onnx.load pick the text format by extension
        (
            "ext.onnx",
            {"save_as_external_data": True, "location": "ext.data", "size_threshold": 0},
        ),
    ],
)
def test_read_model_gives_what_onnx_load_reads(tmp_path, monkeypatch, name, options):
    path, expected = _saved(tmp_path, name, **options)
    monkeypatch.chdir(tmp_path.parent)  # external data is found next to the model, not here
    model = read_model(path)
    assert model.SerializeToString() == expected.SerializeToString()


def test_the_checker_reads_the_bytes_read_once(tmp_path, monkeypatch):
    path, _ = _saved(tmp_path, "plain.onnx")
    checked = []
    check = onnx.checker.check_model

    def recording(model, *args, **kwargs):
        checked.append(type(model))
        return check(model, *args, **kwargs)

    monkeypatch.setattr(onnx.checker, "check_model", recording)
    read_model(path)
    assert checked == [bytes]  # not the path (a second read), not our parsed copy


def test_a_file_the_checker_refuses_is_still_refused_in_one_line(tmp_path):
    model = conv_relu_model()
    model.graph.node[0].input[0] = "nowhere"  # reads a tensor nothing makes
    path = tmp_path / "bad.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(BadInputError, match="not valid ONNX") as error:
        read_model(path)
    assert "\n" not in str(error.value)
