"""Keep the server on the loopback interface unless told otherwise.

``monailabel start_server`` listens on ``0.0.0.0`` (every interface) when ``--host``
is not given. The app starts before uvicorn opens its socket, so it can refuse a
non-loopback address: the server then exits without ever listening. Pass
``--host 127.0.0.1`` (as the docs do), or ``--conf allow_remote true`` to serve other
machines on purpose (then turn on MONAI Label's authentication, see docs/MONAI_LABEL.md).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
from typing import Sequence

__all__ = ["BindAddressError", "bind_host", "check_bind_host", "is_loopback"]

logger = logging.getLogger(__name__)

#: ``monailabel start_server``'s default ``--host``.
MONAILABEL_DEFAULT_HOST = "0.0.0.0"


class BindAddressError(RuntimeError):
    """The server was asked to listen on a non-loopback address without ``--conf allow_remote true``."""


def bind_host(argv: Sequence[str]) -> str | None:
    """The address ``monailabel start_server`` listens on, from its command line; None for other commands."""
    argv = list(argv)
    if "start_server" not in argv:
        return None
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-i", "--host", default=MONAILABEL_DEFAULT_HOST)
    args, _ = parser.parse_known_args(argv[argv.index("start_server") + 1:])
    return args.host


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind_host(argv: Sequence[str], allow_remote: bool) -> str | None:
    """Raise :class:`BindAddressError` for a non-loopback ``--host`` unless ``allow_remote``; returns the host."""
    host = bind_host(argv)
    if host is None:
        return None  # a training/batch subprocess or another launcher: nothing to check
    if is_loopback(host):
        return host
    if not allow_remote:
        given = "" if any(a in ("-i", "--host") or a.startswith("--host=") for a in argv) else " (monailabel's default)"
        raise BindAddressError(
            f"refusing to listen on {host}{given}: this app serves only this machine unless told otherwise. "
            "Start it with --host 127.0.0.1, or add --conf allow_remote true to serve other machines "
            "(then enable authentication: MONAI_LABEL_AUTH_ENABLE=true, see docs/MONAI_LABEL.md)."
        )
    logger.warning("listening on %s: the server is reachable from other machines (allow_remote)", host)
    return host
