"""The dashboard's server side: progress per vertex (pure), the endpoints it reads, the
page and its assets, and the login that keeps the token out of URLs."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from importlib import resources

import anyio
import httpx
import pytest
from starlette.datastructures import Headers

from flowloom import Dag, FlowService, Request, Status, VertexState
from flowloom.dashboard import COOKIE, has_session, session_cookie
from flowloom.http import create_app
from flowloom.progress import foreach_paths, instances, progress, vertex_path
from flowloom.types import RequestState
from http_fixtures import BACKENDS, make_service

TOKEN = "s3cret-token"


class AppClient:
    """A blocking client of an ASGI app (each call one ``anyio.run``), keeping cookies."""

    def __init__(self, app: object) -> None:
        self.app = app
        self.cookies = httpx.Cookies()

    def request(self, method: str, path: str, **options: object) -> httpx.Response:
        async def call() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)  # type: ignore[arg-type]
            async with httpx.AsyncClient(
                transport=transport, base_url="http://flowloom", cookies=self.cookies
            ) as http:
                answer = await http.request(method, path, **options)  # type: ignore[arg-type]
                self.cookies = http.cookies
                return answer

        return anyio.run(call)

    def get(self, path: str, **options: object) -> httpx.Response:
        return self.request("GET", path, **options)

    def post(self, path: str, **options: object) -> httpx.Response:
        return self.request("POST", path, **options)

    def __enter__(self) -> AppClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


# -- progress per vertex (pure) -----------------------------------------------------------------
def test_vertex_path_strips_foreach_keys_and_keeps_branch_keys() -> None:
    foreach = frozenset({"users", "users[]/verify/docs"})
    assert vertex_path("users[u42]/verify/check", foreach) == "users[]/verify/check"
    assert vertex_path("users[u%2F1]/verify/docs[d7]/scan", foreach) == (
        "users[]/verify/docs[]/scan"
    )
    assert vertex_path("route[express]/courier", foreach) == "route[express]/courier"
    assert vertex_path("users", foreach) == "users"
    assert vertex_path("users[u1]/route[fail]/x", foreach) == "users[]/route[fail]/x"
    assert vertex_path("odd]]address", foreach) == "odd]]address"


def _definition() -> dict[str, object]:
    inner = Dag()
    inner.node("check", lambda d, o: d)
    sub = Dag()
    sub.node("scan", lambda d, o: d)
    fs = FlowService()

    def define(wf, ctx):  # type: ignore[no-untyped-def]
        wf.dag.node("start", lambda d, o: d)
        each = wf.dag.foreach_branch("users", lambda d: {})
        each.subdag("verify", inner)
        branches = wf.dag.conditional_branch("route", ["a", "b"], lambda d: ["a"])
        branches["a"].foreach_branch("docs", lambda d: {}).subdag("s", sub)
        branches["b"].node("skip", lambda d, o: d)
        wf.dag.edge("start", "users")
        wf.dag.edge("users", "route")

    fs.register("f", define)
    definition = dict(fs.definition("f"))
    fs.close()
    return definition


def test_foreach_paths_are_found_at_any_depth() -> None:
    assert foreach_paths(_definition()) == {"users", "route[a]/docs"}


def _state(vertices: list[VertexState]) -> RequestState:
    return RequestState("r1", "f", Status.RUNNING, 100.0, vertices={v.address: v for v in vertices})


def test_progress_counts_instances_per_vertex() -> None:
    vertices = [VertexState("start", Status.COMPLETED, 100.0, 101.0, 1)]
    for n in range(1000):
        status = Status.FAILED if n < 3 else Status.RUNNING if n < 13 else Status.COMPLETED
        ended = None if status is Status.RUNNING else 102.0 + n
        vertices.append(
            VertexState(f"users[u{n}]/verify/check", status, 101.0 + n / 1000, ended, 1 + (n < 3))
        )
    found = {p.vertex: p for p in progress(_state(vertices), frozenset({"users"}))}
    assert set(found) == {"start", "users[]/verify/check"}
    check = found["users[]/verify/check"]
    assert check.instances == 1000
    assert check.counts == {"failed": 3, "running": 10, "completed": 987}
    assert check.started == 101.0
    assert check.ended == 102.0 + 999
    assert check.attempts == 1003
    assert check.to_json()["counts"]["completed"] == 987


def test_instances_of_a_vertex_are_filtered_and_ordered_by_start() -> None:
    vertices = [
        VertexState("users[b]/check", Status.COMPLETED, 5.0, 6.0, 1),
        VertexState("users[a]/check", Status.FAILED, 3.0, 4.0, 2),
        VertexState("users[c]/check", Status.QUEUED),
        VertexState("users", Status.RUNNING, 1.0),
    ]
    state = _state(vertices)
    found = instances(state, frozenset({"users"}), "users[]/check")
    assert [v.address for v in found] == ["users[a]/check", "users[b]/check", "users[c]/check"]
    failed = instances(state, frozenset({"users"}), "users[]/check", Status.FAILED)
    assert [v.address for v in failed] == ["users[a]/check"]
    assert instances(state, frozenset({"users"}), "nothing") == []


# -- the endpoints ---------------------------------------------------------------------------
def _fanout(wf, ctx):  # type: ignore[no-untyped-def]
    def items(data: bytes) -> dict[str, bytes]:
        return {f"i{n}": b"%d" % n for n in range(int(data))}

    def check(data: bytes, options: dict[str, list[str]]) -> bytes:
        if data == b"7":
            raise ValueError("seven is not allowed")
        return data

    wf.dag.node("start", lambda d, o: d)
    each = wf.dag.foreach_branch("items", items, aggregator=lambda r: b"%d" % len(r))
    each.node("check", check)
    wf.dag.edge("start", "items")


@pytest.fixture(params=BACKENDS)
def client(request: pytest.FixtureRequest) -> Iterator[tuple[FlowService, AppClient]]:
    with make_service(request.param, enable_monitoring=True) as fs:
        fs.register("fanout", _fanout)
        fs.register("myflow", lambda wf, ctx: wf.dag.node("test", lambda d, o: d))
        with AppClient(create_app(fs)) as http:
            yield fs, http


def _wait(fs: FlowService, flow: str, request_id: str) -> None:
    deadline = time.monotonic() + 30
    while not fs.state(flow, request_id).status.finished:
        assert time.monotonic() < deadline, "request did not finish"
        time.sleep(0.02)


def test_steps_summarise_a_foreach(client: tuple[FlowService, AppClient]) -> None:
    fs, http = client
    request_id = fs.execute("fanout", Request(body=b"20", request_id="fan-1"))
    _wait(fs, "fanout", request_id)
    answer = http.get("/flow/fanout/requests/fan-1/steps")
    assert answer.status_code == 200
    body = answer.json()
    assert body["status"] == "failed"
    assert body["error"]["vertex"] == "items[i7]/check"
    steps = {s["vertex"]: s for s in body["steps"]}
    assert steps["start"]["counts"] == {"completed": 1}
    check = steps["items[]/check"]
    assert check["counts"].get("failed") == 1
    assert check["instances"] == sum(check["counts"].values())
    assert "vertices" not in body
    assert answer.headers["x-request-status"] == "failed"


def test_instances_are_paged(client: tuple[FlowService, AppClient]) -> None:
    fs, http = client
    request_id = fs.execute("fanout", Request(body=b"5", request_id="fan-2"))
    _wait(fs, "fanout", request_id)
    first = http.get(
        "/flow/fanout/requests/fan-2/instances", params={"vertex": "items[]/check", "limit": 2}
    ).json()
    assert first["total"] == 5
    assert first["next_offset"] == 2
    assert len(first["instances"]) == 2
    rest = http.get(
        "/flow/fanout/requests/fan-2/instances",
        params={"vertex": "items[]/check", "offset": 2, "limit": 10},
    ).json()
    assert rest["next_offset"] is None
    seen = [v["address"] for v in first["instances"] + rest["instances"]]
    assert sorted(seen) == [f"items[i{n}]/check" for n in range(5)]
    done = http.get(
        "/flow/fanout/requests/fan-2/instances",
        params={"vertex": "items[]/check", "status": "completed"},
    ).json()
    assert done["total"] == 5


@pytest.mark.parametrize(
    "query",
    [
        {},
        {"vertex": ""},
        {"vertex": "x", "limit": "0"},
        {"vertex": "x", "status": "done"},
        {"vertex": "x", "surprise": "1"},
        {"vertex": "x" * 5000},
    ],
)
def test_bad_instance_queries_are_400(
    client: tuple[FlowService, AppClient], query: dict[str, str]
) -> None:
    fs, http = client
    fs.execute("myflow", Request(request_id="q-1"))
    answer = http.get("/flow/myflow/requests/q-1/instances", params=query)
    assert answer.status_code == 400, answer.text
    assert "error" in answer.json()


def test_unknown_requests_are_404(client: tuple[FlowService, AppClient]) -> None:
    _, http = client
    assert http.get("/flow/myflow/requests/nope/steps").status_code == 404
    assert http.get("/flow/nope/requests/nope/instances?vertex=x").status_code == 404


def test_requests_across_flows(client: tuple[FlowService, AppClient]) -> None:
    fs, http = client
    ids = [fs.execute("myflow", Request(request_id=f"all-{n}")) for n in range(3)]
    ids.append(fs.execute("fanout", Request(body=b"1", request_id="all-f")))
    for request_id, flow in zip(ids, ["myflow"] * 3 + ["fanout"], strict=True):
        _wait(fs, flow, request_id)
    page = http.get("/requests", params={"limit": 3}).json()
    assert page["flow"] is None
    assert [r["request_id"] for r in page["requests"]] == ["all-f", "all-2", "all-1"]
    assert page["next_offset"] == 3
    rest = http.get("/requests", params={"offset": 3}).json()
    assert [r["request_id"] for r in rest["requests"]] == ["all-0"]
    only = http.get("/requests", params={"flow": "fanout"}).json()
    assert [r["request_id"] for r in only["requests"]] == ["all-f"]
    completed = http.get("/requests", params={"status": "completed"}).json()
    assert {r["request_id"] for r in completed["requests"]} == {"all-f", "all-0", "all-1", "all-2"}
    assert http.get("/requests", params={"flow": "bad name"}).status_code == 400
    assert http.get("/requests", params={"flow": ""}).status_code == 400
    assert http.get("/requests", params={"page": "2"}).status_code == 400


def test_queue_depth_counts_tasks_held_by_a_paused_request(
    client: tuple[FlowService, AppClient],
) -> None:
    fs, http = client
    assert http.get("/queue").json() == {"ready": 0, "delayed": 0, "held": 0}
    gate = threading.Event()

    def wait(data: bytes, options: dict[str, list[str]]) -> bytes:
        assert gate.wait(20)
        return data

    def gated(wf, ctx):  # type: ignore[no-untyped-def]
        wf.dag.node("wait", wait).node("after", lambda d, o: d)
        wf.dag.edge("wait", "after")

    fs.register("gated", gated)
    request_id = fs.execute("gated", Request(request_id="q-depth"))
    deadline = time.monotonic() + 10
    while fs.state("gated", request_id).status is not Status.RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    fs.pause("gated", request_id)
    gate.set()  # "wait" ends; "after" is held
    _wait_held(fs)
    assert http.get("/queue").json() == {"ready": 0, "delayed": 0, "held": 1}
    fs.resume("gated", request_id)
    _wait(fs, "gated", request_id)
    assert http.get("/queue").json() == {"ready": 0, "delayed": 0, "held": 0}


def _wait_held(fs: FlowService) -> None:
    deadline = time.monotonic() + 10
    while not fs.backend.depth().get("held"):
        assert time.monotonic() < deadline, fs.backend.depth()
        time.sleep(0.02)


# -- the page, its assets, and the session ---------------------------------------------------
def test_the_dashboard_is_served_only_with_monitoring() -> None:
    with FlowService() as fs:
        assert AppClient(create_app(fs)).get("/dashboard").status_code == 404
        fs.enable_monitoring = True
        http = AppClient(create_app(fs))
        page = http.get("/dashboard")
        assert page.status_code == 200
        assert "/dashboard/static/app.js" in page.text
        csp = page.headers["content-security-policy"]
        assert "default-src 'self'" in csp
        assert "connect-src 'self'" in csp
        script = http.get("/dashboard/static/app.js")
        assert script.status_code == 200
        assert "javascript" in script.headers["content-type"]
        assert http.get("/dashboard/static/app.css").status_code == 200
        assert http.get("/dashboard/static/../dashboard.py").status_code == 404
        assert AppClient(create_app(fs, dashboard=False)).get("/dashboard").status_code == 404


def test_assets_ship_in_the_package_and_name_no_other_host() -> None:
    assets = resources.files("flowloom").joinpath("static", "dashboard")
    script = assets.joinpath("app.js").read_text()
    page = assets.joinpath("index.html").read_text()
    for text in (script, page, assets.joinpath("app.css").read_text()):
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
        assert "https://" not in text


def test_session_cookie_needs_the_dashboard_header_and_expires() -> None:
    cookie = session_cookie(TOKEN, now=1000.0)
    good = Headers({"cookie": f"{COOKIE}={cookie}", "x-flowloom-dashboard": "1"})
    assert has_session(good, TOKEN, now=1001.0)
    assert not has_session(good, "another-token", now=1001.0)
    assert not has_session(good, TOKEN, now=1000.0 + 13 * 3600)  # expired
    assert not has_session(Headers({"cookie": f"{COOKIE}={cookie}"}), TOKEN, now=1001.0)
    expires, _, signature = cookie.partition(".")
    forged = f"{int(expires) + 3600}.{signature}"
    assert not has_session(
        Headers({"cookie": f"{COOKIE}={forged}", "x-flowloom-dashboard": "1"}), TOKEN, now=1001.0
    )
    assert TOKEN not in cookie


def test_login_sets_a_session_that_the_api_accepts() -> None:
    with FlowService(token=TOKEN, enable_monitoring=True) as fs:
        fs.register("myflow", lambda wf, ctx: wf.dag.node("test", lambda d, o: d))
        http = AppClient(create_app(fs))
        dash = {"X-Flowloom-Dashboard": "1"}
        assert http.get("/dashboard").status_code == 200  # the page holds no data
        config = http.get("/dashboard/config", headers=dash).json()
        assert config == {"auth": True, "signed_in": False, "trace_url": None}
        assert http.get("/flows", headers=dash).status_code == 401
        wrong = http.post("/dashboard/login", data={"token": "guess"})
        assert wrong.status_code == 401
        assert COOKIE not in http.cookies
        assert http.post("/dashboard/login", content=b"{}").status_code == 400
        login = http.post("/dashboard/login", data={"token": TOKEN})
        assert login.status_code == 204
        set_cookie = login.headers["set-cookie"].lower()
        assert "httponly" in set_cookie
        assert "samesite=strict" in set_cookie
        assert TOKEN not in login.headers["set-cookie"]
        assert http.get("/flows", headers=dash).json() == {"flows": ["myflow"]}
        assert http.get("/dashboard/config", headers=dash).json()["signed_in"] is True
        assert http.get("/flows").status_code == 401  # a cookie alone is not enough
        assert http.post("/flow/myflow", content=b"x").status_code == 401
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert AppClient(create_app(fs)).get("/flows", headers=bearer).status_code == 200
        assert http.post("/dashboard/logout").status_code == 204
        assert http.get("/flows", headers=dash).status_code == 401


def test_trace_url_reaches_the_page_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWLOOM_TRACE_URL", "http://127.0.0.1:16686/trace/{trace_id}")
    with FlowService(enable_monitoring=True) as fs:
        config = AppClient(create_app(fs)).get("/dashboard/config").json()
    assert config == {
        "trace_url": "http://127.0.0.1:16686/trace/{trace_id}",
        "auth": False,
        "signed_in": True,
    }


@pytest.mark.parametrize(("options", "code"), [((), 200), (("--no-monitoring",), 404)])
def test_flowloom_serve_serves_the_dashboard_unless_told_not_to(
    options: tuple[str, ...], code: int
) -> None:
    from dashboard_fixtures import ROOT, serve

    with serve("embedded", app=ROOT / "examples" / "myflow.py", options=options) as server:
        assert server.call("GET", "/dashboard")[0] == code
        assert server.call("GET", "/flows")[0] == 200


def test_the_committed_assets_were_built_from_the_committed_sources() -> None:
    """``cd dashboard && npm ci && npm run build`` after changing dashboard/src."""
    import hashlib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "dashboard"
    names = sorted(p.relative_to(root).as_posix() for p in (root / "src").rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for name in [*names, "package-lock.json"]:
        digest.update(f"{name}\n".encode())
        digest.update((root / name).read_bytes())
    built = resources.files("flowloom").joinpath("static", "dashboard", "SOURCES.sha256")
    assert built.read_text().strip() == digest.hexdigest()


def test_no_dashboard_when_calls_must_be_signed_and_no_token_is_set() -> None:
    """The page cannot sign its calls with the HMAC secret; with a token it signs in."""
    with FlowService(hmac_secret="shared", enable_monitoring=True) as fs:
        assert AppClient(create_app(fs)).get("/dashboard").status_code == 404
    with FlowService(hmac_secret="shared", token=TOKEN, enable_monitoring=True) as fs:
        fs.register("myflow", lambda wf, ctx: wf.dag.node("test", lambda d, o: d))
        http = AppClient(create_app(fs))
        assert http.get("/dashboard").status_code == 200
        assert http.post("/dashboard/login", data={"token": TOKEN}).status_code == 204
        dash = {"X-Flowloom-Dashboard": "1"}
        assert http.get("/flows", headers=dash).json() == {"flows": ["myflow"]}
