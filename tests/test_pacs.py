"""A real PACS: Orthanc (Debian package `orthanc`) on the loopback interface takes a real series and
the SEG and RTSTRUCT made for it into one patient and study, and gives the SEG back unchanged."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from pipeline.dicom.series import read_series

ORTHANC = shutil.which("Orthanc")
pytestmark = pytest.mark.skipif(ORTHANC is None, reason="Orthanc not installed (Debian package orthanc)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def orthanc(tmp_path):
    """An Orthanc of our own: storage in tmp_path, HTTP on a free port answering the loopback
    interface only (RemoteAccessAllowed false), no DICOM listener, no authentication, no plugins."""
    port = _free_port()
    config = {"Name": "pipeline-test", "StorageDirectory": str(tmp_path / "db"), "IndexDirectory": str(tmp_path / "db"),
              "HttpPort": port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
              "DicomServerEnabled": False, "Plugins": [], "HttpServerEnabled": True}
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    log = open(tmp_path / "orthanc.log", "w")
    proc = subprocess.Popen([ORTHANC, str(tmp_path / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{base}/system", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                log.close()
                pytest.skip(f"Orthanc did not start: {(tmp_path / 'orthanc.log').read_text()[-500:]}")
            time.sleep(0.3)
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        body = r.read()
    return json.loads(body) if body[:1] in (b"[", b"{") else body


def _store(base: str, path: Path) -> dict:
    req = urllib.request.Request(f"{base}/instances", data=path.read_bytes(), method="POST",
                                 headers={"Content-Type": "application/dicom"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


@pytest.mark.slow
@pytest.mark.realdata
def test_orthanc_files_the_seg_and_rtstruct_with_their_real_series(tmp_path, real_chaos, orthanc):
    from pipeline.datasets.chaos import png_stack_liver
    from pipeline.outputs.dicom_objects import write_rtstruct, write_seg

    patient = real_chaos / "Train_Sets" / "MR" / "1" / "T2SPIR"
    _, geom = read_series(patient / "DICOM_anon", pixels=False)
    mask = png_stack_liver({Path(f): patient / "Ground" / f"{Path(f).stem}.png" for f in geom.files}, geom)
    seg = write_seg(tmp_path / "MR_1_liver.seg.dcm", mask.astype(np.uint8), geom, case="MR_1", run_name="run")
    rt = write_rtstruct(tmp_path / "MR_1_liver.rtstruct.dcm", mask.astype(np.uint8), geom, case="MR_1",
                        run_name="run")
    for f in geom.files:
        assert _store(orthanc, Path(f))["Status"] in ("Success", "AlreadyStored")
    seg_answer, rt_answer = _store(orthanc, seg), _store(orthanc, rt)
    assert seg_answer["Status"] == "Success" and rt_answer["Status"] == "Success"
    # one patient, one study, holding the image series, the SEG and the RTSTRUCT
    assert len(_get(f"{orthanc}/patients")) == 1
    studies = _get(f"{orthanc}/studies")
    assert len(studies) == 1
    series = [_get(f"{orthanc}/series/{s}") for s in _get(f"{orthanc}/studies/{studies[0]}")["Series"]]
    modalities = sorted(s["MainDicomTags"]["Modality"] for s in series)
    assert modalities == ["MR", "RTSTRUCT", "SEG"]
    assert seg_answer["ParentStudy"] == rt_answer["ParentStudy"] == studies[0]
    image_series = next(s for s in series if s["MainDicomTags"]["Modality"] == "MR")
    assert len(image_series["Instances"]) == len(geom.files)
    # the SEG comes back byte for byte
    assert _get(f"{orthanc}/instances/{seg_answer['ID']}/file") == seg.read_bytes()
