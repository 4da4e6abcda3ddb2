"""`run.py view`: a local web application to segment a scan and look at the liver in the browser.

    python run.py view --run RUN_DIR [--results INFER_DIR] [--root DIR ...] [--port 8765] [--host 127.0.0.1]

Flask serves one page (pipeline/viewer_page.html) and a small JSON API. Slices are rendered on
the server as PNGs (Pillow): NiiVue, the maintained browser viewer, is an npm package that the
README's pip set-up cannot install, and server-side slices need no JavaScript library at all.

Segmentation runs the same code as `run.py infer` (pipeline.infer.inputs.collect_inputs and
segment_cases) with the run's models loaded once, one request at a time; the masks go to a
temporary folder removed when the server stops, as do uploads.

Display: every volume is shown in RAS orientation as radiologists read it (axial: the patient's
right on the left of the image, anterior at the top; coronal: right on the left, superior at the
top; sagittal: anterior on the left, superior at the top), each pixel drawn with its true aspect
ratio (the in-plane spacing and the slice thickness).

Security, as Jupyter's server does it for a local web app over private files: binds to 127.0.0.1
unless told otherwise; on a loopback address answers only requests whose Host names it (localhost,
127.0.0.1, [::1]: a DNS-rebinding page gets 403; on another --host the token alone admits); with a per-start token, given in the URL
it prints and kept as a cookie after the first visit, so that another local user or process cannot
read the scans (--no-token for those who put it behind their own authentication); refuses requests
that write or start work (uploads, segmentations) from a foreign or `null` Origin or without the
page's XSRF token; lists and reads only folders under the roots given (resolved, so neither '..' nor
a symbolic link leads out); uploads are limited in size and unpacked with every member checked. Bad
query values answer 400 with a message.
"""
from __future__ import annotations

import hmac
import io
import json
import logging
import math
import secrets
import shutil
import tempfile
import threading
import urllib.parse
import zipfile
from pathlib import Path

from pipeline.app.view_case import CaseView
from pipeline.core import results as infer_results
from pipeline.core.errors import PipelineError
from pipeline.core.files import is_zip_link, safe_name
from pipeline.core.labels import LIVER

log = logging.getLogger(__name__)


PAGE = Path(__file__).with_name("viewer_page.html")
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}
TOKEN_COOKIE = "liver_viewer_token"
WRITES = {"POST", "PUT", "PATCH", "DELETE"}


def _host_name(host: str) -> str:
    """'[::1]:8765' -> '::1', 'localhost:8765' -> 'localhost' (the name, lower case, without the port)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _refusal(viewer: "Viewer", request) -> str | None:
    """Why `request` is refused (403), or None: a foreign Host, no token, or a write from elsewhere.

    The Host check guards a viewer on a loopback address, which a DNS-rebinding page reaches under its own
    name; one that listens on another address (--host) is reached under names this process cannot list,
    so there the token alone admits. A write must come from the page's own origin (its Origin header, when
    a browser sends one, is the Host it asked) and carry the page's XSRF token."""
    if viewer.loopback and _host_name(request.host or "") not in viewer.hosts:
        return f"host {request.host!r} is not this viewer's address"
    if viewer.token is not None:
        given = request.args.get("token") or request.cookies.get(TOKEN_COOKIE) or ""
        if not hmac.compare_digest(given.encode(), viewer.token.encode()):
            return "open the viewer with the URL it printed (it holds the access token)"
    if request.method in WRITES:
        origin = request.headers.get("Origin")
        if origin is not None:
            parts = urllib.parse.urlsplit(origin)
            if parts.scheme not in ("http", "https") or parts.netloc.lower() != (request.host or "").lower():
                return f"request from another site ({origin}) refused"
        given = request.headers.get("X-XSRF-Token") or request.form.get("_xsrf") or ""
        if not hmac.compare_digest(given.encode(), viewer.xsrf.encode()):
            return "request without the page's XSRF token refused"
    return None


def _arg(args, name: str, default, kind):
    """A query value as `kind` (int or float), or a one-line 400 naming it."""
    text = args.get(name)
    if text is None:
        return default
    try:
        value = kind(text)
    except ValueError:
        raise PipelineError(f"{name}: expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise PipelineError(f"{name}: expected a finite number, got {text!r}")
    return value


class Viewer:
    """What the server holds: the run (models loaded once), the allowed roots, the cases."""

    def __init__(self, run_dir: Path, roots: list[Path], results: Path | None = None,
                 max_upload_mb: float = 1024.0, token: str | None = None, host: str = "127.0.0.1") -> None:
        from pipeline.infer.loaded import load_run

        self.token = token  # None: no token asked (--no-token, or an app the caller drives itself)
        self.xsrf = secrets.token_urlsafe(24)  # what the page sends with every request that writes
        self.hosts = LOCAL_HOSTS | {_host_name(host)}
        self.loopback = _host_name(host) in LOCAL_HOSTS  # the Host check applies (see _refusal)

        self.roots = [Path(r).resolve() for r in (roots or [Path.cwd()])]
        for r in self.roots:
            if not r.is_dir():
                raise PipelineError(f"--root {r}: not a folder")
        self.run_dir = Path(run_dir)
        self.run = load_run(self.run_dir, None, ["infer.montage=false"])
        self.work = Path(tempfile.mkdtemp(prefix="liver-viewer-"))
        self.max_upload = int(max_upload_mb * 1024 * 1024)
        self.cases: dict[str, dict] = {}  # id -> {"name", "source", "loader"} ; loaded views cached in _views
        self._views: dict[str, CaseView] = {}
        self._lock = threading.Lock()  # one segmentation at a time
        self.job: dict = {"state": "idle", "message": "", "done": 0, "total": 0, "cases": []}
        if results is not None:
            self._add_results(Path(results))

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)

    # ---- files the page may see
    def allowed(self, path: str | Path) -> Path:
        """`path` resolved, if it lies under one of the roots; else a PipelineError."""
        try:
            resolved = Path(path).expanduser().resolve()
        except (ValueError, OSError, RuntimeError) as exc:  # a NUL byte, a name too long, a symlink loop
            raise PipelineError(f"{path!r}: not a path this viewer can read ({exc})") from None
        if not any(resolved == r or r in resolved.parents for r in self.roots):
            raise PipelineError(f"{path}: outside the folders this viewer may read")
        return resolved

    def browse(self, path: str | None) -> dict:
        if not path:
            return {"path": None, "parent": None, "folders": [{"name": str(r), "path": str(r)} for r in self.roots],
                    "files": 0}
        folder = self.allowed(path)
        if not folder.is_dir():
            raise PipelineError(f"{path}: not a folder")
        entries = sorted(folder.iterdir(), key=lambda p: p.name.lower())
        folders = [{"name": p.name, "path": str(p)} for p in entries
                   if p.is_dir() and not p.name.startswith(".") and self._inside(p)]
        parent = str(folder.parent) if folder not in self.roots and self._inside(folder.parent) else None
        return {"path": str(folder), "parent": parent, "folders": folders,
                "files": sum(1 for p in entries if p.is_file() and not p.name.startswith("."))}

    def _inside(self, path: Path) -> bool:
        try:
            self.allowed(path)
            return True
        except PipelineError:
            return False

    # ---- cases
    def _register(self, name: str, source: str, loader, **extra) -> str:
        case_id = f"c{len(self.cases) + 1}"
        self.cases[case_id] = {"id": case_id, "name": name, "source": source, "loader": loader, **extra}
        return case_id

    def listing(self) -> list[dict]:
        return [{k: v for k, v in c.items() if k != "loader"} for c in self.cases.values()]

    def view(self, case_id: str) -> CaseView:
        if case_id not in self.cases:
            raise PipelineError(f"no case {case_id!r}")
        if case_id not in self._views:
            self._views[case_id] = self.cases[case_id]["loader"]()
        return self._views[case_id]

    def _add_results(self, results: Path) -> None:
        """The cases an earlier `run.py infer` wrote into `results` (its inference.json)."""
        from pipeline.infer.inputs import collect_inputs

        try:
            summary = infer_results.read_summary(results)
        except PipelineError as exc:
            raise PipelineError(f"--results {results}: {exc}") from None
        metrics = _metrics_beside(results)
        found: dict[str, object] = {}
        if summary.get("input") and Path(summary["input"]).exists():
            try:
                found = {c.case: c for c in collect_inputs(Path(summary["input"]))[0]}
            except PipelineError as exc:
                log.warning("%s: the images of these results cannot be read (%s)", summary["input"], exc)
        for row in summary.get("cases", []):
            name, mask_file = row["case"], results / row["mask"]
            source = found.get(name)
            image_file = results / infer_results.image_name(name)
            if source is None and not image_file.is_file():
                log.warning("%s: its image is not available (inference.json names no input), not listed", name)
                continue
            extra = {ending: results / infer_results.liver_file(name, ending)
                     for ending in infer_results.DICOM_ENDINGS.values()
                     if (results / infer_results.liver_file(name, ending)).is_file()}
            self._register(name, str(results), _loader(name, source, image_file, mask_file, extra, row.get("qc", [])),
                           dice=row.get("dice"), liver_ml=row.get("liver_ml"), metrics=metrics.get(name))

    # ---- segmentation
    def segment(self, folder: Path) -> None:
        """Segment every series under `folder` (as `run.py infer --input folder`) in a thread;
        PipelineError "busy" when a segmentation is running."""
        if not self._lock.acquire(blocking=False):
            raise PipelineError("a segmentation is running; wait for it to finish")
        self.job = {"state": "running", "message": f"reading {folder.name}", "done": 0, "total": 0, "cases": []}
        threading.Thread(target=self._segment, args=(folder,), daemon=True).start()

    def _segment(self, folder: Path) -> None:
        from pipeline.infer.inference import segment_cases
        from pipeline.infer.inputs import collect_inputs

        try:
            cases, skipped = collect_inputs(folder)
            out = self.work / f"out{len(self.cases) + 1}"
            self.job["total"] = len(cases)

            def on_case(i, case):
                self.job.update(done=i, message=f"segmenting {case.case} ({i + 1} of {len(cases)})")

            rows, failed = segment_cases(self.run, cases, out, fmt="nifti", desc="view", on_case=on_case)
            if not rows:
                reasons = "; ".join(f"{s['input']}: {s['reason']}" for s in failed[:3])
                raise PipelineError(f"{folder}: no series could be segmented ({reasons})")
            by_name = {c.case: c for c in cases}
            ids = []
            for row in rows:
                loader = _loader(row["case"], by_name[row["case"]], None, out / row["mask"], {}, row.get("qc", []))
                ids.append(self._register(row["case"], str(folder), loader, dice=row.get("dice"),
                                          liver_ml=row.get("liver_ml")))
            note = f"; skipped {len(skipped) + len(failed)}" if skipped or failed else ""
            self.job = {"state": "done", "message": f"{len(rows)} series segmented{note}", "done": len(cases),
                        "total": len(cases), "cases": ids}
        except PipelineError as exc:
            self.job = {"state": "error", "message": str(exc), "done": 0, "total": 0, "cases": []}
        except Exception as exc:  # noqa: BLE001 - a bug must not kill the server; it is logged with its traceback
            log.exception("segmentation of %s failed", folder)
            self.job = {"state": "error", "message": f"internal error: {exc}", "done": 0, "total": 0, "cases": []}
        finally:
            self._lock.release()

    def upload(self, files: list[tuple[str, bytes]]) -> Path:
        """Write uploaded files (one zip, or the files of a folder) into a new folder under the
        work folder; returns it. Names are reduced to safe base names; zips are checked member by member."""
        folder = Path(tempfile.mkdtemp(prefix="upload-", dir=self.work))
        if not files:
            raise PipelineError("nothing uploaded")
        if len(files) == 1 and files[0][0].lower().endswith(".zip"):
            _unzip(files[0][1], folder, self.max_upload, files[0][0])
        else:
            for i, (name, data) in enumerate(files):
                base = safe_name(Path(name.replace("\\", "/")).name or f"file{i}", "uploaded file name")
                target = folder / base
                if target.exists():
                    target = folder / f"{i}_{base}"
                target.write_bytes(data)
        return folder


def _unzip(data: bytes, folder: Path, limit: int, name: str) -> None:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = archive.infolist()
    except zipfile.BadZipFile:
        raise PipelineError(f"{name}: not a readable zip") from None
    if sum(m.file_size for m in members) > limit:
        raise PipelineError(f"{name}: unpacks to more than the upload limit ({limit // 2 ** 20} MB)")
    for i, m in enumerate(members):
        if m.is_dir() or is_zip_link(m):
            continue  # folders are implied; links are never written
        parts = Path(m.filename.replace("\\", "/")).parts
        if m.filename.startswith("/") or ".." in parts:
            raise PipelineError(f"{name}: member {m.filename!r} points outside the archive")
        base = safe_name(parts[-1], "file name in the zip")
        target = folder / f"{i:05d}_{base}"
        with archive.open(m) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)


def _metrics_beside(results: Path) -> dict[str, dict]:
    """evaluate's metrics per case, when an `evaluate` folder sits beside (or inside) the results."""
    for candidate in (results / "evaluate" / "metrics.json", results.parent / "evaluate" / "metrics.json"):
        if candidate.is_file():
            try:
                rows = json.loads(candidate.read_text()).get("cases", [])
            except ValueError:
                return {}
            keep = ("dice", "ravd_pct", "assd_mm", "mssd_mm", "hd95_mm", "score")
            return {r["case"]: {k: r[k] for k in keep if k in r} for r in rows}
    return {}


def _loader(name: str, source, image_file: Path | None, mask_file: Path, extra: dict, qc: list):
    """A function that reads the case for display (the image through infer's own input code)."""
    from pipeline.dicom.volume import read_nifti

    def load() -> CaseView:
        if source is not None:
            volume = source.load()
            modality = source.modality or volume.modality
            truth = source.truth(volume) if source.truth is not None else None
        else:
            volume, modality, truth = read_nifti(image_file), "", None
        mask = read_nifti(mask_file, dtype=None)
        if mask.array.shape != volume.array.shape:
            raise PipelineError(f"{mask_file}: mask shape {mask.array.shape} differs from its image's "
                                f"{volume.array.shape}")
        return CaseView.from_arrays(name, volume.array, volume.affine, mask.array == LIVER, modality or "MR",
                                    reference=truth, mask_file=mask_file, extra_files=extra, qc=list(qc))
    return load


def create_app(viewer: Viewer):
    from flask import Flask, Response, jsonify, request, send_file

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = viewer.max_upload

    @app.before_request
    def only_its_user():
        why = _refusal(viewer, request)
        if why is not None:
            return jsonify(error=why), 403
        return None

    @app.after_request
    def keep_the_token(response):
        if viewer.token is not None and request.args.get("token") == viewer.token:
            response.set_cookie(TOKEN_COOKIE, viewer.token, httponly=True, samesite="Strict")
        return response

    @app.errorhandler(PipelineError)
    def bad_input(exc):
        return jsonify(error=str(exc)), 400

    @app.errorhandler(413)
    def too_large(_exc):
        return jsonify(error=f"upload larger than the limit ({viewer.max_upload // 2 ** 20} MB)"), 413

    @app.get("/")
    def page():
        return Response(PAGE.read_text().replace("{{XSRF}}", viewer.xsrf), mimetype="text/html")

    @app.get("/api/cases")
    def cases():
        return jsonify(cases=viewer.listing(), run=viewer.run.name)

    @app.get("/api/browse")
    def browse():
        return jsonify(viewer.browse(request.args.get("path")))

    @app.post("/api/segment")
    def segment():
        body = request.get_json(silent=True)
        path = body.get("path") if isinstance(body, dict) else None
        if not path or not isinstance(path, str):
            raise PipelineError("choose a folder to segment")
        folder = viewer.allowed(path)
        if not folder.is_dir():
            raise PipelineError(f"{path}: not a folder")
        viewer.segment(folder)
        return jsonify(viewer.job)

    @app.post("/api/upload")
    def upload():
        files = [(f.filename or "upload", f.read()) for f in request.files.getlist("files")]
        folder = viewer.upload(files)
        viewer.segment(folder)
        return jsonify(viewer.job)

    @app.get("/api/job")
    def job():
        return jsonify(viewer.job)

    @app.get("/api/case/<case_id>")
    def info(case_id):
        return jsonify(viewer.view(case_id).info())

    @app.get("/api/case/<case_id>/slice.png")
    def slice_png(case_id):
        a = request.args
        png = viewer.view(case_id).render(a.get("plane", "axial"), _arg(a, "index", 0, int),
                                          _arg(a, "window", 400.0, float), _arg(a, "level", 40.0, float),
                                          overlay=a.get("overlay", "1") == "1", opacity=_arg(a, "opacity", 0.5, float),
                                          reference=a.get("reference", "1") == "1")
        return Response(png, mimetype="image/png")

    @app.get("/api/case/<case_id>/voxel")
    def voxel(case_id):
        a = request.args
        return jsonify(viewer.view(case_id).voxel(_arg(a, "x", 0, int), _arg(a, "y", 0, int), _arg(a, "z", 0, int)))

    @app.get("/api/case/<case_id>/download/<what>")
    def download(case_id, what):
        view = viewer.view(case_id)
        name = safe_name(view.name, "case name")
        if what == "mask.nii.gz" and view.mask_file is not None:
            return send_file(view.mask_file, as_attachment=True, download_name=infer_results.mask_name(name))
        if what in view.extra_files:
            return send_file(view.extra_files[what], as_attachment=True, download_name=infer_results.liver_file(name, what))
        raise PipelineError(f"{view.name}: nothing to download as {what}")

    return app


def start(run_dir: Path, results: Path | None, roots: list[Path], host: str = "127.0.0.1", port: int = 8765,
          max_upload_mb: float = 1024.0, token: bool = True):
    """(a listening werkzeug server, its Viewer, its URL with the access token when `token`);
    `server.serve_forever()` serves."""
    from werkzeug.serving import make_server

    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("the viewer listens on %s: anyone who can reach this machine can use it and read the "
                    "folders under %s", host, ", ".join(str(r) for r in roots or [Path.cwd()]))
    viewer = Viewer(run_dir, roots, results, max_upload_mb, token=secrets.token_urlsafe(32) if token else None,
                    host=host)
    try:
        server = make_server(host, port, create_app(viewer), threaded=True)
    except OSError as exc:
        viewer.close()
        raise PipelineError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    name = f"[{host}]" if ":" in host else host
    return server, viewer, f"http://{name}:{server.server_port}/" + (f"?token={viewer.token}" if viewer.token else "")


def serve(run_dir: Path, results: Path | None, roots: list[Path], host: str = "127.0.0.1", port: int = 8765,
          max_upload_mb: float = 1024.0, ready=None, token: bool = True) -> None:
    """Start the viewer and serve until Ctrl-C (the work folder is removed on the way out).
    `ready(url)` is called once the server listens."""
    server, viewer, url = start(run_dir, results, roots, host, port, max_upload_mb, token)
    try:
        if ready is not None:
            ready(url)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        viewer.close()
