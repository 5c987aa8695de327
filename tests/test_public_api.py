import importlib
import pkgutil

import flowloom


def test_all_names_exist_and_are_exported():
    for name in flowloom.__all__:
        assert hasattr(flowloom, name), name
    public = {n for n in vars(flowloom) if not n.startswith("_")}
    submodules = {m.name for m in pkgutil.iter_modules(flowloom.__path__)}
    assert public - submodules == set(flowloom.__all__) - {"__version__"}


def test_design_names_are_public():
    for name in ["Context", "Dag", "FlowService", "Request", "Workflow", "Status"]:
        assert name in flowloom.__all__


def test_every_module_declares_all():
    for info in pkgutil.walk_packages(flowloom.__path__, "flowloom."):
        if info.name in ("flowloom.http",):  # optional dependencies may be missing
            continue
        module = importlib.import_module(info.name)
        assert isinstance(getattr(module, "__all__", None), list), info.name


def test_status_is_a_str_enum():
    assert flowloom.Status.COMPLETED == "completed"
    assert [s.value for s in flowloom.Status] == [
        "queued",
        "running",
        "paused",
        "completed",
        "failed",
        "stopped",
    ]
