"""``python -m volumes.apps.bench --child SPEC``: the child process of section e (the command is ``volumes bench``)."""

import sys

from volumes.apps.bench.peers import child_main
from volumes.apps.child import child_spec

spec = child_spec(sys.argv[1:])
if spec is None:
    sys.exit("usage: python -m volumes bench ... (this module's own entry point is for its child processes)")
sys.exit(child_main(spec))
