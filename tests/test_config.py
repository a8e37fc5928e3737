"""Configuration: defaults, TOML parsing, and errors that name the key and the fix."""

import numpy as np
import pytest

from stream.config import ConfigError, build_operators, load_config
from stream.transport.protocol import Geometry

G = Geometry((6, 7), (64, 64), mrad_per_px=0.5, convergence_mrad=10.0, center=(31.5, 31.5))


def write(tmp_path, text):
    p = tmp_path / "pipeline.toml"
    p.write_text(text)
    return p


def test_defaults_build_bf_and_adf_from_the_stream_calibration():
    from operators.chunk import Chunk
    g = Geometry((1, 1), (64, 64), mrad_per_px=0.5, convergence_mrad=5.0, center=(31.5, 31.5))
    ops = build_operators(load_config(None), g)
    virtual = next(p for op in ops for p in getattr(op, "parts", [op]) if p.name == "virtual")  # fused or not
    # bright field: r <= 5 mrad / 0.5 = 10 px; annular dark field: 20 px to the edge (32 px)
    pixels = {(31, 41): "bf",     # r = 9.51
              (31, 43): None,     # r = 11.5
              (31, 55): "adf",    # r = 23.5
              (31, 63): "adf",    # r = 31.5
              (0, 0): None}       # r = 44.5, a corner outside the inscribed circle
    idx = np.array([y * 64 + x for y, x in pixels], np.uint32)
    state = virtual.new_state()
    virtual.process(state, Chunk.from_counts([0], [0], [0], [len(idx)], idx))
    res = virtual.finalize(state)
    assert set(res) == {"bf", "adf"}
    assert res["bf"].data[0, 0] == 1 and res["adf"].data[0, 0] == 2


def test_example_configuration_is_valid():
    from pathlib import Path
    cfg = load_config(Path(__file__).parents[1] / "deploy" / "pipeline.example.toml")
    names = [v.name for v in cfg.virtual]
    assert names == ["bf", "adf"]
    ops = build_operators(cfg, G)
    assert {p.name for op in ops for p in getattr(op, "parts", [op])} >= {"virtual", "com", "sum", "completeness",
                                                                          "events"}
    assert [op.name for op in ops] == ["fused", "completeness", "events"]  # one pass for the three


@pytest.mark.parametrize("text,match", [
    ("[chunking]\nmax_frame = 10\n", r"unknown key\(s\) max_frame; valid keys are .*max_frames"),
    ("[chunks]\n", r"unknown section \[chunks\]"),
    ("[[virtual]]\nname = 'x'\nshape = 'ring'\n", r"shape 'ring' must be disk, annulus or masks"),
    ("[[virtual]]\nname = 'x'\nshape = 'disk'\n", r"exactly one of radius_px, radius_mrad"),
    ("[[virtual]]\nname = 'x'\nshape = 'masks'\nfile = 'nope.npy'\n", r"nope.npy"),
    ("[[aperture]]\nname = 'a'\nrect = [5, 2, 0, 3]\n", r"y0 < y1"),
    ("[scan]\ntimeout_s = 0\n", r"timeout_s must be > 0"),
    ("[virtual]\nname = 'x'\n", r"write \[\[virtual\]\]"),
    ("this is not toml", r"not valid TOML"),
    ("[[virtual]]\nname = 'com_x'\nshape = 'disk'\nradius_px = 3\n", r"'com_x' is taken by another result"),
])
def test_bad_configuration_names_the_problem(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(write(tmp_path, text))
    assert str(tmp_path / "pipeline.toml") in str(e.value) or "nope.npy" in str(e.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"no such configuration file"):
        load_config(tmp_path / "absent.toml")


def test_mrad_without_calibration_is_refused(tmp_path):
    cfg = load_config(write(tmp_path, "[[virtual]]\nname = 'bf'\nshape = 'disk'\nradius_mrad = 5\n"))
    with pytest.raises(ConfigError, match="mrad_per_px"):
        build_operators(cfg, Geometry((2, 2), (16, 16)))


def test_mask_file_of_the_wrong_shape_is_refused_for_the_scan(tmp_path):
    np.save(tmp_path / "m.npy", np.ones((3, 10, 10), bool))
    cfg = load_config(write(tmp_path, "[[virtual]]\nname = 'm'\nshape = 'masks'\nfile = 'm.npy'\n"))
    assert [v.names for v in cfg.virtual] == [["m_0", "m_1", "m_2"]]
    with pytest.raises(ConfigError, match="m.npy"):
        build_operators(cfg, G)


@pytest.mark.parametrize("text,match", [
    ('[scan]\ntimeout_s = "2"\n', r"timeout_s = '2' has the wrong type; expected float"),
    ("[chunking]\nmax_frames = 1.5\n", r"max_frames = 1.5 has the wrong type; expected int"),
    ("[com]\nflip = 1\n", r"flip = 1 has the wrong type; expected bool"),
    ("[[aperture]]\nname = 'a'\nrect = 3\n", r"rect = 3 has the wrong type; expected list\[int\]"),
    ("timeout_s = 2\n", r"did you mean timeout_s under \[scan\]"),
])
def test_wrong_value_types_are_named(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text))
