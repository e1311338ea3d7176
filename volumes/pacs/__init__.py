"""``volumes pacs``: a DICOM node that receives or pulls studies, runs the bundles and sends results back.

Modules (each small, each usable alone):

    config    one YAML/JSON file: our AE, peers, bundles, rules, destinations, retries
    rules     series selection rules and the pre-flight geometry checks
    ledger    SQLite job ledger: each study once, a state per series, survives kill -9
    audit     append-only JSONL audit log (PatientID hashed, no names)
    uids      deterministic UIDs of the outputs
    scp       the storage SCP (``listen``): allow-list, dedupe, quiet period, watermark
    pull      C-FIND/C-MOVE and QIDO-RS/WADO-RS (``pull``)
    sr        DICOM SR TID 1500 measurement report (highdicom Comprehensive3DSR)
    send      C-STORE SCU / STOW-RS with status checks, retries, confirmation
    job       one study: select, pre-flight, BatchInference, mark, SR, send, confirm

The command line is :mod:`volumes.cli.pacs`. The network runs on :class:`volumes.inference.runner.BatchInference`: a study's selected
series are folders of the received files, and the SEG it writes is what is sent.
"""
