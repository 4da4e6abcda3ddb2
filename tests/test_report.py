"""run.py report: one offline HTML page per run, checked as text and rendered in headless Chromium."""
import csv
import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.app.report import write_report
from pipeline.app.report_html import NOT_AVAILABLE
from pipeline.core.config import Config, config_to_dict
from pipeline.core.errors import PipelineError

ROOT = Path(__file__).resolve().parent.parent
EVIL_CASE = '<script>alert("x")</script>&MR_9'
FOLD_PATIENTS = {0: ["MR_1", "MR_2", "CT_3"], 1: ["MR_5", "MR_8"]}
CV_DICE = {"MR_1": 0.9412, "MR_2": 0.9187, "CT_3": 0.9555, "MR_5": 0.9034, "MR_8": 0.9321}
EVAL_ROWS = [
    {"case": "MR_1_T2SPIR", "dice": 0.9412, "ravd_pct": 2.31, "assd_mm": 1.84, "mssd_mm": 21.7, "hd95_mm": 5.2,
     "dice_points": 94.12, "ravd_points": 53.8, "assd_points": 87.73, "mssd_points": 63.83, "score": 74.87,
     "pred_ml": 1523.4, "ref_ml": 1489.0, "pred_file": "/x/masks/MR_1_T2SPIR_liver.nii.gz",
     "ref_file": "/y/MR_1.nii.gz"},
    {"case": EVIL_CASE, "dice": 0.7712, "ravd_pct": 8.5, "assd_mm": 4.1, "mssd_mm": 70.2, "hd95_mm": 12.9,
     "dice_points": 0.0, "ravd_points": 0.0, "assd_points": 72.67, "mssd_points": 0.0, "score": 18.17,
     "pred_ml": 1700.2, "ref_ml": 1567.0, "pred_file": "/x/masks/evil_liver.nii.gz", "ref_file": "/y/evil.nii.gz"},
]


def _png(path: Path, size=(64, 48), value=200) -> Path:
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[8:-8, 8:-8] = value
    Image.fromarray(arr).save(path)
    return path


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _fold_metrics(patients: list[str], epochs: int = 4) -> list[dict]:
    rows = []
    for e in range(1, epochs + 1):
        row = {"epoch": e, "train_loss": round(1.2 / e, 4), "val_loss": round(1.0 / e + 0.05, 4),
               "val_dice_mean": round(0.6 + 0.08 * e, 4)}
        row.update({f"val_dice_{p}": round(0.55 + 0.09 * e, 4) for p in patients})
        row.update({"lr": 0.002 * (epochs - e + 1) / epochs, "epoch_time_s": 31.5})
        rows.append(row)
    rows[-1]["val_dice_mean"] = 0.80  # the best epoch (3) is not the last one
    return rows


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    """A run folder shaped like train's output (two folds, CV summary) plus evaluate and infer folders.

    Montages sit where infer writes them: in the prediction folder evaluate scored (named in its
    metrics.json) and in an infer folder inside the run.
    """
    run = tmp_path / "runs" / "mr_t2"
    run.mkdir(parents=True)
    cfg = config_to_dict(Config())
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    cv_rows = []
    for k, patients in FOLD_PATIENTS.items():
        fold = run / f"fold_{k}"
        fold.mkdir()
        (fold / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        others = [p for q, ps in FOLD_PATIENTS.items() if q != k for p in ps]
        (fold / "split.json").write_text(
            f'{{"train": {{"patients": {others!r}, "cases": []}}, "val": {{"patients": {patients!r}, "cases": []}}}}'
            .replace("'", '"'))
        _write_csv(fold / "metrics.csv", _fold_metrics(patients))
        _png(fold / "curves.png", (120, 40))
        for name in ("best.pt", "last.pt", "train.log"):
            (fold / name).write_bytes(b"x")
        cv_rows += [{"fold": k, "patient": p, "dice": CV_DICE[p]} for p in patients]
    _write_csv(run / "cv_summary.csv", cv_rows)
    masks = tmp_path / "masks"
    masks.mkdir()
    _png(masks / "CT_3_montage.png", (90, 30), 250)
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    _write_csv(evaluation / "metrics.csv", EVAL_ROWS)
    (evaluation / "metrics.json").write_text(json.dumps({"cases": EVAL_ROWS, "pred": str(masks)}))
    infer = run / "infer_test"
    infer.mkdir()
    _png(infer / "MR_1_T2SPIR_montage.png", (90, 30), 120)
    return run


def _page(run: Path, **kw) -> str:
    path = write_report(run, **kw)
    assert path == run / "report.html"
    return path.read_text(encoding="utf-8")


def _table_rows(page: str, table_id: str) -> list[str]:
    m = re.search(rf'<table id="{table_id}">.*?<tbody>(.*?)</tbody>', page, re.S)
    assert m, f"table {table_id} missing"
    return re.findall(r"<tr>", m.group(1))


def test_report_lists_every_cv_patient_with_its_dice_and_the_overall_mean(run_dir):
    page = _page(run_dir, eval_dir=run_dir.parent.parent / "eval")
    assert len(_table_rows(page, "cv-patients")) == len(CV_DICE)
    assert len(_table_rows(page, "cv-folds")) == len(FOLD_PATIENTS)
    for patient, dice in CV_DICE.items():
        assert patient in page and f"{dice:.4f}" in page
    values = np.array(list(CV_DICE.values()))
    assert f"{values.mean():.4f} ± {values.std(ddof=1):.4f}" in page
    fold0 = np.array([CV_DICE[p] for p in FOLD_PATIENTS[0]])
    assert f"{fold0.mean():.4f} ± {fold0.std(ddof=1):.4f}" in page


def test_report_shows_run_config_and_best_and_final_epoch_of_each_fold(run_dir):
    page = _page(run_dir)
    cfg = Config()
    assert "mr_t2" in page and cfg.train.loss in page and f"{cfg.train.roi_size[0]} × {cfg.train.roi_size[1]}" in page
    for k in FOLD_PATIENTS:
        rows = re.search(rf'<table id="fold-{k}-epochs">.*?</table>', page, re.S).group(0)
        best, final = re.findall(r"<tr>(.*?)</tr>", rows.split("<tbody>")[1])
        assert ">best<" in best and '<td class="num">3</td>' in best and "0.8400" in best
        assert ">final<" in final and '<td class="num">4</td>' in final and "0.8000" in final


def test_report_shows_evaluation_rows_with_points_and_a_mean_row(run_dir):
    page = _page(run_dir, eval_dir=run_dir.parent.parent / "eval")
    assert len(_table_rows(page, "eval-cases")) == len(EVAL_ROWS)
    for col in ("ravd_pct", "assd_mm", "mssd_mm", "hd95_mm", "score"):
        assert f"<th>{col}</th>" in page
    assert "74.87" in page and "18.17" in page
    assert "0.0000" not in page  # zero points print as points (0.00), not as a Dice
    assert f"{(74.87 + 18.17) / 2:.2f}" in page and "mean (2 cases)" in page
    assert f"{np.std([74.87, 18.17]):.2f}" in page  # population std, as evaluate's summary
    assert "pred_file" not in page and "/x/masks" not in page  # paths stay out of the table


def test_whole_numbers_in_float_columns_print_like_their_neighbours(run_dir, tmp_path):
    # evaluate writes %g: a perfect case reads "1,0,0" but must line up with 0.9412 and 2.31.
    evaluation = tmp_path / "eval_g"
    evaluation.mkdir()
    _write_csv(evaluation / "metrics.csv", [{"case": "CT_1", "dice": "1", "ravd_pct": "0", "slices": "78"},
                                            {"case": "CT_2", "dice": "0.95", "ravd_pct": "2.5", "slices": "80"}])
    page = _page(run_dir, eval_dir=evaluation)
    first = re.search(r'<table id="eval-cases">.*?<tbody>\s*<tr>(.*?)</tr>', page, re.S).group(1)
    assert re.findall(r"<td[^>]*>([^<]*)</td>", first) == ["CT_1", "1.0000", "0.00", "78"]


def test_report_escapes_a_malicious_case_name(run_dir):
    page = _page(run_dir, eval_dir=run_dir.parent.parent / "eval")
    assert EVIL_CASE not in page and "<script" not in page
    assert html.escape(EVIL_CASE) in page


def test_report_embeds_images_as_data_uris_and_loads_nothing_external(run_dir):
    page = _page(run_dir, eval_dir=run_dir.parent.parent / "eval")
    sources = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert len(sources) == len(FOLD_PATIENTS) + 2  # curves per fold + two montages
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<link" not in page
    montages = re.search(r'id="montages".*', page, re.S).group(0)
    assert "MR_1_T2SPIR · dice 0.9412, score 74.87" in montages and "CT_3" in montages


def test_missing_optional_artefacts_show_not_available_instead_of_crashing(run_dir):
    (run_dir / "cv_summary.csv").unlink()
    (run_dir / "fold_1" / "metrics.csv").unlink()
    (run_dir / "fold_1" / "curves.png").unlink()
    (run_dir / "fold_1" / "split.json").write_text("{not json")
    shutil.rmtree(run_dir / "infer_test")
    page = _page(run_dir)
    assert page.count(NOT_AVAILABLE) >= 4
    assert 'id="evaluation"' in page and "no evaluate folder given" in page
    # Without cv_summary.csv the CV table falls back to fold 0's best epoch.
    assert "no cv_summary.csv" in page and len(_table_rows(page, "cv-patients")) == len(FOLD_PATIENTS[0])


def test_missing_curves_png_is_drawn_from_metrics_csv(run_dir):
    (run_dir / "fold_0" / "curves.png").unlink()
    page = _page(run_dir)
    fold0 = re.search(r'id="fold-0".*?</section>', page, re.S).group(0)
    assert "curves drawn from metrics.csv" in fold0 and 'src="data:image/png;base64,' in fold0


def test_a_corrupt_png_is_reported_not_embedded(run_dir):
    (run_dir / "fold_0" / "curves.png").write_bytes(b"GIF89a not a png")
    (run_dir / "infer_test" / "MR_1_T2SPIR_montage.png").write_text("oops")
    page = _page(run_dir)
    montages = re.search(r'id="montages".*?</section>', page, re.S).group(0)
    assert "not a PNG file" in montages and "<img" not in montages
    fold0 = re.search(r'id="fold-0".*?</section>', page, re.S).group(0)
    assert "curves drawn from metrics.csv" in fold0 and "not a PNG file" in fold0


def test_folder_that_is_not_a_run_is_a_one_line_error_and_writes_nothing(tmp_path):
    with pytest.raises(PipelineError, match="not a run folder"):
        write_report(tmp_path)
    with pytest.raises(PipelineError, match="run folder not found"):
        write_report(tmp_path / "nope")
    assert not list(tmp_path.iterdir())


def test_missing_eval_folder_is_an_error_naming_it(run_dir):
    with pytest.raises(PipelineError, match="evaluate folder not found") as info:
        write_report(run_dir, eval_dir=run_dir / "no_eval")
    assert "no_eval" in str(info.value) and not (run_dir / "report.html").exists()


def test_cli_report_writes_the_page_and_says_where_unless_quiet(run_dir):
    res = subprocess.run([sys.executable, str(ROOT / "run.py"), "report", "--run-dir", str(run_dir)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert (run_dir / "report.html").is_file() and "report.html" in res.stdout
    res = subprocess.run([sys.executable, str(ROOT / "run.py"), "report", "--run", str(run_dir), "-q"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0 and res.stdout == "" and res.stderr == "", res.stderr


# --------------------------------------------------------------------------- rendering

@pytest.mark.slow
def test_report_renders_in_headless_chromium_with_every_image_decoded(run_dir, browser, tmp_path):
    path = write_report(run_dir, eval_dir=run_dir.parent.parent / "eval")
    browser.get(path.as_uri())
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight]);")
    assert len(images) == len(FOLD_PATIENTS) + 2
    for alt, complete, width, height in images:
        assert complete and width > 0 and height > 0, f"image not decoded: {alt}"
    rows = browser.execute_script(
        "const n = id => document.querySelectorAll('#' + id + ' tbody tr').length;"
        "return [n('cv-patients'), n('cv-folds'), n('eval-cases'), n('fold-0-epochs')];")
    assert rows == [len(CV_DICE), len(FOLD_PATIENTS), len(EVAL_ROWS), 2]
    evil = browser.execute_script("return document.querySelector('#eval-cases tbody tr:nth-child(2) td').textContent;")
    assert evil == EVIL_CASE  # shown as text, not executed as markup
    assert browser.save_screenshot(str(tmp_path / "report.png"))


def test_masks_flagged_by_infer_are_marked_under_their_overlay(tmp_path):
    import json

    from PIL import Image

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("train: {epochs: 1}\n")
    infer = run_dir / "infer"
    infer.mkdir()
    for case in ("CT_1", "MR_2_T2SPIR"):
        Image.new("RGB", (8, 8)).save(infer / f"{case}_montage.png")
    (infer / "inference.json").write_text(json.dumps({"cases": [
        {"case": "CT_1", "qc": []}, {"case": "MR_2_T2SPIR", "qc": ["empty: no liver found"]}]}))
    page = write_report(run_dir).read_text()
    assert page.count('class="qc"') == 1 and "check: empty: no liver found" in page
    start = page.index("overlay montage of MR_2_T2SPIR")
    assert "check: empty" in page[start:page.index("</figure>", start)]  # under its own overlay
