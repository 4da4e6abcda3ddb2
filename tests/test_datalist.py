"""The datalist: read and checked in one place; folds split whole patients."""
import json

import pytest

from pipeline.core.errors import PipelineError
from pipeline.datasets.datalist import read_datalist


def _write(folder, entries, **extra):
    for e in entries:
        for key in ("image", "label"):
            (folder / e[key]).parent.mkdir(parents=True, exist_ok=True)
            (folder / e[key]).write_bytes(b"")
    (folder / "datalist.json").write_text(json.dumps({"training": entries, **extra}))
    return folder


def _entry(case, patient, fold, modality="MR", sequence="T2SPIR"):
    return {"image": f"imagesTr/{case}.nii.gz", "label": f"labelsTr/{case}.nii.gz", "case": case,
            "patient": patient, "modality": modality, "sequence": sequence, "fold": fold}


ENTRIES = [_entry("CT_1", "CT_1", 0, "CT", "CT"), _entry("MR_2_T2SPIR", "MR_2", 1),
           _entry("MR_2_T1DUAL_InPhase", "MR_2", 1, sequence="T1DUAL_InPhase"), _entry("MR_3_T2SPIR", "MR_3", 2)]


def test_entries_get_absolute_paths_and_folds_split_whole_patients(tmp_path):
    datalist = read_datalist(_write(tmp_path, ENTRIES, numFolds=3))
    assert datalist.num_folds == 3 and datalist.path == tmp_path / "datalist.json"
    assert all(str(e["image"]).startswith(str(tmp_path)) for e in datalist.entries)
    train, val = datalist.split(1)
    assert sorted(e["case"] for e in val) == ["MR_2_T1DUAL_InPhase", "MR_2_T2SPIR"]
    assert {e["patient"] for e in train} == {"CT_1", "MR_3"}
    assert datalist.patients(1) == ["MR_2"]
    assert [e["case"] for e in datalist.select(sequences={"T2SPIR"})] == ["MR_2_T2SPIR", "MR_3_T2SPIR"]
    assert datalist.parse_folds("all") == [0, 1, 2] and datalist.parse_folds("2") == [2]


def test_the_number_of_folds_defaults_to_the_highest_fold_plus_one(tmp_path):
    assert read_datalist(_write(tmp_path, ENTRIES)).num_folds == 3


@pytest.mark.parametrize("change, problem", [
    (lambda es: es[0].pop("patient"), r"lacks \['patient'\]"),
    (lambda es: es[0].update(modality="PET"), "modality 'PET'"),
    (lambda es: es[0].update(fold="0"), "fold '0'"),
])
def test_a_bad_entry_is_an_error_naming_the_datalist(tmp_path, change, problem):
    entries = json.loads(json.dumps(ENTRIES))
    change(entries)
    with pytest.raises(PipelineError, match=problem) as info:
        read_datalist(_write(tmp_path, entries))
    assert "datalist.json" in str(info.value)


def test_a_listed_file_that_is_missing_is_named(tmp_path):
    _write(tmp_path, ENTRIES)
    (tmp_path / "labelsTr" / "MR_3_T2SPIR.nii.gz").unlink()
    with pytest.raises(PipelineError, match=r"labelsTr/MR_3_T2SPIR.nii.gz: listed in .*datalist.json but not found"):
        read_datalist(tmp_path)


@pytest.mark.parametrize("text", ["{not json", json.dumps({"training": []}), json.dumps([1, 2])])
def test_a_file_that_is_not_a_datalist_is_an_error(tmp_path, text):
    (tmp_path / "datalist.json").write_text(text)
    with pytest.raises(PipelineError, match="datalist.json"):
        read_datalist(tmp_path / "datalist.json")


def test_a_fold_that_leaves_no_training_case_is_an_error(tmp_path):
    datalist = read_datalist(_write(tmp_path, [_entry("MR_2_T2SPIR", "MR_2", 0)], numFolds=2))
    with pytest.raises(PipelineError, match="fold 0 leaves 0 training"):
        datalist.split(0)
    with pytest.raises(PipelineError, match="has folds 0..1"):
        datalist.parse_folds("2")
