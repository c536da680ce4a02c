"""Kernel text handed to NVRTC as files (tq_kernels.kernel_file): what MLX records for a
kernel is two include lines, and the preprocessed kernel is the text itself."""

import shutil
import subprocess

import pytest
import tq_kernels.kernel_file as kernel_file
from tq_kernels.attention_layout import AttendLayout, KeyPartLayout, ValuePartLayout
from tq_kernels.attention_source import attend_source
from tq_kernels.kernel_file import by_file
from tq_kernels.minify import minify

_HEADER = "#define TQ_TWICE(x) (2 * (x))\nstruct tq_pair { float a, b; };\n"
_BODY = "o[0] = TQ_TWICE(a[a_strides[0]]) + (float)b_shape[1];\n"


@pytest.fixture
def text_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TQ_KERNEL_TEXT_DIR", str(tmp_path / "kernels"))
    monkeypatch.setattr(kernel_file, "TEXT_BY_FILE", True)
    return tmp_path / "kernels"


def _included(line: str) -> str:
    assert line.startswith('#include "'), line
    return line.split('"')[1]


def test_the_recorded_source_is_include_lines_of_files_holding_the_text(text_dir):
    header, source = by_file(_HEADER, _BODY, ["a", "b", "c"])
    head_path, body_path = _included(header), _included(source.splitlines()[0])
    assert open(head_path).read() == _HEADER and open(body_path).read() == _BODY
    assert header.count("\n") == 1 and source.count("\n") == 2  # the include, the names
    assert "TQ_TWICE" not in header + source
    # The same text is the same file; other text another.
    assert by_file(_HEADER, _BODY, ["a", "b", "c"]) == (header, source)
    other = by_file(_HEADER, _BODY + "o[1] = 0;\n", ["a", "b", "c"])[1]
    assert _included(other.splitlines()[0]) != body_path


def test_mlx_passes_the_same_shape_arguments(text_dir):
    """MLX gives an input its shape, strides and ndim where the source string names them
    (a substring search): the include line must name exactly those the body uses."""
    names = ["a", "b", "c"]
    source = by_file(_HEADER, _BODY, names)[1]
    for n in names:
        for suffix in ("_shape", "_strides", "_ndim"):
            assert (n + suffix in source) == (n + suffix in _BODY), n + suffix


def test_an_unwritable_directory_keeps_the_text(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("TQ_KERNEL_TEXT_DIR", str(blocker / "kernels"))
    monkeypatch.setattr(kernel_file, "TEXT_BY_FILE", True)
    assert by_file(_HEADER, _BODY, ["a"]) == (_HEADER, _BODY)


def test_switched_off_keeps_the_text(text_dir, monkeypatch):
    monkeypatch.setattr(kernel_file, "TEXT_BY_FILE", False)
    assert by_file(_HEADER, _BODY, ["a"]) == (_HEADER, _BODY)
    assert not text_dir.exists()


@pytest.mark.skipif(shutil.which("cpp") is None, reason="no C preprocessor")
def test_an_attend_kernel_preprocesses_to_its_own_text(text_dir, tmp_path):
    """The kernel as MLX assembles it (header, then the body inside the function), with the
    text inline and with the include lines, through the C preprocessor: the same tokens."""
    # K4V3 of head_dim 128, 4 query rows, queries rotated in the kernel (raw mode).
    keys, values = (KeyPartLayout(128, 4, False, 0, 0),), (ValuePartLayout(128, 3, 0),)
    layout = AttendLayout(keys, values, 4, 128, 128, 128, True, False, False)
    _, header, body, inputs, _ = attend_source(layout, "cuda", True)
    header, body = minify(header), minify(body)

    def expanded(h: str, b: str) -> list[str]:
        unit = tmp_path / "unit.cu"
        unit.write_text(h + "\nvoid kernel() {\n" + b + "\n}\n")
        out = subprocess.run(
            ["cpp", "-P", "-w", str(unit)], check=True, capture_output=True, text=True
        ).stdout
        return out.split()

    assert expanded(*by_file(header, body, inputs)) == expanded(header, body)
