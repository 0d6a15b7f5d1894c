"""A control socket for a running machine: `kvmits run --control PATH` serves it, and
`kvmits its dump|translate --connect PATH` asks it.

The protocol is one JSON object a line over a Unix stream socket: a request
{"cmd": NAME, ...arguments}, answered by {"ok": true, "result": ...} or
{"ok": false, "error": "what went wrong"}. A connection may send several requests.
Nothing a client sends can stop the machine: a bad request is answered with an error.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import threading
from typing import Callable

from kvmits.errors import KvmitsError

log = logging.getLogger("kvmits.control")

#: a request line longer than this is refused (and the connection closed)
MAX_REQUEST = 64 << 10


class ControlError(KvmitsError):
    """The control socket could not be reached, or answered with an error."""


class ControlServer:
    """Serves `handlers` ({cmd: fn(request dict) -> JSON-able result}) on a Unix socket at
    `path`, one thread per connection, until close(). Handlers run on those threads."""

    def __init__(self, path: str, handlers: dict[str, Callable[[dict], object]]):
        self.path = str(path)
        self.handlers = dict(handlers)
        self.requests = 0
        self.errors = 0
        self._closed = threading.Event()
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)            # a stale socket of an earlier run
        except FileNotFoundError:
            pass
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(self.path)
            os.chmod(self.path, 0o600)          # the machine's owner only: it can pause the VM
            self._sock.listen(4)
        except OSError as exc:
            self._sock.close()
            raise ControlError(f"cannot serve the control socket {self.path}: {exc}") from exc
        self._thread = threading.Thread(target=self._accept, name="control", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return                          # closed
            threading.Thread(target=self._serve, args=(conn,), name="control-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as rfile:
            while not self._closed.is_set():
                line = rfile.readline(MAX_REQUEST + 1)
                if not line:
                    return
                if len(line) > MAX_REQUEST:
                    self.requests += 1
                    self.errors += 1
                    self._reply(conn, {"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"})
                    return
                if not self._reply(conn, self.answer(line)):
                    return

    def answer(self, line: bytes) -> dict:
        """The reply to one request line."""
        self.requests += 1
        try:
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                raise ValueError('a request is a JSON object with a "cmd" string')
            handler = self.handlers.get(request["cmd"])
            if handler is None:
                raise ValueError(f"unknown cmd {request['cmd']!r} (known: {', '.join(sorted(self.handlers))})")
            return {"ok": True, "result": handler(request)}
        except (KvmitsError, ValueError, KeyError, TypeError) as exc:
            # a bad request, or the machine refused (KvmError names the ioctl and errno)
            self.errors += 1
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        except Exception as exc:    # noqa: BLE001 - the serving thread must outlive any one request
            self.errors += 1
            log.exception("control request %r failed", line[:200])
            return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}

    @staticmethod
    def _reply(conn: socket.socket, reply: dict) -> bool:
        try:
            conn.sendall(json.dumps(reply).encode() + b"\n")
            return True
        except OSError:
            return False                        # the client went away

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._thread.join(5.0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def request(path: str, cmd: str, timeout: float = 120.0, **args) -> object:
    """Send one request to the control socket at `path`; its result, or ControlError."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
            with sock.makefile("rb") as rfile:
                line = rfile.readline()
    except OSError as exc:
        raise ControlError(f"control socket {path}: {exc.strerror or exc}") from exc
    if not line:
        raise ControlError(f"control socket {path}: closed without an answer")
    try:
        reply = json.loads(line)
        ok = reply["ok"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ControlError(f"control socket {path}: not a kvmits answer: {line[:200]!r}") from exc
    if not ok:
        raise ControlError(f"{path}: {reply.get('error')}")
    return reply["result"]


def machine_handlers(current) -> dict[str, Callable[[dict], object]]:
    """What `kvmits run --control` answers about its machine. `current`: the Machine, or a
    callable returning the one served now (a migration replaces it)."""
    from kvmits.machine.its import require_its

    get = current if callable(current) else lambda: current

    def its_dump(_req: dict) -> dict:
        return require_its(get()).snapshot().to_json()

    def its_translate(req: dict) -> dict:
        devid, eventid = req["devid"], req["eventid"]
        for name, value in (("devid", devid), ("eventid", eventid)):
            if not isinstance(value, int) or not 0 <= value < 1 << 32:
                raise ValueError(f"{name} must be an integer in 0..2**32-1, not {value!r}")
        return require_its(get()).translation_report(devid, eventid)

    def info(_req: dict) -> dict:
        machine = get()
        kind = machine.its.kind if machine.its is not None else None
        return {"cpus": machine.config.cpus, "its": kind, "pid": os.getpid()}

    def save(req: dict) -> dict:
        path = req.get("file")
        if not isinstance(path, str) or not path:
            raise ValueError(f"save needs a file path (\"file\"), not {path!r}")
        written = get().save(path)              # pauses the vCPUs for the capture and write
        return written._asdict()

    return {"its-dump": its_dump, "its-translate": its_translate, "info": info, "save": save}
