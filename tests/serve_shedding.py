"""``aligndistil serve`` that answers 429 to ``POST /v1/score`` for a while, for the tests of
several teacher servers: the real server process and app, with one HTTP middleware added.

``python tests/serve_shedding.py SECONDS [serve flags...]``: from its first score request on,
the server sheds every score request for SECONDS seconds (429 with ``Retry-After: 1``, in the
server's own error shape), then serves normally. Everything else is ``aligndistil serve``.
"""

from __future__ import annotations

import sys
import time

from fastapi.responses import JSONResponse

import teacher_service.server as server
from aligndistil.cli import main


def shedding(seconds: float):
    began: list[float] = []

    async def middleware(request, call_next):
        if request.url.path == "/v1/score":
            began or began.append(time.monotonic())
            if time.monotonic() - began[0] < seconds:
                return JSONResponse({"error": {"type": "overloaded",
                                               "message": "shedding load (test)"}},
                                    status_code=429, headers={"Retry-After": "1"})
        return await call_next(request)

    return middleware


if __name__ == "__main__":
    seconds = float(sys.argv[1])
    create_app = server.create_app

    def create_shedding_app(*args, **kwargs):
        app = create_app(*args, **kwargs)
        app.middleware("http")(shedding(seconds))
        return app

    server.create_app = create_shedding_app  # run_serve looks it up when it runs
    sys.exit(main(["serve", *sys.argv[2:]]))
