"""Atomic writes and safe file names (pipeline/io.py)."""

import gzip
import json
import string

import nibabel as nib
import numpy as np
import pytest

from pipeline.core.errors import PipelineError
from pipeline.core.files import atomic_path, safe_name, write_json, write_text


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".partial-"))


class Boom(Exception):
    pass


# ---------------------------------------------------------------- atomic_path


def test_atomic_path_writes_to_a_temporary_name_and_renames_on_success(tmp_path):
    target = tmp_path / "out.txt"
    with atomic_path(target) as tmp:
        assert tmp != target
        assert tmp.parent == target.parent  # same folder, so the rename is atomic
        tmp.write_text("complete")
        assert not target.exists()  # nothing under the real name until the block ends
    assert target.read_text() == "complete"
    assert not tmp.exists()
    assert leftovers(tmp_path) == []


def test_atomic_path_leaves_no_file_when_the_block_fails(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            tmp.write_text("half written")
            raise Boom()
    assert not target.exists()
    assert leftovers(tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_keeps_an_existing_file_unchanged_when_the_block_fails(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("previous result")
    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            tmp.write_text("new but incomplete")
            raise Boom()
    assert target.read_text() == "previous result"
    assert leftovers(tmp_path) == []


def test_atomic_path_replaces_an_existing_file_on_success(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert leftovers(tmp_path) == []


def test_atomic_path_temporary_name_is_hidden_and_keeps_every_suffix(tmp_path):
    target = tmp_path / "case_001.nii.gz"
    with atomic_path(target) as tmp:
        assert tmp.name.startswith(".partial-")
        assert tmp.name.endswith(".nii.gz")
        assert tmp.suffixes[-2:] == [".nii", ".gz"]
        tmp.write_bytes(b"x")


def test_atomic_path_lets_nibabel_pick_the_compressed_format_from_the_name(tmp_path):
    target = tmp_path / "mask.nii.gz"
    data = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    with atomic_path(target) as tmp:
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp)
    with gzip.open(target) as fh:  # really gzip, chosen from the temporary name's suffix
        fh.read(1)
    assert np.array_equal(np.asanyarray(nib.load(target).dataobj), data)
    assert leftovers(tmp_path) == []


def test_atomic_path_creates_missing_parent_folders(tmp_path):
    target = tmp_path / "a" / "b" / "out.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("ok")
    assert target.read_text() == "ok"


def test_atomic_path_block_that_writes_nothing_leaves_nothing(tmp_path):
    # a writer that fails before creating its file: the rename must not hide the original error
    target = tmp_path / "out.txt"
    with pytest.raises(Boom):
        with atomic_path(target):
            raise Boom()
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- write_json / write_text


def test_write_json_round_trips_and_returns_the_path(tmp_path):
    data = {"dice": 0.957, "cases": ["CT_1", "MR_2_T2SPIR"], "nested": {"n": 3, "ok": True, "none": None}}
    path = write_json(tmp_path / "sub" / "metrics.json", data)
    assert path == tmp_path / "sub" / "metrics.json"
    assert json.loads(path.read_text()) == data
    assert leftovers(path.parent) == []


def test_write_json_that_cannot_serialise_keeps_the_previous_file(tmp_path):
    path = write_json(tmp_path / "metrics.json", {"v": 1})
    with pytest.raises(TypeError):
        write_json(path, {"v": object()})
    assert json.loads(path.read_text()) == {"v": 1}
    assert leftovers(tmp_path) == []


def test_write_text_round_trips_and_overwrites(tmp_path):
    path = write_text(tmp_path / "log.txt", "first\n")
    assert path.read_text() == "first\n"
    write_text(path, "second line\nthird line\n")
    assert path.read_text() == "second line\nthird line\n"
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- safe_name

SAFE_CHARS = set(string.ascii_letters + string.digits + "._-")


def assert_safe(name: str):
    assert name not in ("", ".", "..")
    assert not name.startswith(".")
    assert "/" not in name and "\\" not in name
    assert set(name) <= SAFE_CHARS, name


@pytest.mark.parametrize("text,expected", [
    ("CT_1", "CT_1"),
    ("T2SPIR", "T2SPIR"),
    ("a/b", "a_b"),
    (".hidden", "hidden"),
    ("T1 DUAL (in phase)", "T1_DUAL_in_phase"),
    ("1.2.840.113619.2", "1.2.840.113619.2"),
])
def test_safe_name_maps_unsafe_characters_to_underscores(text, expected):
    assert safe_name(text) == expected


@pytest.mark.parametrize("text", [
    "../x", "a/b", ".hidden", "..x", "./../etc/passwd", "a\\b", "._.", " .. name", "x/..", "~/.ssh",
    "Müller", "a\x00b",
])
def test_safe_name_never_returns_a_hidden_name_a_dot_name_or_a_path(text):
    assert_safe(safe_name(text))


def test_safe_name_keeps_the_meaningful_part_of_a_path_like_name():
    name = safe_name("../x")
    assert_safe(name)
    assert "x" in name


@pytest.mark.parametrize("text", ["///", "..", ".", "", "   ", "._", "__..__", "/../", "\n.\t"])
def test_safe_name_raises_when_nothing_usable_is_left(text):
    with pytest.raises(PipelineError):
        safe_name(text)


def test_safe_name_error_names_what_was_being_converted():
    with pytest.raises(PipelineError, match="SeriesDescription"):
        safe_name("..", what="SeriesDescription")


def test_safe_name_accepts_non_strings():
    assert safe_name(42) == "42"


def test_safe_name_limits_the_length_to_128_characters():
    name = safe_name("a" * 300)
    assert name == "a" * 128
