"""OHIF beside the archive: one origin serving the viewer and the archive's DICOMweb, read-only.

``volumes pacs viewer --ohif DIST --dicomweb URL`` serves the built OHIF viewer (the ``dist/``
folder of the npm package ``@ohif/app``, installed by ``scripts/setup_viewer.sh``) and forwards
``/dicom-web/...`` to the archive's DICOMweb root, so the page and its data share one origin
(no CORS set-up on the archive).

Why a small proxy and not Orthanc's ServeFolders plugin: OHIF's build is made for the root of
its origin (``PUBLIC_URL="/"``, assets at ``/app.bundle...js``) and routes on the client
(``/viewer?StudyInstanceUIDs=...``, ``/segmentation?...``), so any path that is not a file must
answer ``index.html``. ServeFolders serves files under a prefix and answers 404 for the rest.

What the proxy forwards: GET and HEAD under ``/dicom-web/`` only (QIDO-RS and WADO-RS: the
viewer reads). No STOW, no DELETE, no other archive path: the archive's REST API (which can
delete and modify) is not reachable through it. It binds to 127.0.0.1 unless told otherwise.
``app-config.js`` is generated: OHIF's stock one points at a public demo server.
"""

from __future__ import annotations

import http.client
import json
import logging
import mimetypes
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, urlsplit

from volumes.errors import VolumesError

__all__ = ["DICOMWEB_PREFIX", "OHIF_VERSION", "ViewerServer", "app_config", "check_ohif", "study_url"]

logger = logging.getLogger(__name__)

OHIF_VERSION = "3.13.2"  # the @ohif/app release scripts/setup_viewer.sh installs and the tests ran against
DICOMWEB_PREFIX = "/dicom-web"
_FORWARDED_HEADERS = ("accept", "range", "if-none-match", "if-modified-since")
_RETURNED_HEADERS = ("content-type", "content-length", "etag", "last-modified", "cache-control", "content-range")


def study_url(viewer: str, study_uid: str) -> str:
    """The viewer page of one study: ``{viewer}/viewer?StudyInstanceUIDs={uid}``."""
    return f"{viewer.rstrip('/')}/viewer?StudyInstanceUIDs={quote(str(study_uid), safe='.')}"


def app_config(name: str = "volumes archive") -> str:
    """OHIF's ``window.config``: one DICOMweb data source at this origin's ``/dicom-web``.

    The settings are the ones OHIF documents for Orthanc's DICOMweb plugin (QIDO with
    ``includefield``, WADO-RS frames and bulk data, no fuzzy matching).
    """
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "dicomweb",
        "configuration": {
            "friendlyName": name, "name": "orthanc",
            # relative roots: the page's own origin, whatever host name the user typed
            "wadoUriRoot": DICOMWEB_PREFIX, "qidoRoot": DICOMWEB_PREFIX, "wadoRoot": DICOMWEB_PREFIX,
            "qidoSupportsIncludeField": True, "supportsReject": False, "dicomUploadEnabled": False,
            "imageRendering": "wadors", "thumbnailRendering": "wadors", "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False, "supportsWildcard": True, "omitQuotationForMultipartRequest": True,
            "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
        },
    }
    config = {
        "routerBasename": "/", "extensions": [], "modes": [], "showStudyList": True, "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True, "maxNumberOfWebWorkers": 2, "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False, "showErrorDetails": "always", "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": "dicomweb", "dataSources": [source],
    }
    return "window.config = " + json.dumps(config, indent=1) + ";\n"


def check_ohif(folder: str | Path) -> Path:
    """The OHIF ``dist/`` folder, or a clear error saying how to install it."""
    folder = Path(folder)
    if not (folder / "index.html").is_file() or not any(folder.glob("app.bundle.*.js")):
        raise VolumesError(f"{folder}: not a built OHIF viewer (no index.html and app.bundle.*.js); "
                           "run scripts/setup_viewer.sh, which installs @ohif/app into .viewer/")
    return folder


class _Handler(SimpleHTTPRequestHandler):
    """Files of ``dist/`` (index.html for client routes), app-config.js, and /dicom-web/ forwarded."""

    server_version = "volumes-viewer"

    def __init__(self, *args, upstream, config_js: bytes, **kwargs):
        self.upstream = upstream
        self.config_js = config_js
        super().__init__(*args, **kwargs)

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        logger.debug("%s %s", self.address_string(), format % args)

    # -------------------------------------------------------------- GET / HEAD
    def do_GET(self):  # noqa: N802 - http.server's name
        self._answer(head=False)

    def do_HEAD(self):  # noqa: N802
        self._answer(head=True)

    def _refuse(self):
        self.send_error(405, "the viewer's proxy is read-only (GET and HEAD under /dicom-web/)")

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse  # noqa: N815

    def _answer(self, head: bool) -> None:
        path = urlsplit(self.path).path
        if path == DICOMWEB_PREFIX or path.startswith(DICOMWEB_PREFIX + "/"):
            return self._forward(head)
        if path == "/app-config.js":
            return self._bytes(self.config_js, "application/javascript", head)
        local = Path(self.translate_path(path))
        if path != "/" and local.is_file():
            return super().do_HEAD() if head else super().do_GET()
        # a client route (/viewer, /segmentation, ...) or the root: the single-page app
        return self._bytes((Path(self.directory) / "index.html").read_bytes(), "text/html; charset=utf-8", head)

    def _bytes(self, body: bytes, content_type: str, head: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _forward(self, head: bool) -> None:
        scheme, netloc, base = self.upstream
        target = base + self.path[len(DICOMWEB_PREFIX):]
        connection_type = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        connection = connection_type(netloc, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() in _FORWARDED_HEADERS}
            connection.request("HEAD" if head else "GET", target, headers=headers)
            response = connection.getresponse()
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() in _RETURNED_HEADERS:
                    self.send_header(key, value)
            body = b"" if head else response.read()
            if response.getheader("content-length") is None:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if body:
                self.wfile.write(body)
        except OSError as exc:
            logger.warning("the archive did not answer %s: %s", target, exc)
            self.send_error(502, f"the archive at {netloc} did not answer")
        finally:
            connection.close()


class ViewerServer:
    """OHIF (``ohif``: the ``dist/`` folder) and the archive's DICOMweb (``dicomweb``) on one origin.

    ``port=0`` picks a free port; :attr:`url` is the origin to open. Use as a context manager
    or call :meth:`start` / :meth:`stop`.
    """

    def __init__(self, ohif: str | Path, dicomweb: str, *, bind: str = "127.0.0.1", port: int = 0,
                 name: str = "volumes archive"):
        self.ohif = check_ohif(ohif)
        parts = urlsplit(dicomweb.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise VolumesError(f"--dicomweb {dicomweb!r} must be the archive's DICOMweb root, "
                               "e.g. http://127.0.0.1:8042/dicom-web")
        for extension, kind in ((".js", "application/javascript"), (".mjs", "application/javascript"),
                                (".wasm", "application/wasm"), (".woff2", "font/woff2"), (".json", "application/json")):
            mimetypes.add_type(kind, extension)
        handler = partial(_Handler, directory=str(self.ohif), upstream=(parts.scheme, parts.netloc, parts.path),
                          config_js=app_config(name).encode())
        self.httpd = ThreadingHTTPServer((bind, port), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://{bind if bind not in ('0.0.0.0', '') else '127.0.0.1'}:{self.httpd.server_address[1]}"
        self._thread: threading.Thread | None = None

    def start(self) -> "ViewerServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="ohif-viewer", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> "ViewerServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
