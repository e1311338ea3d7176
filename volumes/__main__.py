"""``python -m volumes`` is the command line; see :mod:`volumes.cli`."""

from volumes.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
