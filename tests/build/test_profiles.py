"""Optimization profiles from manifest dims and --profile overrides."""

from __future__ import annotations

import pytest

from ffnx.build.profiles import (
    DEFAULT_MAX_FACTOR,
    DimRange,
    dim_ranges,
    input_shapes,
    parse_profile,
)
from ffnx.errors import PassError

MANIFEST = {
    "inputs": [
        {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
        {"name": "mask", "dtype": "int64", "shape": ["batch", 1, "seq"]},
        {"name": "scale", "dtype": "float32", "shape": [4]},
    ],
    "dims": {
        "batch": {"example": 2, "min": 1, "max": None},
        "seq": {"example": 16, "min": 1, "max": 512},
    },
}


@pytest.mark.parametrize(
    "text,want",
    [
        ("seq:1,128,2048", DimRange("seq", 1, 128, 2048)),
        (" batch = 1, 4 , 8 ", DimRange("batch", 1, 4, 8)),
        ("my.dim-2:0,0,1", DimRange("my.dim-2", 0, 0, 1)),
    ],
)
def test_parse_profile(text, want):
    assert parse_profile(text) == want


@pytest.mark.parametrize(
    "text,match",
    [
        ("seq:1,128", "name:min,opt,max"),
        ("seq 1,2,3", "name:min,opt,max"),
        ("seq:8,4,16", "min <= opt <= max"),
        ("seq:1,64,32", "min <= opt <= max"),
        ("seq:0,0,0", "max > 0"),
    ],
)
def test_parse_profile_rejects(text, match):
    with pytest.raises(PassError, match=match):
        parse_profile(text)


def test_defaults_come_from_the_manifest():
    r = dim_ranges(MANIFEST)
    assert r["seq"] == DimRange("seq", 1, 16, 512)
    assert r["batch"] == DimRange("batch", 1, 2, 2 * DEFAULT_MAX_FACTOR)  # no max declared


def test_overrides_replace_one_label_and_unknown_labels_fail():
    r = dim_ranges(MANIFEST, ["seq:8,64,1024"])
    assert r["seq"] == DimRange("seq", 8, 64, 1024) and r["batch"].opt == 2
    with pytest.raises(PassError, match="'heads'.*known: batch, seq"):
        dim_ranges(MANIFEST, ["heads:1,2,3"])


def test_input_shapes_expand_labels_onto_every_axis():
    shapes = input_shapes(MANIFEST, dim_ranges(MANIFEST, [DimRange("batch", 1, 3, 5)]))
    assert set(shapes) == {"input_ids", "mask"}  # "scale" is static: no profile needed
    assert shapes["input_ids"] == ((1, 1), (3, 16), (5, 512))
    assert shapes["mask"] == ((1, 1, 1), (3, 1, 16), (5, 1, 512))


def test_input_with_an_undeclared_label_is_an_error():
    manifest = {"inputs": [{"name": "x", "dtype": "float32", "shape": ["tokens", 8]}], "dims": {}}
    with pytest.raises(PassError, match="'x'.*tokens.*--profile"):
        input_shapes(manifest, dim_ranges(manifest))


DECODER = {
    "inputs": [
        {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
        {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "total"]},
        {"name": "past_key_values.0.key", "dtype": "float32", "shape": ["batch", 2, "past", 16]},
    ],
    "dims": {
        "batch": {"example": 2, "min": 1, "max": None},
        "seq": {"example": 3, "min": 1, "max": 512},
        "total": {"example": 8, "min": 1, "max": 512},
        "past": {"example": 5, "min": 1, "max": 512},
    },
    "decoder": {"layers": 1, "max_length": 512},
}


def test_decoder_profile_starts_past_at_zero_and_derives_total():
    from ffnx.build.profiles import profile_sets

    r = profile_sets(DECODER)[0]
    assert r["past"] == DimRange("past", 0, 5, 512)
    assert r["total"] == DimRange("total", 1, 8, 1024)  # seq + past at min, opt and max
    r = profile_sets(DECODER, ["seq:1,1,1", "past:0,64,511"])[0]
    assert r["total"] == DimRange("total", 1, 65, 512)
    r = profile_sets(DECODER, ["total:1,4,16"])[0]  # named: not derived
    assert r["total"] == DimRange("total", 1, 4, 16)
    no_decoder = {k: v for k, v in DECODER.items() if k != "decoder"}
    assert profile_sets(no_decoder)[0]["past"].min == 1


def test_profile_sets_one_per_extra_entry():
    from ffnx.build.profiles import profile_sets

    sets = profile_sets(
        MANIFEST, ["seq:1,64,512"], ["batch:1,1,1 seq:1,1,1", "seq:2,2,2;batch:4,4,4"]
    )
    assert [s["seq"].opt for s in sets] == [64, 1, 2]
    assert [s["batch"].max for s in sets] == [8, 1, 4]
    with pytest.raises(PassError, match="at least one"):
        profile_sets(MANIFEST, None, ["  "])
