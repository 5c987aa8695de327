"""The HTTP API: run, watch and control flows over HTTP (a Starlette app served by
uvicorn). See docs/http.md.

    app       create_app: the Starlette app, its routes built from the endpoint table
    endpoints the endpoint table: each endpoint's route and OpenAPI description, once
    routes     the endpoints of the API          spec       the OpenAPI document
    shapes     the JSON bodies, declared once    responses  the answers built from them
    api        what each endpoint works with     waiting    waiting for requests to end
    callbacks  POSTing final answers             auth       bearer token and signatures
    inputs     checks of what callers send       settings   the app's settings
    server     serve: uvicorn until SIGINT/SIGTERM

Every ``FlowService`` call blocks, so it runs on a worker thread, never on the event
loop; waiting for a result holds no thread for long (see ``waiting``).
"""

from .app import create_app
from .server import serve

__all__ = ["create_app", "serve"]
