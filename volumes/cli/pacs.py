"""``python -m volumes pacs listen|pull|run|status``: the hospital DICOM node (see docs/PACS.md).

    volumes pacs listen --config node.yaml      storage SCP; processes each study after its quiet period
    volumes pacs pull --config node.yaml --from 20240101 --to 20240131 --modality CT [--accessions FILE]
                                                C-FIND/C-MOVE or QIDO/WADO from the config's source, then run
    volumes pacs run --config node.yaml [--study UID ...]
                                                process received studies that are ready (or the given ones)
    volumes pacs status --config node.yaml      the ledger as JSON
    volumes pacs viewer --ohif .viewer/ohif-3.13.2 --dicomweb http://127.0.0.1:8042/dicom-web [--port 3000]
                                                OHIF and the archive's DICOMweb on one origin (no --config)

Exit codes: 0 every study done, 1 some study failed (reasons in the ledger and audit log),
2 bad arguments or config.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading

from volumes.errors import VolumesError

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    """Register ``pacs`` and its sub-commands on an argparse sub-parser collection."""
    pacs = sub.add_parser("pacs", help="DICOM node: receive or pull studies, run the bundles, send SEG + SR back",
                          description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = pacs.add_subparsers(dest="pacs_command", required=True)
    for name, text in (("listen", "storage SCP: receive studies, process each after its quiet period"),
                       ("pull", "find studies on the source PACS, fetch them, process them"),
                       ("run", "process received studies that are ready (or --study UID)"),
                       ("status", "print the ledger (studies and series) as JSON")):
        action = actions.add_parser(name, help=text, description=text)
        action.add_argument("--config", required=True, help="the node's YAML/JSON config file")
        if name == "listen":
            action.add_argument("--port", type=int, default=None, help="override the config's port")
            action.add_argument("--receive-only", action="store_true", help="store studies, do not process them")
            action.add_argument("--poll-s", type=float, default=1.0, help="how often ready studies are looked for")
        if name == "pull":
            action.add_argument("--from", dest="date_from", default=None, metavar="YYYYMMDD")
            action.add_argument("--to", dest="date_to", default=None, metavar="YYYYMMDD")
            action.add_argument("--modality", default=None, help="ModalitiesInStudy, e.g. CT")
            action.add_argument("--accessions", default=None, metavar="FILE", help="accession numbers, one a line")
            action.add_argument("--port", type=int, default=None, help="override the config's port (C-MOVE target)")
        if name == "run":
            action.add_argument("--study", action="append", default=[], metavar="UID",
                                help="process this study now (repeatable), even if it failed before")
    viewer = actions.add_parser("viewer", help="serve OHIF beside the archive (read-only DICOMweb on one origin)",
                                description="Serve the OHIF viewer (scripts/setup_viewer.sh installs it) and forward "
                                            "GET /dicom-web/ to the archive, on one origin (docs/PACS.md).")
    viewer.add_argument("--ohif", default=None, help="OHIF's dist/ folder (default: .viewer/ohif-<version>/)")
    viewer.add_argument("--dicomweb", required=True, help="the archive's DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web")
    viewer.add_argument("--bind", default="127.0.0.1", help="listen address (default loopback)")
    viewer.add_argument("--port", type=int, default=3000)
    pacs.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run one ``pacs`` sub-command; returns the exit code."""
    from volumes.pacs.config import load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.pacs_command == "viewer":
        return _viewer(args)
    try:
        config = load_config(args.config, port=getattr(args, "port", None))
    except VolumesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return {"listen": _listen, "pull": _pull, "run": _run, "status": _status}[args.pacs_command](config, args)


def _viewer(args) -> int:
    from pathlib import Path

    from volumes.pacs.viewer import OHIF_VERSION, ViewerServer

    ohif = args.ohif or Path(__file__).resolve().parents[2] / ".viewer" / f"ohif-{OHIF_VERSION}"
    try:
        server = ViewerServer(ohif, args.dicomweb, bind=args.bind, port=args.port)
    except (VolumesError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"OHIF at {server.url} (archive {args.dicomweb}); open {server.url}/viewer?StudyInstanceUIDs=<uid>",
          flush=True)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.httpd.shutdown).start())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
    return 0


def _study_line(config, study: str, state: str | None) -> str:
    viewer = config.viewer_url(study) if state == "done" else None
    return f"study {study}: {state}" + (f"  viewer: {viewer}" if viewer else "")


def _node(config):
    from volumes.pacs.job import PacsNode

    return PacsNode(config)


def _states(node, studies) -> int:
    failed = [s for s in studies if (node.ledger.study(s) or {}).get("state") != "done"]
    for study in failed:
        print(f"study {study}: {(node.ledger.study(study) or {}).get('reason')}", file=sys.stderr)
    return 1 if failed else 0


def _listen(config, args) -> int:
    from volumes.pacs.scp import StorageSCP

    node = _node(config)
    if not args.receive_only:
        node.models  # load the bundles before accepting studies: a bad bundle fails now, not per study
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    scp = StorageSCP(config, node.ledger, node.audit)
    scp.start()
    print(f"listening as {config.ae_title} on {config.bind}:{scp.port}", flush=True)
    failed = 0
    try:
        while not stop.wait(args.poll_s):
            if args.receive_only:
                continue
            for study in node.process_ready(busy=scp.busy_studies()):
                state = (node.ledger.study(study) or {}).get("state")
                print(_study_line(config, study, state), flush=True)
                failed += state != "done"
    finally:
        scp.stop()
        node.close()
    return 1 if failed else 0


def _pull(config, args) -> int:
    from volumes.pacs.pull import StudyQuery, find_studies, pull_dicomweb, pull_dimse, read_accessions
    from volumes.pacs.scp import StorageSCP
    from volumes.pacs.send import SendError

    if config.source is None:
        print(f"error: {config.path}: `pull` needs a `source` (DIMSE AE or DICOMweb URL)", file=sys.stderr)
        return 2
    query = StudyQuery(date_from=args.date_from, date_to=args.date_to, modality=args.modality,
                       accessions=read_accessions(args.accessions) if args.accessions else [])
    node = _node(config)
    node.models
    try:
        studies = find_studies(config.source, query, calling_ae=config.ae_title, timeout=config.timeout_s)
        node.audit.event("pull_query", source=config.source.name, filters=query.filters(), studies=len(studies))
        print(f"{len(studies)} studies match at {config.source.name}", flush=True)
        if config.source.kind == "dicomweb":
            fetched = pull_dicomweb(node, studies)
        else:
            scp = StorageSCP(config, node.ledger, node.audit)
            scp.start()
            try:
                fetched = pull_dimse(node, scp, studies)
            finally:
                scp.stop()
        for study in fetched:
            print(_study_line(config, study, node.process_study(study)), flush=True)
        missing = set(studies) - set(fetched)
        return 1 if missing else _states(node, fetched)
    except SendError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        node.close()


def _run(config, args) -> int:
    node = _node(config)
    try:
        studies = args.study or node.ledger.ready_studies(config.quiet_s)
        for study in studies:
            print(_study_line(config, study, node.process_study(study)), flush=True)
        return _states(node, studies)
    finally:
        node.close()


def _status(config, args) -> int:
    from volumes.pacs.ledger import Ledger

    ledger = Ledger(config.output / "ledger.sqlite")
    try:
        studies = ledger.studies()
        out = [{**s, "series": ledger.series_of_study(s["study_uid"]),
                **({"viewer_url": config.viewer_url(s["study_uid"])} if config.viewer and s["state"] == "done" else {})}
               for s in studies]
    finally:
        ledger.close()
    print(json.dumps(out, indent=1, default=str))
    return 0
