"""Packing and unpacking the task envelope: pyswtask's pack_envelope / unpack_envelope against
raw msgpack.packb / msgpack.unpackb of the same tuple, in one process.

    python perf/bench_envelope.py [--quick] [--runs N] [--n N] [--payload BYTES]

The envelope is (name, method, params, type, logid, spanid), params [1, "x" * k, 3.5] sized so
that the packed envelope is --payload bytes (103 by default, the Swoole scripts' task size).
pack_envelope checks params and packs with one reused msgpack Packer; unpack_envelope unpacks
and checks the six fields' types. The raw calls do neither: msgpack.packb builds a Packer per
call, msgpack.unpackb only decodes. Also measured, not compared: a reused msgpack.Packer().pack,
the floor for packing. Both sides produce and read the same bytes. Prints one JSON line per
result (ops/s, medians over interleaved rounds), then one per ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _summary  # noqa: E402
from bench_dispatch import payload_params  # noqa: E402


def _timed(fn: Callable[[], Any], n: int) -> float:
    """ops/s of n calls of fn in a plain loop."""
    clock = time.perf_counter
    t = clock()
    for _ in range(n):
        fn()
    return n / (clock() - t)


def _row(workload: str, system: str, value: float, n: int, payload: int, ours: bool,
         op: str) -> dict[str, Any]:
    return {"workload": workload, "system": system, "value": round(value, 1), "unit": "ops/s",
            "n": n, "payload": payload, "ours": ours, "op": op}


def pyswtask_envelope(n: int, payload: int = 103) -> list[dict[str, Any]]:
    from pyswtask._core import pack_envelope, unpack_envelope

    params = payload_params(payload)
    body = pack_envelope("demo", "echo", params)
    if unpack_envelope(body)[2] != params:
        raise RuntimeError("the envelope did not round-trip")
    return [
        _row("envelope_pack", "pyswtask", _timed(lambda: pack_envelope("demo", "echo", params), n),
             n, len(body), True, "pack_envelope(name, method, params)"),
        _row("envelope_unpack", "pyswtask", _timed(lambda: unpack_envelope(body), n), n,
             len(body), True, "unpack_envelope(body)"),
    ]


def msgpack_envelope(n: int, payload: int = 103) -> list[dict[str, Any]]:
    import msgpack

    params = payload_params(payload)
    envelope = ("demo", "echo", params, 1, "", 0)
    packb, unpackb, pack = msgpack.packb, msgpack.unpackb, msgpack.Packer().pack
    body = packb(envelope)
    from pyswtask._core import pack_envelope

    if body != pack_envelope("demo", "echo", params):
        raise RuntimeError("msgpack.packb and pack_envelope disagree on the bytes")
    return [
        _row("envelope_pack", "msgpack.packb", _timed(lambda: packb(envelope), n), n, len(body),
             False, "msgpack.packb(tuple)"),
        _row("envelope_pack", "msgpack.Packer().pack (reused)", _timed(lambda: pack(envelope), n),
             n, len(body), False, "one Packer, reused"),
        _row("envelope_unpack", "msgpack.unpackb", _timed(lambda: unpackb(body), n), n, len(body),
             False, "msgpack.unpackb(body)"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5x fewer calls")
    parser.add_argument("--runs", type=int, default=3, help="interleaved rounds (median kept)")
    parser.add_argument("--n", type=int, default=1_000_000, help="calls of each kind")
    parser.add_argument("--payload", type=int, default=103, help="envelope size in bytes")
    args = parser.parse_args()
    n = args.n // 5 if args.quick else args.n
    rounds = [pyswtask_envelope(n, args.payload) + msgpack_envelope(n, args.payload)
              for _ in range(args.runs)]
    rows = _summary.medians(rounds)
    for row in rows + _summary.ratios(rounds, rows):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
