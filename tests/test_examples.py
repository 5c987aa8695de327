"""The examples run: each flow through its module's ``fs`` (embedded backend), and each
file as a script. What they print is checked byte for byte, and where it tells
something, so are the per-vertex states."""

from __future__ import annotations

import gc
import importlib.util
import itertools
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import pytest

from flowloom import (
    Context,
    FlowService,
    Request,
    RequestFailed,
    RequestStopped,
    Status,
    Workflow,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
WAIT = 10.0  # seconds to wait for any one result


def load(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` the way the CLI does: from its path."""
    spec = importlib.util.spec_from_file_location(
        f"flowloom_example_{name}", EXAMPLES / f"{name}.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def example(name: str) -> Iterator[ModuleType]:
    module = load(name)
    yield module
    module.fs.close()


@pytest.fixture(scope="module")
def myflow() -> Iterator[ModuleType]:
    yield from example("myflow")


@pytest.fixture(scope="module")
def kyc() -> Iterator[ModuleType]:
    yield from example("kyc")


@pytest.fixture(scope="module")
def publish() -> Iterator[ModuleType]:
    yield from example("publish")


@pytest.fixture(scope="module")
def checkout() -> Iterator[ModuleType]:
    yield from example("checkout")


def statuses(fs: FlowService, flow: str, request_id: str) -> dict[str, Status]:
    return {a: v.status for a, v in fs.state(flow, request_id).vertices.items()}


# -- every example module exposes an ``fs`` with its flows ---------------------------------

FLOWS = {
    "myflow": ["myflow"],
    "kyc": [
        "kyc",
        "kyc-branching",
        "kyc-conditional",
        "kyc-listed-users",
        "kyc-pass-fail",
        "kyc-subdag",
    ],
    "publish": ["publish"],
    "checkout": ["checkout"],
}


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_module_defines_fs_with_its_flows(name: str) -> None:
    module = load(name)
    try:
        assert isinstance(module.fs, FlowService)
        assert module.fs.embedded
        assert module.fs.flows() == FLOWS[name]
        for flow in FLOWS[name]:
            json.dumps(module.fs.definition(flow))  # the export the dashboard and CLI read
    finally:
        module.fs.close()


def test_every_example_file_is_covered() -> None:
    assert sorted(p.stem for p in EXAMPLES.glob("*.py")) == sorted(FLOWS)


# -- myflow -------------------------------------------------------------------------------


def test_myflow(myflow: ModuleType) -> None:
    fs = myflow.fs
    request_id = fs.execute("myflow", Request(body=b"hallo"))
    assert fs.result("myflow", request_id, timeout=WAIT) == b'you said "hallo"'
    assert statuses(fs, "myflow", request_id) == {"test": Status.COMPLETED}


# -- the KYC flows ------------------------------------------------------------------------

REJECTED_U7 = b"u7: rejected (face-detect: fail)"
VERIFIED = b"u42: verified (face-detect: pass, face-match: pass)"
NO_MATCH = b"u13: rejected (face-detect: pass, face-match: fail)"
REVIEW_U7 = b"u7: rejected (face-detect: fail, create-user: review case RC-u7)"
LISTED = b"\n".join([NO_MATCH, VERIFIED, REVIEW_U7])  # one line per user, in user id order
KYC_RESULTS = {
    ("kyc", "u42"): b"u42: verified (face-detect: pass)",
    ("kyc", "u7"): b"u7: rejected (face-detect: fail)",
    ("kyc", "u13"): b"u13: verified (face-detect: pass)",  # only face-detect runs here
    ("kyc-branching", "u42"): VERIFIED,
    ("kyc-branching", "u7"): b"u7: rejected (face-detect: fail, face-match: fail)",
    ("kyc-branching", "u13"): NO_MATCH,
    ("kyc-subdag", "u42"): VERIFIED,
    ("kyc-subdag", "u7"): b"u7: rejected (face-detect: fail, face-match: fail)",
    ("kyc-subdag", "u13"): NO_MATCH,
    ("kyc-conditional", "u42"): VERIFIED,
    ("kyc-conditional", "u7"): b"u7: rejected (face-detect: fail)",
    ("kyc-conditional", "u13"): NO_MATCH,
    ("kyc-pass-fail", "u42"): VERIFIED,
    ("kyc-pass-fail", "u7"): REVIEW_U7,
    ("kyc-pass-fail", "u13"): NO_MATCH,
}


@pytest.mark.parametrize(("flow", "user"), sorted(KYC_RESULTS))
def test_kyc_result(kyc: ModuleType, flow: str, user: str) -> None:
    assert kyc.fs.run(flow, user.encode(), timeout=WAIT) == KYC_RESULTS[(flow, user)]


def test_kyc_three_steps_run_in_order(kyc: ModuleType) -> None:
    fs = kyc.fs
    request_id = fs.execute("kyc", b"u42")
    fs.result("kyc", request_id, timeout=WAIT)
    vertices = fs.state("kyc", request_id).vertices
    assert list(vertices) == ["get-kyc-image", "face-detect", "mark-profile"]
    steps = list(vertices.values())
    for before, after in itertools.pairwise(steps):
        assert before.ended is not None
        assert after.started is not None
        assert before.ended <= after.started


def test_kyc_branching_runs_both_checks_before_the_aggregator(kyc: ModuleType) -> None:
    fs = kyc.fs
    request_id = fs.execute("kyc-branching", b"u42")
    fs.result("kyc-branching", request_id, timeout=WAIT)
    vertices = fs.state("kyc-branching", request_id).vertices
    assert set(vertices) == {"get-kyc-image", "face-detect", "face-match", "mark-profile"}
    mark = vertices["mark-profile"]
    assert mark.started is not None
    for check in ("face-detect", "face-match"):
        ended = vertices[check].ended
        assert ended is not None
        assert ended <= mark.started


def test_kyc_subdag_vertices_are_addressed_inside_the_subdag(kyc: ModuleType) -> None:
    fs = kyc.fs
    request_id = fs.execute("kyc-subdag", b"u13")
    fs.result("kyc-subdag", request_id, timeout=WAIT)
    assert statuses(fs, "kyc-subdag", request_id) == {
        "get-image": Status.COMPLETED,
        "verify-image/verify-url": Status.COMPLETED,
        "verify-image/face-detect": Status.COMPLETED,
        "verify-image/face-match": Status.COMPLETED,
        "verify-image/generate-result": Status.COMPLETED,
        "mark-profile": Status.COMPLETED,
    }


def test_kyc_subdag_factory_is_reusable(kyc: ModuleType) -> None:
    first, second = kyc.kyc_image_validation_dag(), kyc.kyc_image_validation_dag()
    assert first is not second
    assert first.definition() == second.definition()


BRANCH = "verify-image/handle-face-detect-response"


def test_kyc_conditional_face_match_runs_only_when_face_detect_passes(kyc: ModuleType) -> None:
    fs = kyc.fs
    passing = fs.execute("kyc-conditional", b"u42")
    failing = fs.execute("kyc-conditional", b"u7")
    assert fs.result("kyc-conditional", passing, timeout=WAIT) == VERIFIED
    assert fs.result("kyc-conditional", failing, timeout=WAIT) == REJECTED_U7
    ran = statuses(fs, "kyc-conditional", passing)
    assert ran[f"{BRANCH}[pass]/face-match"] is Status.COMPLETED
    assert ran[BRANCH] is Status.COMPLETED
    skipped = statuses(fs, "kyc-conditional", failing)
    assert not any("face-match" in address for address in skipped)
    # picking no branch lets the flow go on past the conditional
    assert skipped[BRANCH] is Status.COMPLETED
    assert skipped["verify-image/generate-result"] is Status.COMPLETED
    assert skipped["mark-profile"] is Status.COMPLETED


def test_kyc_pass_fail_runs_exactly_one_branch(kyc: ModuleType) -> None:
    fs = kyc.fs
    passing = fs.execute("kyc-pass-fail", b"u42")
    failing = fs.execute("kyc-pass-fail", b"u7")
    fs.result("kyc-pass-fail", passing, timeout=WAIT)
    fs.result("kyc-pass-fail", failing, timeout=WAIT)
    passed = statuses(fs, "kyc-pass-fail", passing)
    failed = statuses(fs, "kyc-pass-fail", failing)
    assert passed[f"{BRANCH}[pass]/face-match"] is Status.COMPLETED
    assert f"{BRANCH}[fail]/create-user" not in passed
    assert failed[f"{BRANCH}[fail]/create-user"] is Status.COMPLETED
    assert f"{BRANCH}[pass]/face-match" not in failed


def test_kyc_listed_users_verifies_each_user_in_its_own_branch(kyc: ModuleType) -> None:
    fs = kyc.fs
    request_id = fs.execute("kyc-listed-users", b"fraud-watch")
    assert fs.result("kyc-listed-users", request_id, timeout=WAIT) == LISTED
    vertices = statuses(fs, "kyc-listed-users", request_id)
    expected = {"get-users": Status.COMPLETED, "for-each-user-verify": Status.COMPLETED}
    branch_taken = {
        "u42": "[pass]/face-match",
        "u13": "[pass]/face-match",
        "u7": "[fail]/create-user",
    }
    for user, taken in branch_taken.items():
        item = f"for-each-user-verify[{user}]/verify-image"
        for step in ("verify-url", "face-detect", "handle-face-detect-response", "generate-result"):
            expected[f"{item}/{step}"] = Status.COMPLETED
        expected[f"{item}/handle-face-detect-response{taken}"] = Status.COMPLETED
        expected[f"for-each-user-verify[{user}]/mark-profile"] = Status.COMPLETED
    # one instance per user, each with its own address; face-match ran for u42 and u13 only
    assert vertices == expected
    assert vertices["for-each-user-verify[u42]/verify-image/face-detect"] is Status.COMPLETED
    assert sum(a.endswith("/mark-profile") for a in vertices) == 3
    assert sum(a.endswith("/face-match") for a in vertices) == 2


def test_kyc_listed_users_with_an_empty_list_runs_no_iteration(kyc: ModuleType) -> None:
    fs = kyc.fs
    request_id = fs.execute("kyc-listed-users", b"empty")
    assert fs.result("kyc-listed-users", request_id, timeout=WAIT) == b"no users listed"
    assert statuses(fs, "kyc-listed-users", request_id) == {
        "get-users": Status.COMPLETED,
        "for-each-user-verify": Status.COMPLETED,
    }


def test_kyc_unknown_user_fails_at_the_first_step(kyc: ModuleType) -> None:
    fs = kyc.fs
    request_id = fs.execute("kyc-subdag", b"u99")
    with pytest.raises(RequestFailed) as caught:
        fs.result("kyc-subdag", request_id, timeout=WAIT)
    error = caught.value.error
    assert error is not None
    assert (error.vertex, error.type) == ("get-image", "LookupError")
    assert error.message == "no KYC image on file for user 'u99'"
    state = fs.state("kyc-subdag", request_id)
    assert state.status is Status.FAILED
    assert {a: v.status for a, v in state.vertices.items()} == {"get-image": Status.FAILED}
    assert fs.run("kyc-subdag", b"u42", timeout=WAIT) == VERIFIED  # the worker goes on


# -- publish: piped handlers, async handler, forwarder, ordering-only edge ------------------


def test_publish_pipes_forwards_and_waits_for_the_spellcheck(publish: ModuleType) -> None:
    fs = publish.fs
    request_id = fs.execute("publish", b"  flowloom runs   workflows.  it runs them on   workers. ")
    assert fs.result("publish", request_id, timeout=WAIT) == (
        b"published <p>Flowloom runs workflows. It runs them on workers.</p>"
    )
    vertices = fs.state("publish", request_id).vertices
    assert {a: v.status for a, v in vertices.items()} == dict.fromkeys(
        ["tidy", "spellcheck", "render", "publish"], Status.COMPLETED
    )
    spellcheck_ended, publish_started = vertices["spellcheck"].ended, vertices["publish"].started
    assert spellcheck_ended is not None
    assert publish_started is not None
    assert spellcheck_ended <= publish_started


def test_publish_handlers_in_isolation(publish: ModuleType) -> None:
    assert publish.words_of(b"Flowloom runs. It runs!") == b'["flowloom", "runs", "it", "runs"]'
    assert publish.spellcheck(b'["flowloom", "runs"]', {}) == b"2 words, all known"


def test_publish_fails_on_unknown_words_and_does_not_publish(publish: ModuleType) -> None:
    fs = publish.fs
    request_id = fs.execute("publish", b"flowloom runs workflowz")
    with pytest.raises(RequestFailed) as caught:
        fs.result("publish", request_id, timeout=WAIT)
    error = caught.value.error
    assert error is not None
    assert (error.vertex, error.type, error.message) == (
        "spellcheck",
        "ValueError",
        "unknown words: workflowz",
    )
    assert "publish" not in fs.state("publish", request_id).vertices


# -- checkout: retries, timeout + on_failure, hooks, context, pause/resume/stop -------------

CONFIRMED = (
    "{order} confirmed ({reservation}): charged on attempt 3, "
    "flat-rate shipping 4.90 (quote failed: TimeoutError)"
)


def confirmed(number: int) -> bytes:
    return CONFIRMED.format(order=f"order-{number}", reservation=f"R-{number}").encode()


def test_checkout_retries_and_falls_back(checkout: ModuleType) -> None:
    fs = checkout.fs
    request_id = fs.execute("checkout", b"order-1001: 3 x widget")
    assert fs.result("checkout", request_id, timeout=WAIT) == confirmed(1001)
    vertices = fs.state("checkout", request_id).vertices
    charge, quote = vertices["charge-card"], vertices["quote-shipping"]
    assert (charge.status, charge.attempts, charge.error) == (Status.COMPLETED, 3, None)
    assert (quote.status, quote.attempts) == (Status.COMPLETED, 1)
    assert checkout.journal(request_id) == ["ended completed"]


def test_checkout_declined_card_fails_and_runs_the_hooks(checkout: ModuleType) -> None:
    fs = checkout.fs
    declined = Request(body=b"order-1002: 1 x gizmo", query={"card": "declined"})
    request_id = fs.execute("checkout", declined)
    with pytest.raises(RequestFailed) as caught:
        fs.result("checkout", request_id, timeout=WAIT)
    error = caught.value.error
    assert error is not None
    assert (error.vertex, error.type, error.message) == (
        "charge-card",
        "PermissionError",
        "card declined",
    )
    state = fs.state("checkout", request_id)
    assert state.status is Status.FAILED
    assert (state.vertices["charge-card"].status, state.vertices["charge-card"].attempts) == (
        Status.FAILED,
        4,
    )
    assert "confirm" not in state.vertices
    assert checkout.journal(request_id) == [
        "alert: charge-card failed: PermissionError: card declined",
        "released R-1002",
        "ended failed",
    ]


def test_checkout_context_is_per_request(checkout: ModuleType) -> None:
    fs = checkout.fs
    numbers = range(2001, 2013)
    with ThreadPoolExecutor(len(numbers)) as pool:
        ids = list(pool.map(lambda n: fs.execute("checkout", f"order-{n}: 1 x cog"), numbers))
        results = list(pool.map(lambda i: fs.result("checkout", i, timeout=WAIT), ids))
    # every request counted its own charge attempts and kept its own reservation
    assert results == [confirmed(n) for n in numbers]


def test_checkout_pause_holds_and_resume_goes_on(checkout: ModuleType) -> None:
    fs = checkout.fs
    request_id = fs.execute("checkout", b"order-1003: 2 x sprocket")
    assert fs.pause("checkout", request_id) is Status.PAUSED
    time.sleep(0.5)  # long enough for the whole flow, were it not paused
    state = fs.state("checkout", request_id)
    assert state.status is Status.PAUSED
    assert "confirm" not in state.vertices
    assert fs.resume("checkout", request_id) is Status.RUNNING
    assert fs.result("checkout", request_id, timeout=WAIT) == confirmed(1003)
    assert fs.state("checkout", request_id).status is Status.COMPLETED


def test_checkout_stop_ends_the_request_and_runs_the_hooks(checkout: ModuleType) -> None:
    fs = checkout.fs
    request_id = fs.execute("checkout", b"order-1004: 5 x cog")
    deadline = time.monotonic() + WAIT
    while "reserve-stock" not in checkout.completed(request_id):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert fs.stop("checkout", request_id) is Status.STOPPED
    with pytest.raises(RequestStopped):
        fs.result("checkout", request_id, timeout=WAIT)
    assert fs.state("checkout", request_id).status is Status.STOPPED
    assert checkout.journal(request_id) == ["released R-1004", "ended stopped"]


# -- every example as a script ------------------------------------------------------------

ID = "<id>"  # a request id, in the expected lines
SCRIPT_OUTPUT = {
    "myflow": ['you said "hallo"'],
    "kyc": [
        f"{flow} {user} -> {KYC_RESULTS[(flow, user)].decode()}"
        for flow in ("kyc", "kyc-branching", "kyc-subdag", "kyc-conditional", "kyc-pass-fail")
        for user in ("u42", "u7", "u13")
    ]
    + [
        "kyc-listed-users fraud-watch ->",
        *LISTED.decode().splitlines(),
    ],
    "publish": [
        "published <p>Flowloom runs workflows. It runs them on workers.</p>",
        f"not published: request {ID} failed at spellcheck: ValueError: unknown words: workflowz",
    ],
    "checkout": [
        confirmed(1001).decode(),
        "charge-card: completed, 3 attempts",
        "hooks: ['ended completed']",
        f"failed: request {ID} failed at charge-card: PermissionError: card declined",
        "hooks: ['alert: charge-card failed: PermissionError: card declined', "
        "'released R-1002', 'ended failed']",
        "paused: paused, state: paused",
        "resumed: running",
        confirmed(1003).decode(),
        "stopped: stopped",
        f"no result: request {ID} was stopped",
        "hooks: ['released R-1004', 'ended stopped']",
    ],
}


@pytest.mark.parametrize("name", sorted(SCRIPT_OUTPUT))
def test_example_runs_as_a_script(name: str) -> None:
    done = subprocess.run(
        [sys.executable, "-X", "dev", str(EXAMPLES / f"{name}.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert len(lines) == len(SCRIPT_OUTPUT[name]), done.stdout
    for line, expected in zip(lines, SCRIPT_OUTPUT[name], strict=True):
        assert re.fullmatch(re.escape(expected).replace(ID, "[0-9a-f]{32}"), line), line


# -- every example through the CLI --------------------------------------------------------

CLI = [sys.executable, "-c", "from flowloom.cli import main; main()"]
CLI_RUNS = [
    ("myflow", "myflow", "hallo", 'you said "hallo"'),
    ("kyc", "kyc", "u7", "u7: rejected (face-detect: fail)"),
    ("kyc", "kyc-subdag", "u42", VERIFIED.decode()),
    ("kyc", "kyc-listed-users", "fraud-watch", LISTED.decode()),
    ("publish", "publish", "flowloom  runs", "published <p>Flowloom runs</p>"),
    ("checkout", "checkout", "order-1001: 3 x widget", confirmed(1001).decode()),
]


@pytest.mark.parametrize(("name", "flow", "data", "expected"), CLI_RUNS)
def test_cli_runs_the_example(name: str, flow: str, data: str, expected: str) -> None:
    done = subprocess.run(
        [*CLI, "run", str(EXAMPLES / f"{name}.py"), flow, "--data", data],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, expected + "\n", "")


def test_cli_reports_a_failed_request() -> None:
    checkout = str(EXAMPLES / "checkout.py")
    done = subprocess.run(
        [*CLI, "run", checkout, "checkout", "-d", "order-9: 1 x cog", "-q", "card=declined"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert done.stdout == ""
    assert "failed at charge-card: PermissionError: card declined" in done.stderr


# -- core bugs found while writing the examples -------------------------------------------
# An async handler with a timeout leaked an event loop per attempt (a fresh Caller was never
# closed), and close() dropped the queued hooks of finished requests; these guard the fixes.


def test_async_handler_with_a_timeout_closes_its_event_loop(
    publish: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    def define(workflow: Workflow, context: Context) -> None:
        workflow.dag.node("tidy", publish.capitalize_sentences, timeout=5.0)

    unraisable: list[sys.UnraisableHookArgs] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with FlowService() as fs:
        fs.register("tidy", define)
        assert fs.run("tidy", b"one. two.", timeout=WAIT) == b"One. Two."
    for thread in threading.enumerate():
        if thread.name == "flowloom-timed-handler":
            thread.join(WAIT)
    gc.collect()
    assert [repr(u.exc_value) for u in unraisable] == []


def test_close_runs_the_hooks_of_a_completed_request() -> None:
    ran: list[Status] = []
    fs = FlowService(worker_concurrency=1)

    def define_quick(workflow: Workflow, context: Context) -> None:
        def step(data: bytes, options: dict[str, list[str]]) -> bytes:
            fs.execute("slow", b"")  # queued ahead of this request's hooks
            return data

        workflow.dag.node("step", step)
        workflow.finally_(ran.append)

    def define_slow(workflow: Workflow, context: Context) -> None:
        workflow.dag.node("sleep", lambda data, options: time.sleep(0.5))

    fs.register("quick", define_quick)
    fs.register("slow", define_slow)
    assert fs.run("quick", b"done", timeout=WAIT) == b"done"
    fs.close()  # the only worker thread is in the slow step: it finishes it, then stops
    assert ran == [Status.COMPLETED]
