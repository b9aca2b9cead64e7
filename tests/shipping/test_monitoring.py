"""manifests/monitoring: the PrometheusRule's groups pass Prometheus' own checks and unit
tests (promtool, from Debian's prometheus package), and the dashboard loads as a Grafana
dashboard model without losing or changing a field (Grafana's Foundation SDK)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import Dashboard

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "manifests" / "monitoring"


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is not installed: `make test` installs prometheus from Debian")
    return subprocess.run([binary, *args], capture_output=True, text=True, cwd=cwd, check=False)


def test_alert_rules_pass_promtool_check_and_unit_tests(tmp_path: Path) -> None:
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    checked = promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert f"SUCCESS: {len(alerts)} rules found" in checked.stdout
    # What the shipping issue asks an SRE to be told about, each by its own alert.
    assert {
        "TeleradGatewayDown",
        "TeleradStatQueueWaitOverSLO",
        "TeleradWorkerFailures",
        "TeleradDiskFillingUp",
        "TeleradAutoscalerDegraded",
        "TeleradCertificateExpiring",
        "TeleradCertificateExpired",
    } <= alerts
    shutil.copy(ROOT / "tests" / "shipping" / "rules_test.yaml", tmp_path)
    tested = promtool("test", "rules", "rules_test.yaml", cwd=tmp_path)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def _lost(written: Any, loaded: Any, path: str = "") -> list[str]:
    """Where the model dropped or changed what the JSON says."""
    if isinstance(written, dict):
        return [
            p
            for key, value in written.items()
            for p in (
                [f"{path}/{key} dropped"]
                if key not in loaded
                else _lost(value, loaded[key], f"{path}/{key}")
            )
        ]
    if isinstance(written, list):
        if len(written) != len(loaded):
            return [f"{path} has {len(loaded)} items, not {len(written)}"]
        return [
            p
            for i, (a, b) in enumerate(zip(written, loaded, strict=True))
            for p in _lost(a, b, f"{path}[{i}]")
        ]
    return [] if written == loaded else [f"{path}: {written!r} became {loaded!r}"]


def test_the_dashboard_loads_as_a_grafana_dashboard_model() -> None:
    written = json.loads((MONITORING / "dashboard.json").read_text())
    loaded = json.loads(json.dumps(Dashboard.from_json(written), cls=JSONEncoder))
    assert _lost(written, loaded) == []
    assert len(loaded["panels"]) >= 8
    exprs = [t["expr"] for p in loaded["panels"] for t in p["targets"]]
    assert any("telerad_queue_oldest_seconds" in e for e in exprs)
    assert any("telerad_autoscaler_desired_replicas" in e for e in exprs)


def test_the_model_check_catches_a_broken_panel() -> None:
    """The round trip is a real check: a panel with a malformed position does not survive."""
    broken = json.loads((MONITORING / "dashboard.json").read_text())
    broken["panels"][0]["gridPos"] = "top left"
    loaded = json.loads(json.dumps(Dashboard.from_json(broken), cls=JSONEncoder))
    assert _lost(broken, loaded) != []
