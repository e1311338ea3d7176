"""Fault injection for tests/test_ray_engine.py: a :class:`CaseWorker` whose process dies mid-case.

Imported by Ray's worker processes (the test puts this folder on their ``PYTHONPATH``), so
it lives in a module of its own rather than in the test file. The fault fires once per
run: a marker file in ``$VOLUMES_TEST_FAULTS`` remembers it across the restarted actor.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from volumes.inference.ray_engine import CaseWorker

MID = "crash_mid"  # its worker is SIGKILLed while writing record.json (the bundles' outputs written)
ORPHAN = "orphan"  # the temporary record.json the killed worker left: its path
COMPLETED = "completed.log"  # one line per finish_case that returned: "<case-id> <pid>"


class CrashingWorker(CaseWorker):
    """:class:`CaseWorker` whose process SIGKILLs itself in the middle of case :data:`MID`, the first time.

    The kill comes while ``MID/record.json`` is written: its temporary file is complete and
    not yet renamed (every bundle's files are on disk), so the dead worker leaves it behind.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        faults = Path(os.environ["VOLUMES_TEST_FAULTS"])
        finish_case = self.runner.finish_case
        replace = os.replace

        def replace_or_die(src, dst, *args, **kwargs):
            dst = Path(dst)
            if dst.name == "record.json" and dst.parent.name == MID and not (faults / MID).exists():
                (faults / ORPHAN).write_text(str(src))
                (faults / MID).touch()
                os.kill(os.getpid(), signal.SIGKILL)
            return replace(src, dst, *args, **kwargs)

        os.replace = replace_or_die  # this worker process only

        def finish_case_and_log(prepared):
            outcome = finish_case(prepared)
            with open(faults / COMPLETED, "a") as log:
                log.write(f"{prepared.item['case_id']} {os.getpid()}\n")
            return outcome

        self.runner.finish_case = finish_case_and_log
