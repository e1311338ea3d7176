"""Fault injection for tests/test_ray_engine.py: a :class:`CaseWorker` whose process dies mid-case.

Imported by Ray's worker processes (the test puts this folder on their ``PYTHONPATH``), so
it lives in a module of its own rather than in the test file. The fault fires once per
run: a marker file in ``$VOLUMES_TEST_FAULTS`` remembers it across the restarted actor.
"""

from __future__ import annotations

import os
from pathlib import Path

from volumes.inference.ray_engine import CaseWorker

MID = "crash_mid"  # its worker dies after the bundles' outputs are written, before record.json
COMPLETED = "completed.log"  # one line per finish_case that returned: "<case-id> <pid>"


class CrashingWorker(CaseWorker):
    """:class:`CaseWorker` that ``os._exit``s in the middle of case :data:`MID`, the first time."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        faults = Path(os.environ["VOLUMES_TEST_FAULTS"])
        run_models, finish_case = self.runner._run_models, self.runner.finish_case

        def run_models_then_die(prepared):
            record = run_models(prepared)  # every bundle's files are on disk now, record.json is not
            marker = faults / MID
            if prepared.item["case_id"] == MID and not marker.exists():
                marker.touch()
                os._exit(1)
            return record

        def finish_case_and_log(prepared):
            outcome = finish_case(prepared)
            with open(faults / COMPLETED, "a") as log:
                log.write(f"{prepared.item['case_id']} {os.getpid()}\n")
            return outcome

        self.runner._run_models = run_models_then_die
        self.runner.finish_case = finish_case_and_log
