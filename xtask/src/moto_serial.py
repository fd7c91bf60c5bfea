"""moto's S3 server, with the writes to any one object made one at a time.

Started by `cargo xtask` (see `services.rs`) as `python moto_serial.py HOST PORT`.

Why: moto checks `If-Match` / `If-None-Match` and then stores the object in
two steps, with no lock between them, on a threaded server. Two conditional
PUTs of the same key can then both pass their check, and the second silently
replaces the first: a lost update that real S3 (which makes the check and the
write one atomic step) never allows. The conformance suite's exact-count CAS
race caught it (394 of 400 increments stored).

So every request that writes (anything but GET, HEAD and OPTIONS) passes a
gate first. A request on one object (a path-style `/bucket/key` path) waits
only for the other writes of that object; any other write (a multi-object
delete, a bucket's creation) waits for every write and holds them all off.
Reads pass freely.
"""

import os
import sys
import threading

from werkzeug.serving import run_simple

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)

READS = frozenset(("GET", "HEAD", "OPTIONS"))


class Gate:
    """Writes of one object one at a time; a write of the whole bucket alone."""

    def __init__(self):
        self._cond = threading.Condition()
        self._objects = set()  # objects being written
        self._whole = False  # a whole-bucket write in progress
        self._whole_waiting = 0  # whole-bucket writes waiting (they go first)

    def enter(self, key):
        with self._cond:
            if key is None:
                self._whole_waiting += 1
                try:
                    self._cond.wait_for(lambda: not self._whole and not self._objects)
                finally:
                    self._whole_waiting -= 1
                    # Object writes held off by this one may go on if it
                    # gave up waiting.
                    self._cond.notify_all()
                self._whole = True
            else:
                self._cond.wait_for(
                    lambda: not self._whole
                    and not self._whole_waiting
                    and key not in self._objects
                )
                self._objects.add(key)

    def leave(self, key):
        with self._cond:
            if key is None:
                self._whole = False
            else:
                self._objects.discard(key)
            self._cond.notify_all()


def object_of(environ):
    """The object a path-style request names, or None for a bucket or more.

    By its path alone: one object reached under two host names is still
    one object. (xtask's clients use path-style requests; a virtual-hosted
    one is taken for a whole-bucket write, which is only slower.)
    """
    path = environ.get("PATH_INFO", "")
    bucket, _, key = path.lstrip("/").partition("/")
    if not bucket or not key:
        return None
    return (bucket, key)


def gated(app):
    gate = Gate()

    def serve(environ, start_response):
        if environ.get("REQUEST_METHOD", "GET") in READS:
            return app(environ, start_response)
        key = object_of(environ)
        gate.enter(key)
        try:
            # The whole response is made inside the gate: moto may do part
            # of the work while its body is iterated.
            body = app(environ, start_response)
            try:
                return list(body)
            finally:
                close = getattr(body, "close", None)
                if close is not None:
                    close()
        finally:
            gate.leave(key)

    return serve


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    os.environ.setdefault("MOTO_PORT", str(port))
    app = DomainDispatcherApplication(create_backend_app)
    run_simple(
        host,
        port,
        gated(app),
        threaded=True,
        request_handler=MotoRequestHandler,
    )


if __name__ == "__main__":
    main()
