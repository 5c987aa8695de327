"""The standard ``OTEL_*`` variables that set batching and export: a value the
OpenTelemetry SDK would refuse, or a word, NaN, zero, a negative or an endless number,
is ignored with a warning naming the variable (as the OpenTelemetry specification asks
of an invalid setting), and every span still arrives.

Before: ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE=8192`` (valid, and within flowloom's own queue)
or ``OTEL_BSP_MAX_QUEUE_SIZE=10`` made every traced service fail at its start with the
SDK's ``ValueError``, ``nan`` and ``inf`` with Python's; ``OTEL_EXPORTER_OTLP_TIMEOUT=abc``
crashed the exporter process at each restart, so no span was ever exported.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from otlp_receiver import OtlpReceiver
from test_tracing import _python


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver().start()
    yield server
    server.stop()


RUN = """
import logging
logging.basicConfig()
from flowloom import FlowService
from apps import observed_app
with FlowService() as fs:
    observed_app.register(fs)
    rid = fs.execute("diamond", b"x")
    fs.result("diamond", rid, timeout=10)
    print(fs.state("diamond", rid).trace_id)
"""


@pytest.mark.parametrize(
    ("variable", "value", "warned"),
    [
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "8192", False),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "10", False),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "nan", True),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "inf", True),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "1e30", True),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "-5", True),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "0", True),
        ("OTEL_BSP_SCHEDULE_DELAY", "-1", True),
        ("OTEL_BSP_SCHEDULE_DELAY", "a while", True),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "abc", True),
        ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "nan", True),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "zip", True),
    ],
)
def test_a_setting_out_of_range_is_warned_of_and_every_span_arrives(
    receiver: OtlpReceiver, variable: str, value: str, warned: bool
) -> None:
    done = _python(
        RUN,
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            variable: value,  # in place of the delay above, when it is the one tried
        },
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    trace_id = done.stdout.split()[-1]
    assert len(receiver.trace(trace_id)) == 9  # the diamond's spans, as with no setting
    warnings = [line for line in done.stderr.splitlines() if f"{variable}=" in line]
    if not warned:
        assert warnings == []
    else:
        assert warnings, done.stderr
        assert repr(value) in warnings[0] or repr(value.lower()) in warnings[0]
