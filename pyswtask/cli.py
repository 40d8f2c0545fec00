"""The ``pyswtask`` command: ``pyswtask run module:server`` and ``pyswtask --version``."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Sequence

from ._version import __version__
from .server import Server


def load_server(path: str) -> Server:
    """Imports ``module:attribute`` (gunicorn's app path); the attribute is a Server, or a
    callable returning one. The current directory is importable, as with ``python -m``."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise SystemExit(f"pyswtask: expected MODULE:SERVER (e.g. myapp.tasks:server), not {path!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SystemExit(f"pyswtask: cannot import {module_name!r}: {exc}") from None
    obj = getattr(module, attr, None)
    if obj is None:
        raise SystemExit(f"pyswtask: module {module_name!r} has no attribute {attr!r}")
    if callable(obj) and not isinstance(obj, Server):
        obj = obj()
    if not isinstance(obj, Server):
        raise SystemExit(f"pyswtask: {path} is a {type(obj).__name__}, not a pyswtask.Server")
    return obj


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyswtask", description=__doc__)
    parser.add_argument("--version", action="version", version=f"pyswtask {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start a server: pyswtask run module:server")
    run.add_argument("app", help="MODULE:SERVER, the Server object (or a factory) to start")
    run.add_argument("--log-level", default="INFO",
                     choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    server = load_server(args.app)
    return server.start()


if __name__ == "__main__":
    sys.exit(main())
