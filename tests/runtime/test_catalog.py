"""A real gateway on its catalog: it says on /metrics that its catalog answers, and one
that cannot open the catalog its mounted Secret names exits at once, saying which key is
missing and never what the Secret holds."""

from __future__ import annotations

from pathlib import Path

from telerad.api.config import CatalogConfig, GatewayConfig
from telerad.runtime.gateway.example import example_config
from tests.runtime.conftest import GatewayFactory, GatewayProcess, free_port

PASSWORD = "not-for-logs"  # noqa: S105  (a test password)


def test_a_running_gateway_reports_its_catalog_up(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway()
    assert gateway.metric("telerad_gateway_catalog_up", site="example") == 1


def test_a_gateway_whose_catalog_secret_lacks_a_key_exits_naming_it(tmp_path: Path) -> None:
    secret = tmp_path / "catalog"
    secret.mkdir()
    for key, value in {"dbname": "app", "user": "app", "password": PASSWORD}.items():
        (secret / key).write_text(value)
    config = example_config(free_port(), free_port(), tmp_path / "data")
    config = GatewayConfig.model_validate(
        config.model_copy(update={"catalog": CatalogConfig(secret_dir=secret)}).model_dump()
    )
    gateway = GatewayProcess(config, tmp_path)
    gateway.launch()
    assert gateway.proc is not None
    assert gateway.proc.wait(60) == 1
    said = gateway.log_tail()
    assert "CatalogUnavailable" in said
    assert "has neither 'uri' nor 'host'" in said
    assert PASSWORD not in gateway.log.read_text()
