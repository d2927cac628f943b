"""Test helper: run an :class:`RpcServer` in a background thread's event loop.

    with ServerThread(registry, path) as st:
        RpcClient(path).call("rpc_get_methods")
        st.run(some_coroutine())    # run code in the server's loop
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any, Coroutine

from .registry import RpcRegistry
from .server import RpcServer

__all__ = ["ServerThread"]


class ServerThread:
    def __init__(self, registry: RpcRegistry, path: str, **server_kwargs: Any) -> None:
        self.registry = registry
        self.path = str(path)
        self.server = RpcServer(registry, self.path, **server_kwargs)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="rpc-server-thread", daemon=True)

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 10.0) -> Any:
        """Run ``coro`` in the server loop and return its result."""
        fut: concurrent.futures.Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def start(self) -> "ServerThread":
        self._thread.start()
        try:
            self.run(self.server.start())
        except BaseException:
            self._stop_loop()
            raise
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            self.run(self.server.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
