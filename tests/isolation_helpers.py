"""A well-behaved tenant that measures how long it had to wait while another
front-end attacked the daemon (tests/test_isolation.py).

It runs in its own process, so that the attacker's Python work (filling a
32768-entry ring, say) cannot hold it up through the GIL: what it measures is
the daemon's doing alone.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time

#: No front-end may make another controller's I/O, or an RPC, wait longer.
MAX_WAIT_S = 1.0


def _tenant(sock_path: str, rpc_path: str, stop, out) -> None:
    from vhost_core.rpc.client import RpcClient
    from vhost_core.testing import connect_blk

    io_max = rpc_max = 0.0
    ios = rpcs = 0
    errors: list[str] = []
    try:
        with connect_blk(sock_path, timeout=30) as dev:
            data = os.urandom(4096)
            last_rpc = 0.0
            while not stop.is_set():
                t = time.monotonic()
                dev.write(8, data)
                if dev.read(8, 8) != data:
                    errors.append("read back other data than written")
                io_max = max(io_max, (time.monotonic() - t) / 2)
                ios += 1
                time.sleep(0.002)   # a steady tenant, not a second attacker of the CPU
                if t - last_rpc > 0.05:
                    last_rpc = t
                    t = time.monotonic()
                    with RpcClient(rpc_path, timeout=30) as c:
                        c.call("spdk_get_version")
                    rpc_max = max(rpc_max, time.monotonic() - t)
                    rpcs += 1
    except Exception as exc:       # reported, not raised: the parent asserts
        errors.append(f"{type(exc).__name__}: {exc}")
    out.put({"io_max": io_max, "rpc_max": rpc_max, "ios": ios, "rpcs": rpcs, "errors": errors})


class Bystander:
    """``with Bystander(d) as b: <attack>`` then ``b.check()``: the other
    controller (vhost.1) kept serving, and the RPC socket kept answering, with no
    wait above MAX_WAIT_S, while the attack ran."""

    def __init__(self, d, ctrlr: str = "vhost.1") -> None:
        ctx = mp.get_context("fork")
        self._stop = ctx.Event()
        self._out = ctx.Queue()
        self._proc = ctx.Process(target=_tenant, args=(d.socket(ctrlr), d.rpc_path, self._stop, self._out),
                                 daemon=True)
        self.result: dict | None = None

    def __enter__(self) -> "Bystander":
        self._proc.start()
        time.sleep(0.3)         # connected and doing I/O before the attack starts
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.3)
        self._stop.set()
        try:
            self.result = self._out.get(timeout=60)
        finally:
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()

    def check(self, max_wait: float = MAX_WAIT_S) -> dict:
        r = self.result
        assert r is not None, "the bystander reported nothing"
        assert not r["errors"], f"the other controller's I/O failed: {r['errors']}"
        assert r["ios"] > 10 and r["rpcs"] > 2, f"the bystander hardly ran: {r}"
        assert r["io_max"] < max_wait, f"another controller's I/O waited {r['io_max']:.2f}s: {r}"
        assert r["rpc_max"] < max_wait, f"an RPC waited {r['rpc_max']:.2f}s: {r}"
        return r
