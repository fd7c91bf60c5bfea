"""moto's S3 server, with the requests that change the bucket served one at a time.

Started by `cargo xtask` (see `services.rs`) as `python moto_serial.py HOST PORT`.

Why: moto checks `If-Match` / `If-None-Match` and then stores the object in
two steps, with no lock between them, on a threaded server. Two conditional
PUTs of the same key can then both pass their check, and the second silently
replaces the first: a lost update that real S3 (which makes the check and the
write one atomic step) never allows. The conformance suite's exact-count CAS
race caught it (394 of 400 increments stored). Serving every request that
writes (anything but GET, HEAD and OPTIONS) under one lock makes each check
atomic with its write, as the S3 API documents. Reads stay concurrent.
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


def serial(app):
    lock = threading.Lock()

    def serve(environ, start_response):
        if environ.get("REQUEST_METHOD", "GET") in READS:
            return app(environ, start_response)
        with lock:
            # The whole response is made under the lock: moto may do part
            # of the work while its body is iterated.
            body = app(environ, start_response)
            try:
                return list(body)
            finally:
                close = getattr(body, "close", None)
                if close is not None:
                    close()

    return serve


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    os.environ.setdefault("MOTO_PORT", str(port))
    app = DomainDispatcherApplication(create_backend_app)
    run_simple(
        host,
        port,
        serial(app),
        threaded=True,
        request_handler=MotoRequestHandler,
    )


if __name__ == "__main__":
    main()
