"""run.py view: the slices as radiologists read them, the API's limits, and the page in headless Chromium."""
from __future__ import annotations

import gzip
import io
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from pipeline.app.view_case import CaseView
from pipeline.app.viewer import Viewer, create_app, start
from pipeline.core.config import load_config
from pipeline.core.labels import LIVER_RGB
from pipeline.infer.inference import run_inference
from pipeline.train.cv import run_training
from tests.conftest import TINY_TRAIN

from helpers import make_prepared_dataset, write_tiny


# --------------------------------------------------------------------------- display geometry
def test_slices_are_shown_radiologically_with_true_aspect_ratios():
    """A marker on the patient's right, anterior and superior shows at the left / top of the axial and
    coronal pictures and at the left / top of the sagittal one, whatever the stored axis order."""
    shape = (20, 16, 6)
    image = np.zeros(shape, np.float32)
    # stored LPS-like: i runs to the patient's left, j posterior, k superior
    affine = np.diag([-0.8, -0.8, 4.0, 1.0])
    image[1, 1, 5] = 100.0  # i = 1: near the right; j = 1: near the front; k = 5: top slice
    view = CaseView.from_arrays("m", image, affine, np.zeros(shape, bool), "CT")
    x, y, z = np.argwhere(view.image == 100.0)[0]
    axial, _, _, pixel = view.plane("axial", z)
    rows, cols = np.argwhere(axial == 100.0)[0]
    assert rows < 3 and cols < 3 and pixel == (0.8, 0.8)  # anterior at the top, right on the left
    coronal, _, _, pixel = view.plane("coronal", y)
    rows, cols = np.argwhere(coronal == 100.0)[0]
    assert rows == 0 and cols < 3 and pixel == (0.8, 4.0)  # superior at the top
    sagittal, _, _, _ = view.plane("sagittal", x)
    rows, cols = np.argwhere(sagittal == 100.0)[0]
    assert rows == 0 and cols < 3  # anterior on the left
    png = Image.open(io.BytesIO(view.render("coronal", y, 200.0, 50.0)))
    width, height = png.size
    assert height / width == pytest.approx((6 * 4.0) / (20 * 0.8), rel=0.02)  # thick slices drawn tall
    voxel = view.voxel(x, y, z)
    assert voxel["source_index"] == [1, 1, 5] and voxel["value"] == 100.0
    np.testing.assert_allclose(voxel["mm"], (affine @ [1, 1, 5, 1])[:3], atol=0.05)


def test_the_liver_is_drawn_in_its_colour_and_the_reference_outlined():
    shape = (12, 12, 3)
    image = np.full(shape, 50.0, np.float32)
    mask = np.zeros(shape, bool)
    mask[2:6, 2:6, 1] = True
    view = CaseView.from_arrays("m", image, np.eye(4), mask, "CT", reference=mask)
    rgb = np.asarray(Image.open(io.BytesIO(view.render("axial", 1, 100.0, 50.0, opacity=1.0, reference=False))))
    tinted = np.all(rgb == np.asarray(LIVER_RGB, np.uint8), axis=-1)
    assert tinted.sum() == pytest.approx(16 / 144 * tinted.size, rel=0.05)
    outlined = np.asarray(Image.open(io.BytesIO(view.render("axial", 1, 100.0, 50.0, overlay=False))))
    assert np.all(outlined == [40, 220, 60], axis=-1).sum() > 0
    assert view.dice() == 1.0 and view.liver_ml() == pytest.approx(16 / 1000)


# --------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny trained run (it finds some liver), a DICOM series to segment under an allowed root,
    and `run.py infer`'s mask of that series for comparison."""
    root = tmp_path_factory.mktemp("viewer")
    data = make_prepared_dataset(root / "prepared", n_mr=2, n_ct=1, shape=(48, 40, 12), folds=2)
    run_dir = root / "run"
    run_training(data, run_dir, "0", load_config(None, [*TINY_TRAIN, "train.epochs=6", "infer.montage=false"]))
    scans = root / "scans"
    image = nib.load(str(data / "imagesTr" / "MR_1_T2SPIR.nii.gz"))
    volume = np.asarray(image.dataobj, dtype=np.float64)
    # the NIfTI volume back into DICOM (rows = the volume's second axis reversed, as dcm2niix reads it)
    write_tiny(scans / "patient" / "series", np.transpose(volume, (2, 1, 0))[:, ::-1, :], spacing=(1.5, 1.5, 4.0))
    (scans / "notes").mkdir()
    (scans / "notes" / "readme.txt").write_text("not a scan")
    (root / "secret").mkdir()
    (root / "secret" / "data.txt").write_text("outside")
    (scans / "escape").symlink_to(root / "secret")
    run_inference(run_dir, scans / "patient" / "series", root / "infer", ["infer.montage=false"])
    return root, run_dir, scans


def _client(viewer):
    """A test client of the viewer's app that sends what the page sends: the XSRF token on writes."""
    client = create_app(viewer).test_client()
    client.environ_base["HTTP_X_XSRF_TOKEN"] = viewer.xsrf
    return client


def _wait(client, timeout=120):
    deadline = time.time() + timeout
    job = client.get("/api/job").get_json()
    while job["state"] == "running" and time.time() < deadline:
        time.sleep(0.2)
        job = client.get("/api/job").get_json()
    return job


@pytest.mark.slow
def test_the_api_segments_a_folder_as_infer_does_and_keeps_to_its_roots(setup):
    root, run_dir, scans = setup
    viewer = Viewer(run_dir, [scans])
    try:
        client = _client(viewer)
        listing = client.get("/api/browse", query_string={"path": str(scans)}).get_json()
        assert [f["name"] for f in listing["folders"]] == ["notes", "patient"]  # the link out is not listed
        for path in (str(root / "secret"), str(scans / "escape"), str(scans / ".." / "secret"), "/"):
            answer = client.get("/api/browse", query_string={"path": path})
            assert answer.status_code == 400 and "outside the folders" in answer.get_json()["error"]
            answer = client.post("/api/segment", json={"path": path})
            assert answer.status_code == 400
        # a folder without DICOM: the command line's one-line error, and the server goes on
        assert client.post("/api/segment", json={"path": str(scans / "notes")}).status_code == 200
        job = _wait(client)
        assert job["state"] == "error" and "no CT or MR image series" in job["message"]
        assert len(job["message"].splitlines()) == 1
        with viewer._lock:  # a segmentation under way: the next request is told to wait
            busy = client.post("/api/segment", json={"path": str(scans / "patient" / "series")})
        assert busy.status_code == 400 and "wait" in busy.get_json()["error"]  # one segmentation at a time
        assert client.post("/api/segment", json={"path": str(scans / "patient" / "series")}).status_code == 200
        job = _wait(client)
        assert job["state"] == "done", job
        case = job["cases"][0]
        downloaded = client.get(f"/api/case/{case}/download/mask.nii.gz")
        ours = nib.Nifti1Image.from_bytes(gzip.decompress(downloaded.data))
        expected = nib.load(str(root / "infer" / "series_liver.nii.gz"))
        np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(expected.dataobj))
        np.testing.assert_allclose(ours.affine, expected.affine, atol=1e-5)
        assert np.asarray(expected.dataobj).sum() > 0
        info = client.get(f"/api/case/{case}").get_json()
        assert info["liver_ml"] == pytest.approx(json.loads((root / "infer" / "inference.json").read_text())
                                                 ["cases"][0]["liver_ml"], abs=0.051)  # shown to 0.1 ml
    finally:
        viewer.close()
    assert not viewer.work.exists()  # uploads and masks go when the server stops


def test_uploads_are_checked_and_a_bad_one_leaves_the_server_running(setup):
    root, run_dir, scans = setup
    viewer = Viewer(run_dir, [scans], max_upload_mb=1)
    try:
        client = _client(viewer)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("../../evil.dcm", b"x")
        answer = client.post("/api/upload", data={"files": (io.BytesIO(buf.getvalue()), "series.zip")})
        assert answer.status_code == 400 and "outside the archive" in answer.get_json()["error"]
        answer = client.post("/api/upload", data={"files": (io.BytesIO(b"hello"), "notes.txt")})
        job = _wait(client)
        assert answer.status_code == 200 and job["state"] == "error"
        assert "no CT or MR image series" in job["message"]
        big = client.post("/api/upload", data={"files": (io.BytesIO(b"0" * (2 << 20)), "big.dcm")})
        assert big.status_code == 413 and "limit" in big.get_json()["error"]
        files = [(io.BytesIO(p.read_bytes()), p.name) for p in sorted((scans / "patient" / "series").iterdir())]
        assert client.post("/api/upload", data={"files": files}).status_code == 200
        assert _wait(client)["state"] == "done"
        assert client.get("/api/cases").status_code == 200
    finally:
        viewer.close()


def test_results_of_infer_are_listed_with_their_reference_and_dice(setup, tmp_path):
    root, run_dir, _ = setup
    prepared = root / "prepared"
    run_inference(run_dir, prepared, tmp_path / "infer", ["infer.montage=false"], patients="MR_1")
    from pipeline.evaluate.evaluation import run_evaluation

    scored = run_evaluation(tmp_path / "infer", prepared / "labelsTr", tmp_path / "evaluate",
                            cfg=load_config(None, ["evaluate.missing=skip"]))
    viewer = Viewer(run_dir, [root], results=tmp_path / "infer")
    try:
        client = _client(viewer)
        cases = client.get("/api/cases").get_json()["cases"]
        assert [c["name"] for c in cases] == ["MR_1_T2SPIR"]
        info = client.get(f"/api/case/{cases[0]['id']}").get_json()
        row = json.loads((tmp_path / "infer" / "inference.json").read_text())["cases"][0]
        assert info["has_reference"] and info["dice"] == pytest.approx(row["dice"], abs=1e-6)
        assert cases[0]["metrics"]["dice"] == pytest.approx(scored["cases"][0]["dice"])  # evaluate's, beside it
        assert cases[0]["metrics"]["score"] == pytest.approx(scored["cases"][0]["score"])
    finally:
        viewer.close()


# --------------------------------------------------------------------------- the page
@pytest.mark.slow
def test_the_page_segments_and_shows_three_linked_views_in_chromium(setup, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    root, run_dir, scans = setup
    server, viewer, url = start(run_dir, None, [scans], port=0)
    base, token = url.split("?token=")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        browser.get(url)  # the printed URL: its token becomes the page's cookie
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#folders li"))
        # the folder browser, root first; the list is rebuilt after every click, so the entry is found and
        # clicked in one script (a Python-side element could go stale between finding and clicking it)
        click_folder = """
            const li = [...document.querySelectorAll('#folders li')].find(e => e.textContent.trim() === arguments[0]);
            if (li) li.click();
            return !!li;"""
        for name in (str(scans), "patient", "series"):
            wait.until(lambda d: d.execute_script(click_folder, name))
        wait.until(lambda d: d.find_element(By.ID, "where").text.startswith(str(scans / "patient" / "series")))
        browser.find_element(By.ID, "segment").click()
        wait.until(lambda d: d.find_elements(By.ID, "liver-ml"))
        for plane in ("axial", "coronal", "sagittal"):
            wait.until(lambda d: d.execute_script(
                f"const i = document.getElementById('{plane}-img'); return i.complete && i.naturalWidth > 0"))
        browser.save_screenshot(str(tmp_path / "viewer.png"))
        assert (tmp_path / "viewer.png").stat().st_size > 10_000
        # the axial picture the page shows: the liver colour exactly where this slice's mask is
        src = browser.find_element(By.ID, "axial-img").get_attribute("src")
        z = int(browser.find_element(By.ID, "axial-slider").get_attribute("value"))
        _, mask, _, _ = viewer.view("c1").plane("axial", z)
        assert mask.any(), "the middle slice of this series holds liver"
        shown = Image.open(io.BytesIO(urllib.request.urlopen(f"{src}&token={token}").read())).convert("RGB")
        small = np.asarray(shown.resize(mask.shape[::-1], Image.NEAREST)).astype(int)
        grey = (small[..., 0] == small[..., 1]) & (small[..., 1] == small[..., 2])
        assert not grey[mask].any() and grey[~mask].all()
        tint = small[mask].mean(axis=0)
        assert tint[0] > tint[1] > tint[2]  # towards the liver colour (221, 130, 101)
        info = json.loads(urllib.request.urlopen(f"{base}api/case/c1?token={token}").read())
        assert info["liver_ml"] > 0
        assert browser.find_element(By.ID, "liver-ml").text == f"{info['liver_ml']:.1f}"
        # moving the axial slider shows another slice
        slider = browser.find_element(By.ID, "axial-slider")
        browser.execute_script("arguments[0].value = 0; arguments[0].dispatchEvent(new Event('input'));", slider)
        wait.until(lambda d: d.find_element(By.ID, "axial-img").get_attribute("src") != src)
        assert "index=0" in browser.find_element(By.ID, "axial-img").get_attribute("src")
        # clicking on the axial picture moves the coronal and sagittal slices (linked crosshair)
        before = browser.find_element(By.ID, "coronal-img").get_attribute("src")
        axial = browser.find_element(By.ID, "axial-img")
        browser.execute_script("""
            const img = arguments[0], r = img.getBoundingClientRect();
            img.dispatchEvent(new MouseEvent('click', {clientX: r.left + 3, clientY: r.top + 3, bubbles: true}));""",
                               axial)
        wait.until(lambda d: d.find_element(By.ID, "coronal-img").get_attribute("src") != before)
        # a path outside the roots is refused through the page's own API, and the server stays up
        answer = browser.execute_script(
            "return fetch('/api/browse?path=' + encodeURIComponent('/')).then(r => r.status)")
        assert answer == 400
        assert json.loads(urllib.request.urlopen(f"{base}api/cases?token={token}").read())["cases"]
        with pytest.raises(urllib.error.HTTPError) as refused:  # without the token (another local user)
            urllib.request.urlopen(f"{base}api/cases")
        assert refused.value.code == 403
    finally:
        server.shutdown()
        server.server_close()
        viewer.close()


def test_view_command_line_errors_are_one_line(setup, tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    _, run_dir, _ = setup
    done = subprocess.run([sys.executable, str(ROOT / "run.py"), "view", "--run-dir", str(run_dir), "--root",
                           str(tmp_path / "missing"), "--port", "0"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [f"error: --root {tmp_path / 'missing'}: not a folder"]


# --------------------------------------------------------------------------- only its user can drive it
@pytest.fixture(scope="module")
def guarded(setup):
    """A viewer with an access token and one small case on display."""
    from pipeline.app.view_case import CaseView

    _, run_dir, scans = setup
    viewer = Viewer(run_dir, [scans], token="t0ken")
    image = np.arange(8 * 6 * 4, dtype=np.float32).reshape(8, 6, 4)
    case = CaseView.from_arrays("tiny", image, np.diag([1.0, 1.0, 2.0, 1.0]), image > 100, "MR")
    viewer._register("tiny", "test", lambda: case)
    yield viewer
    viewer.close()


def test_a_foreign_host_is_refused_as_a_dns_rebinding_page_would_send_it(guarded):
    client = _client(guarded)
    for host in ("evil.example", "evil.example:8765", "127.0.0.1.evil.example:8765", "localhost.evil:8765"):
        answer = client.get("/api/cases?token=t0ken", headers={"Host": host})
        assert answer.status_code == 403 and "not this viewer's address" in answer.get_json()["error"]
    for host in ("localhost:8765", "127.0.0.1:8765", "[::1]:8765", "LOCALHOST"):
        assert client.get("/api/cases?token=t0ken", headers={"Host": host}).status_code == 200, host


def test_a_viewer_listening_on_all_addresses_admits_by_its_token_alone(setup):
    _, run_dir, scans = setup
    viewer = Viewer(run_dir, [scans], token="t0ken", host="0.0.0.0")
    try:
        client = _client(viewer)
        assert _client(viewer).get("/api/cases", headers={"Host": "10.1.2.3:8765"}).status_code == 403  # no token
        assert client.get("/api/cases?token=t0ken", headers={"Host": "10.1.2.3:8765"}).status_code == 200
        answer = client.post("/api/segment", json={}, headers={"Host": "10.1.2.3:8765", "Origin": "http://evil.example"})
        assert answer.status_code == 403
        answer = client.post("/api/segment", json={}, headers={"Host": "10.1.2.3:8765", "Origin": "http://10.1.2.3:8765"})
        assert answer.status_code == 400  # its own page: through to the request's own checks
    finally:
        viewer.close()


def test_without_the_token_nothing_is_served_and_the_printed_url_leaves_a_cookie(guarded):
    client = _client(guarded)
    for path in ("/", "/api/cases", "/api/browse", "/api/case/c1", "/api/case/c1/slice.png"):
        answer = client.get(path)
        assert answer.status_code == 403 and "access token" in answer.get_json()["error"], path
    assert client.get("/api/cases?token=wrong").status_code == 403
    first = client.get("/?token=t0ken")
    assert first.status_code == 200 and "HttpOnly" in first.headers["Set-Cookie"]
    assert client.get("/api/cases").status_code == 200  # the cookie from here on
    assert client.get("/api/case/c1/slice.png").status_code == 200


def test_writes_from_another_site_or_without_the_pages_token_are_refused(guarded):
    client = _client(guarded)
    client.get("/?token=t0ken")
    page = client.get("/").get_data(as_text=True)
    assert f'content="{guarded.xsrf}"' in page  # the page carries the token it must send back
    for origin in ("http://evil.example", "null", "http://localhost:9999.evil", "file://"):
        answer = client.post("/api/segment", json={"path": "x"}, headers={"Origin": origin})
        assert answer.status_code == 403 and "refused" in answer.get_json()["error"], origin
    bare = create_app(guarded).test_client()  # no XSRF header, as a form on another site would post
    bare.get("/?token=t0ken")
    answer = bare.post("/api/upload", data={"files": (io.BytesIO(b"x"), "a.dcm")})
    assert answer.status_code == 403 and "XSRF" in answer.get_json()["error"]
    # the page's own request (same origin, its token) gets through to the checks of the request itself
    answer = client.post("/api/segment", json={}, headers={"Origin": "http://localhost"})
    assert answer.status_code == 400 and "choose a folder" in answer.get_json()["error"]


@pytest.mark.parametrize("query", ["index=abc", "window=abc", "level=1e999", "opacity=abc", "index=1.5"])
def test_bad_slice_values_answer_400_naming_the_value(guarded, query):
    client = _client(guarded)
    client.get("/?token=t0ken")
    answer = client.get(f"/api/case/c1/slice.png?{query}")
    assert answer.status_code == 400 and query.split("=")[0] in answer.get_json()["error"]


@pytest.mark.parametrize("path", ["\x00", "scans/a\x00b"])
def test_a_path_with_a_nul_byte_answers_400(guarded, path):
    client = _client(guarded)
    client.get("/?token=t0ken")
    answer = client.get("/api/browse", query_string={"path": path})
    assert answer.status_code == 400 and "not a path this viewer can read" in answer.get_json()["error"]


@pytest.mark.parametrize("query", ["x=abc", "y=", "z=1e3"])
def test_bad_voxel_values_answer_400(guarded, query):
    client = _client(guarded)
    client.get("/?token=t0ken")
    assert client.get(f"/api/case/c1/voxel?{query}").status_code == 400


def test_any_query_or_body_on_any_route_answers_2xx_or_4xx(guarded):
    """Property-based: whatever a page or a script sends, the viewer answers with a result or a 4xx, never 500."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    client = _client(guarded)
    client.get("/?token=t0ken")
    text = st.text(max_size=12)
    gets = st.sampled_from(["/", "/api/cases", "/api/browse", "/api/job", "/api/case/{c}", "/api/case/{c}/slice.png",
                            "/api/case/{c}/voxel", "/api/case/{c}/download/{w}"])
    keys = st.sampled_from(["path", "plane", "index", "window", "level", "overlay", "opacity", "reference", "x", "y",
                            "z", "token"])

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(route=gets, case=st.one_of(st.just("c1"), text), what=text, query=st.dictionaries(keys, text, max_size=4))
    def get_anything(route, case, what, query):
        query.pop("token", None)  # the cookie authenticates; a wrong token in the URL is a 403, also fine
        path = route.format(c=urllib.parse.quote(case, safe="") or "c1", w=urllib.parse.quote(what, safe="") or "x")
        status = client.get(path, query_string=query).status_code
        assert 200 <= status < 500 and status != 500, (path, query, status)

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(body=st.one_of(st.none(), st.dictionaries(st.sampled_from(["path", "x"]), st.one_of(text, st.integers())),
                          st.lists(text, max_size=3)))
    def post_anything(body):
        status = client.post("/api/segment", json=body, headers={"Origin": "http://localhost"}).status_code
        assert 200 <= status < 500, (body, status)

    get_anything()
    post_anything()
