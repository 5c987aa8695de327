"""The KYC flows of GoFlow's README, ported to flowloom.

Validate a user's KYC (know-your-customer) image and mark their profile:

    kyc                  get-kyc-image -> face-detect -> mark-profile
    kyc-branching        face-detect and face-match in parallel, merged by an aggregator
    kyc-subdag           the validation steps as a reusable sub-DAG, ``kyc_image_validation_dag``
    kyc-conditional      face-match only when face-detect passes (one conditional branch)
    kyc-pass-fail        face-match on "pass", create-user on "fail" (two branches)
    kyc-listed-users     foreach listed user: verify the image (the pass/fail sub-DAG), mark
                         the profile: a conditional inside a sub-DAG inside a foreach

The body of a request is a user id (``u42``); for ``kyc-listed-users`` it is the
name of a watch list (``fraud-watch``). The handlers are stand-ins: they look the
user and the image up in the dictionaries below instead of calling S3 or a face
recognition service, so every run gives the same answer.

    python examples/kyc.py
    flowloom run examples/kyc.py kyc-subdag --data u42
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from flowloom import Context, Dag, FlowService, Workflow

Options = dict[str, list[str]]
Record = dict[str, Any]

# -- stand-in data: who is on file, what each stored image shows --------------------------

PROFILES = {  # user id -> the face on file for that user
    "u42": {"name": "Ada", "face": "face-of-ada"},
    "u7": {"name": "Bob", "face": "face-of-bob"},
    "u13": {"name": "Eve", "face": "face-of-eve"},
}
IMAGE_STORE = {  # image file -> the face it shows (None: no face can be seen)
    "u42.jpg": "face-of-ada",  # clear picture of Ada: passes
    "u7.jpg": None,  # blurry: no face detected
    "u13.jpg": "face-of-mallory",  # a face, but not Eve's: no match
}
WATCH_LISTS = {"fraud-watch": ["u42", "u7", "u13"], "empty": []}


def _load(data: bytes) -> Record:
    record: Record = json.loads(data)
    return record


def _dump(record: Record) -> bytes:
    return json.dumps(record).encode()


def _image_file(record: Record) -> str:
    return str(record["image"]).split("?")[0].rsplit("/", 1)[-1]


def presigned_url(user: str) -> str:
    signature = hashlib.sha256(f"kyc-bucket/{user}.jpg".encode()).hexdigest()[:12]
    return f"https://kyc-bucket.example/{user}.jpg?signature={signature}"


def status_of(steps: dict[str, str]) -> str:
    """``success`` when face-detect ran and every face check that ran passed."""
    checks = [steps[name] for name in ("face-detect", "face-match") if name in steps]
    return "success" if "face-detect" in steps and all(c == "pass" for c in checks) else "failure"


# -- the handlers: (data, options) -> bytes -------------------------------------------------


def get_presigned_url_for_image(data: bytes, options: Options) -> bytes:
    user = data.decode().strip()
    if user not in PROFILES:
        raise LookupError(f"no KYC image on file for user {user!r}")
    return _dump({"user": user, "image": presigned_url(user), "steps": {}})


def s3_doc_exists(data: bytes, options: Options) -> bytes:
    record = _load(data)
    if _image_file(record) not in IMAGE_STORE:
        raise FileNotFoundError(f"{record['image']} does not exist")
    return data


def detect_face(data: bytes, options: Options) -> bytes:
    record = _load(data)
    face = IMAGE_STORE[_image_file(record)]
    record["steps"]["face-detect"] = "pass" if face else "fail"
    return _dump(record)


def match_face(data: bytes, options: Options) -> bytes:
    record = _load(data)
    face = IMAGE_STORE[_image_file(record)]
    on_file = PROFILES[record["user"]]["face"]
    record["steps"]["face-match"] = "pass" if face == on_file else "fail"
    return _dump(record)


def create_user(data: bytes, options: Options) -> bytes:
    record = _load(data)
    record["steps"]["create-user"] = f"review case RC-{record['user']}"
    return _dump(record)


def generate_result(data: bytes, options: Options) -> bytes:
    record = _load(data)
    record["status"] = status_of(record["steps"])
    return _dump(record)


def mark_profile_based_on_status(data: bytes, options: Options) -> bytes:
    record = _load(data)
    status = record.get("status") or status_of(record["steps"])
    mark = "verified" if status == "success" else "rejected"
    steps = ", ".join(f"{name}: {outcome}" for name, outcome in record["steps"].items())
    return f"{record['user']}: {mark} ({steps})".encode()


def validate_results(responses: dict[str, bytes]) -> bytes:
    """Aggregator: merge the face-detect and face-match records into one, with a status."""
    detected, matched = _load(responses["face-detect"]), _load(responses["face-match"])
    steps = {**detected["steps"], **matched["steps"]}
    return _dump({**detected, "steps": steps, "status": status_of(steps)})


# -- the flows ------------------------------------------------------------------------------


def define_kyc(workflow: Workflow, context: Context) -> None:
    """Multi nodes: three steps, one after the other."""
    dag = workflow.dag
    dag.node("get-kyc-image", get_presigned_url_for_image)
    dag.node("face-detect", detect_face)
    dag.node("mark-profile", mark_profile_based_on_status)
    dag.edge("get-kyc-image", "face-detect")
    dag.edge("face-detect", "mark-profile")


def define_kyc_branching(workflow: Workflow, context: Context) -> None:
    """Branching: face-detect and face-match run in parallel; an aggregator merges them."""
    dag = workflow.dag
    dag.node("get-kyc-image", get_presigned_url_for_image)
    dag.node("face-detect", detect_face)
    dag.node("face-match", match_face)
    # mark-profile depends on face-detect and face-match: the aggregator gets both
    # outputs, keyed by parent name, and makes one input of them.
    dag.node("mark-profile", mark_profile_based_on_status, aggregator=validate_results)
    dag.edge("get-kyc-image", "face-detect")
    dag.edge("get-kyc-image", "face-match")
    dag.edge("face-detect", "mark-profile")
    dag.edge("face-match", "mark-profile")


def kyc_image_validation_dag() -> Dag:
    """The validation steps as a DAG of their own, to embed with ``dag.subdag``."""
    dag = Dag()
    dag.node("verify-url", s3_doc_exists)
    dag.node("face-detect", detect_face)
    dag.node("face-match", match_face)
    dag.node("generate-result", generate_result, aggregator=validate_results)
    dag.edge("verify-url", "face-detect")
    dag.edge("verify-url", "face-match")
    dag.edge("face-detect", "generate-result")
    dag.edge("face-match", "generate-result")
    return dag


def define_kyc_subdag(workflow: Workflow, context: Context) -> None:
    """Subdag: the flow embeds the shared validation DAG as the vertex verify-image."""
    dag = workflow.dag
    dag.node("get-image", get_presigned_url_for_image)
    dag.subdag("verify-image", kyc_image_validation_dag)
    dag.node("mark-profile", mark_profile_based_on_status)
    dag.edge("get-image", "verify-image")
    dag.edge("verify-image", "mark-profile")


def face_detect_passed(data: bytes) -> list[str]:
    """Condition: pick the "pass" branch only when face-detect passed."""
    return ["pass"] if _load(data)["steps"]["face-detect"] == "pass" else []


def face_detect_outcome(data: bytes) -> list[str]:
    """Condition: pick "pass" or "fail" after face-detect's outcome."""
    return [_load(data)["steps"]["face-detect"]]


def kyc_conditional_validation_dag() -> Dag:
    """Conditional branching with one branch: face-match happens only when face-detect
    passes; otherwise the flow goes on to generate-result with face-detect's output."""
    dag = Dag()
    dag.node("verify-url", s3_doc_exists)
    dag.node("face-detect", detect_face)
    branches = dag.conditional_branch("handle-face-detect-response", ["pass"], face_detect_passed)
    branches["pass"].node("face-match", match_face)
    dag.node("generate-result", generate_result)
    dag.edge("verify-url", "face-detect")
    dag.edge("face-detect", "handle-face-detect-response")
    dag.edge("handle-face-detect-response", "generate-result")
    return dag


def kyc_pass_fail_validation_dag() -> Dag:
    """Conditional branching with two branches: face-match on "pass", create-user on "fail"."""
    dag = Dag()
    dag.node("verify-url", s3_doc_exists)
    dag.node("face-detect", detect_face)
    branches = dag.conditional_branch(
        "handle-face-detect-response", ["pass", "fail"], face_detect_outcome
    )
    branches["pass"].node("face-match", match_face)
    branches["fail"].node("create-user", create_user)
    dag.node("generate-result", generate_result)
    dag.edge("verify-url", "face-detect")
    dag.edge("face-detect", "handle-face-detect-response")
    dag.edge("handle-face-detect-response", "generate-result")
    return dag


def define_kyc_conditional(workflow: Workflow, context: Context) -> None:
    dag = workflow.dag
    dag.node("get-image", get_presigned_url_for_image)
    dag.subdag("verify-image", kyc_conditional_validation_dag)
    dag.node("mark-profile", mark_profile_based_on_status)
    dag.edge("get-image", "verify-image")
    dag.edge("verify-image", "mark-profile")


def define_kyc_pass_fail(workflow: Workflow, context: Context) -> None:
    dag = workflow.dag
    dag.node("get-image", get_presigned_url_for_image)
    dag.subdag("verify-image", kyc_pass_fail_validation_dag)
    dag.node("mark-profile", mark_profile_based_on_status)
    dag.edge("get-image", "verify-image")
    dag.edge("verify-image", "mark-profile")


def get_listed_users(data: bytes, options: Options) -> bytes:
    users = WATCH_LISTS[data.decode().strip()]
    return json.dumps([{"user": u, "image": presigned_url(u), "steps": {}} for u in users]).encode()


def each_user(data: bytes) -> dict[str, bytes]:
    """Foreach: one item per listed user, keyed by user id, holding their KYC record."""
    return {user["user"]: _dump(user) for user in json.loads(data)}


def summarize(marks: dict[str, bytes]) -> bytes:
    """Aggregator of the foreach: one line per user, in user id order."""
    return b"\n".join(marks[user] for user in sorted(marks)) or b"no users listed"


def define_kyc_listed_users(workflow: Workflow, context: Context) -> None:
    """Foreach branching: verify every user of a watch list, each in its own branch.

    Each item runs the pass/fail validation sub-DAG (the last version of GoFlow's
    ``KycImageValidationDag``), so its vertices have addresses such as
    ``for-each-user-verify[u42]/verify-image/handle-face-detect-response[pass]/face-match``.
    """
    dag = workflow.dag
    dag.node("get-users", get_listed_users)
    verify_dag = dag.foreach_branch("for-each-user-verify", each_user, aggregator=summarize)
    verify_dag.subdag("verify-image", kyc_pass_fail_validation_dag)
    verify_dag.node("mark-profile", mark_profile_based_on_status)
    verify_dag.edge("verify-image", "mark-profile")
    dag.edge("get-users", "for-each-user-verify")


fs = FlowService()
fs.register("kyc", define_kyc)
fs.register("kyc-branching", define_kyc_branching)
fs.register("kyc-subdag", define_kyc_subdag)
fs.register("kyc-conditional", define_kyc_conditional)
fs.register("kyc-pass-fail", define_kyc_pass_fail)
fs.register("kyc-listed-users", define_kyc_listed_users)


if __name__ == "__main__":
    with fs:
        for flow in ("kyc", "kyc-branching", "kyc-subdag", "kyc-conditional", "kyc-pass-fail"):
            for user in ("u42", "u7", "u13"):
                print(f"{flow} {user} -> {fs.run(flow, user, timeout=10).decode()}")
        print("kyc-listed-users fraud-watch ->")
        print(fs.run("kyc-listed-users", b"fraud-watch", timeout=10).decode())
