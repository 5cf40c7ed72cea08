"""Pictures of topologies (``bf.topology.draw``) and ``python -m bluefog_fn.topology``."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

import bluefog_fn as bf
from bluefog_fn.topology.__main__ import constructors, main

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_draw_writes_a_valid_non_trivial_png(tmp_path: Path) -> None:
    path = tmp_path / "ring.png"
    fig = bf.topology.draw(bf.topology.exponential_two(8), path)
    data = path.read_bytes()
    width, height = png_size(data)
    assert width >= 200 and height >= 200 and len(data) > 10_000
    assert data.rstrip(b"\x00")[-8:-4] == b"IEND"
    from matplotlib.image import imread

    pixels = imread(str(path))
    assert pixels.std() > 0.05  # not a blank canvas: nodes and arrows were drawn
    ax = fig.axes[0]
    assert ax.get_title() == f"8 ranks, spectral gap {bf.topology.exponential_two(8).spectral_gap():.3f}"
    assert len(ax.patches) == 8 * 3  # one arrow per edge (exponential-2 on 8: out-degree 3)


def test_draw_picks_the_step_of_a_dynamic_topology() -> None:
    topo = bf.topology.one_peer_exponential_two(8)
    fig = bf.topology.draw(topo, step=4)
    assert "step 4 of period 3" in fig.axes[0].get_title()
    assert len(fig.axes[0].patches) == 8  # one peer each


def test_draw_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match=r"topology\.draw: topology must be a bf\.topology graph, got list"):
        bf.topology.draw([[1.0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="step"):
        bf.topology.draw(bf.topology.ring(4), step=-1)


def test_draw_without_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'bluefog-fn\[plot\]'"):
        bf.topology.draw(bf.topology.ring(4))


def test_command_prints_matrix_gap_degrees_and_draws(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "star.png"
    assert main(["star", "4", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    topo = bf.topology.star(4)
    w = topo.mixing_matrix()
    rows = [line.split() for line in out.splitlines() if line.startswith("  ")]
    printed = [float(x) for row in rows for x in row]
    assert printed == pytest.approx(w.reshape(-1).tolist(), abs=1e-4)
    assert f"spectral gap: {topo.spectral_gap():.6g}" in out
    assert "in-degrees:  [3, 1, 1, 1]" in out and "out-degrees: [3, 1, 1, 1]" in out
    assert png_size(png.read_bytes())[0] > 100


def test_command_arguments_steps_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["exponential", "9", "--arg", "base=3"]) == 0
    assert "in-degrees:  [2, 2, 2, 2, 2, 2, 2, 2, 2]" in capsys.readouterr().out
    assert main(["one_peer_exponential_two", "8", "--step", "1"]) == 0
    assert "period: 3 (this is step 1" in capsys.readouterr().out
    assert main(["ring", "0"]) == 2
    assert "ring" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["no_such_graph", "4"])
    assert "ring" in constructors() and "from_matrix" not in constructors()
