"""``kvmarina operator``: its logging (level and format from flags or the chart's
environment) and its metrics server, run as the pod runs it."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from kvmarina.logs import JsonFormatter
from kvmarina.operator.main import parse_args

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_environment_sets_level_format_and_port_and_flags_win() -> None:
    env = {"KVMARINA_LOG_LEVEL": "debug", "KVMARINA_LOG_FORMAT": "json"}
    env["KVMARINA_METRICS_PORT"] = "9100"
    args = parse_args([], env)
    assert (args.log_level, args.log_format, args.metrics_port) == ("debug", "json", 9100)
    args = parse_args(["--log-level", "WARNING", "--log-format", "text"], env)
    assert (args.log_level, args.log_format) == ("warning", "text")
    assert parse_args([], {}).log_level == "info"
    assert parse_args([], {}).metrics_port == 8081


@pytest.mark.parametrize(
    "env", [{"KVMARINA_LOG_LEVEL": "loud"}, {"KVMARINA_LOG_FORMAT": "xml"}], ids=str
)
def test_a_bad_environment_value_is_refused_like_a_bad_flag(
    env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args([], env)
    assert exc.value.code == 2
    assert next(iter(env.values())) in capsys.readouterr().err


def test_json_lines_carry_time_level_logger_message_and_the_traceback() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("kvmarina.test.json")
    log.addHandler(handler)
    log.propagate = False  # pytest's own capture stays out of it
    log.setLevel(logging.INFO)
    try:
        log.debug("not shown")
        log.info("hello %s", "world")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("it failed")
        kopf_style = {"k8s_ref": {"kind": "ModelServing", "namespace": "ns", "name": "x"}}
        log.warning("object event", extra=kopf_style)
    finally:
        log.removeHandler(handler)
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [x["message"] for x in lines] == ["hello world", "it failed", "object event"]
    assert lines[0]["level"] == "info" and lines[0]["logger"] == "kvmarina.test.json"
    assert lines[0]["time"].endswith("+00:00") and "T" in lines[0]["time"]
    assert "ValueError: boom" in lines[1]["exception"]
    assert lines[2]["object"] == {"kind": "ModelServing", "namespace": "ns", "name": "x"}


def test_the_operator_command_logs_json_and_serves_metrics(tmp_path: Path) -> None:
    """Run as the chart runs it: configured by the environment alone, except for one
    flag that must win over it. The API server it is given does not answer, so kopf
    logs its retries (errors), which is what the output is checked on."""
    dead = free_port()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{dead}"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    metrics = free_port()
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "KVMARINA_KUBE_SERVER": f"http://127.0.0.1:{dead}",
        "KVMARINA_HEALTH_PORT": str(free_port()),
        "KVMARINA_METRICS_PORT": str(metrics),
        "KVMARINA_LOG_FORMAT": "json",
        "KVMARINA_LOG_LEVEL": "debug",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmarina.cli", "operator", "--log-level", "warning"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics") as r:
                    text = r.read().decode()
                break
            except OSError:
                assert time.monotonic() < deadline, "no metrics server"
                time.sleep(0.1)
        assert 'kvmarina_operator_reconciles_total{kind="ModelServing",result="ok"} 0.0' in text
        assert "process_cpu_seconds_total" in text
        time.sleep(1.5)  # kopf's first retries of the unreachable API server
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    lines = [json.loads(x) for x in err.splitlines() if x.strip()]
    assert lines, err
    for doc in lines:
        assert {"time", "level", "logger", "message"} <= doc.keys(), doc
    # the flag (warning) beat the environment (debug)
    assert {d["level"] for d in lines} <= {"warning", "error", "critical"}, lines
    assert any(d["logger"].startswith("kopf") and d["level"] == "error" for d in lines)
