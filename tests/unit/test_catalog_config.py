"""The catalog's configuration: the CLI's example config, what CatalogConfig refuses, and
`connection()`, which turns a mounted Secret (CloudNativePG's `<cluster>-app` keys) into
a URL without a password and the password beside it."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from click.testing import CliRunner
from pydantic import ValidationError

from telerad import cli as cli_module
from telerad.api.config import CatalogConfig, GatewayConfig
from telerad.cli import cli
from telerad.runtime.store.backends import connection, default_url
from telerad.runtime.store.catalog import CatalogUnavailable

SECRET = "s3cr%t/pw"  # noqa: S105  (a test password, with characters a URL must escape)


def example(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["gateway", "--example-config", *args])
    return result.exit_code, result.stdout, result.stderr


def test_example_config_uses_the_catalog_url_and_password_file(tmp_path: Path) -> None:
    url = "postgresql://telerad@db.tenant-a.svc:5432/catalog?sslmode=verify-full"
    code, out, err = example(
        "--data-dir", str(tmp_path), "--catalog-url", url, "--catalog-password-file", "pw"
    )
    assert code == 0, err
    config = GatewayConfig.from_wire(yaml.safe_load(out))
    assert config.catalog.url == url
    assert config.catalog.password_file == Path("pw").absolute()


def test_two_gateways_given_one_url_and_data_dir_are_one_site(tmp_path: Path) -> None:
    url = "postgresql://telerad@127.0.0.1:5432/telerad"
    common = ["--data-dir", str(tmp_path), "--catalog-url", url]
    configs = []
    for port, http in (("11112", "8080"), ("11113", "8081")):
        code, out, err = example(*common, "--port", port, "--http-port", http)
        assert code == 0, err
        configs.append(GatewayConfig.from_wire(yaml.safe_load(out)))
    first, second = configs
    assert (first.dicom_port, first.http_port) != (second.dicom_port, second.http_port)
    same = {"dicom_port", "http_port"}
    assert first.model_dump(exclude=same) == second.model_dump(exclude=same)
    assert first.catalog.url == url
    # One client token for both: the second run reuses the file the first wrote.
    assert first.tokens_dir is not None
    assert [p.name for p in first.tokens_dir.iterdir()] == ["local"]


def test_without_a_catalog_url_the_example_keeps_sqlite(tmp_path: Path) -> None:
    code, out, err = example("--data-dir", str(tmp_path))
    assert code == 0, err
    config = GatewayConfig.from_wire(yaml.safe_load(out))
    assert config.catalog == CatalogConfig()
    url, password = connection(config.catalog, config.storage.hot_dir)
    assert url == default_url(tmp_path / "hot")
    assert password is None


@pytest.mark.parametrize(
    "url", ["postgresql://u:secret@h/db", "postgresql://u@h/db?sslmode=require&password=secret"]
)
def test_a_url_with_a_password_is_refused_without_repeating_it(tmp_path: Path, url: str) -> None:
    code, out, err = example("--data-dir", str(tmp_path), "--catalog-url", url)
    assert code == 2
    assert out == ""
    assert "--catalog-password-file" in err
    assert "secret" not in err
    with pytest.raises(ValidationError, match="passwordFile") as raised:
        CatalogConfig(url=url)
    assert "secret" not in str(raised.value)
    # Nor from the whole config, as the gateway loads it from its ConfigMap.
    wire = yaml.safe_load(example("--data-dir", str(tmp_path))[1])
    with pytest.raises(ValidationError) as raised:
        GatewayConfig.from_wire({**wire, "catalog": {"url": url}})
    assert "secret" not in str(raised.value)


def test_a_catalog_is_a_url_or_a_secret_dir() -> None:
    with pytest.raises(ValidationError, match="url or secretDir, not both"):
        CatalogConfig(url="postgresql://u@h/db", secret_dir=Path("/s"))
    with pytest.raises(ValidationError, match="no passwordFile"):
        CatalogConfig(secret_dir=Path("/s"), password_file=Path("/p"))
    CatalogConfig.from_wire({"secretDir": "/var/run/telerad/catalog"})


def secret(tmp_path: Path, **keys: str) -> CatalogConfig:
    """A Secret mounted as the kubelet does: one file per key."""
    directory = tmp_path / "catalog"
    directory.mkdir()
    for key, value in keys.items():
        (directory / key.replace("_", ".")).write_text(value + "\n")
    return CatalogConfig(secret_dir=directory)


def test_a_cloudnativepg_uri_loses_its_password_to_the_password(tmp_path: Path) -> None:
    escaped = "s3cr%25t%2Fpw"
    uri = f"postgresql://app:{escaped}@tenant-db-rw.tenant-a:5432/app"
    config = secret(tmp_path, uri=uri, password=SECRET, host="ignored", user="app")
    url, password = connection(config, tmp_path)
    assert url == "postgresql://app@tenant-db-rw.tenant-a:5432/app"
    assert password == SECRET


def test_a_uri_keeps_its_tls_query_and_loses_a_password_parameter(tmp_path: Path) -> None:
    uri = "postgres://app@db:5432/app?sslmode=verify-full&sslrootcert=/ca.pem&password=pw"
    url, password = connection(secret(tmp_path, uri=uri), tmp_path)
    assert url == "postgres://app@db:5432/app?sslmode=verify-full&sslrootcert=/ca.pem"
    assert password == "pw"  # noqa: S105


def test_without_a_uri_the_url_is_composed_from_the_keys(tmp_path: Path) -> None:
    config = secret(
        tmp_path, host="db.example.com", port="6432", dbname="tele rad", user="app", password=SECRET
    )
    assert connection(config, tmp_path) == (
        "postgresql://app@db.example.com:6432/tele%20rad",
        SECRET,
    )


def test_composed_defaults_and_the_username_key(tmp_path: Path) -> None:
    config = secret(tmp_path, host="fd00::5", dbname="app", username="app")
    assert connection(config, tmp_path) == ("postgresql://app@[fd00::5]:5432/app", None)


def test_sslmode_and_ca_keys_add_tls(tmp_path: Path) -> None:
    config = secret(tmp_path, host="db", dbname="app", user="app", ca_crt="PEM")
    assert config.secret_dir is not None
    ca = config.secret_dir / "ca.crt"
    url, _ = connection(config, tmp_path)
    assert url == f"postgresql://app@db:5432/app?sslrootcert={ca}&sslmode=verify-full"
    (config.secret_dir / "sslmode").write_text("verify-ca")
    url, _ = connection(config, tmp_path)
    assert parse_qs(urlsplit(url).query) == {"sslmode": ["verify-ca"], "sslrootcert": [str(ca)]}


@pytest.mark.parametrize(
    ("keys", "missing"),
    [
        ({"dbname": "app", "user": "app"}, "host"),
        ({"host": "db", "user": "app"}, "dbname"),
        ({"host": "db", "dbname": "app"}, "user"),
    ],
)
def test_a_missing_key_is_named(tmp_path: Path, keys: dict[str, str], missing: str) -> None:
    with pytest.raises(CatalogUnavailable, match=f"neither 'uri' nor '{missing}'"):
        connection(secret(tmp_path, password=SECRET, **keys), tmp_path)


def test_a_port_that_is_not_a_number_is_named(tmp_path: Path) -> None:
    config = secret(tmp_path, host="db", port="postgres", dbname="app", user="app")
    with pytest.raises(CatalogUnavailable, match="'port' is not a port number"):
        connection(config, tmp_path)


def test_an_unmounted_secret_or_a_foreign_uri_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(CatalogUnavailable, match="does not exist"):
        connection(CatalogConfig(secret_dir=tmp_path / "absent"), tmp_path)
    with pytest.raises(CatalogUnavailable, match="not a postgresql:// URL") as raised:
        connection(secret(tmp_path, uri="mysql://app:pw@db/app"), tmp_path)
    assert "pw" not in str(raised.value)


def test_the_password_file_of_a_url(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text(SECRET + "\n")
    config = CatalogConfig(url="postgresql://app@db/app", password_file=tmp_path / "pw")
    assert connection(config, tmp_path) == ("postgresql://app@db/app", SECRET)
    missing = CatalogConfig(url="postgresql://app@db/app", password_file=tmp_path / "nope")
    with pytest.raises(CatalogUnavailable, match="catalog password file"):
        connection(missing, tmp_path)


def test_a_gateway_that_cannot_open_its_catalog_says_so_in_its_termination_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the operator reads back from the pod's status (CatalogUnavailable)."""
    wire = yaml.safe_load(example("--data-dir", str(tmp_path / "data"))[1])
    wire |= {"receivers": 1, "catalog": {"secretDir": str(tmp_path / "catalog")}}
    (tmp_path / "catalog").mkdir()
    (tmp_path / "catalog" / "user").write_text("app")
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(wire))
    log = tmp_path / "termination-log"
    log.touch()
    monkeypatch.setattr(cli_module, "TERMINATION_LOG", log)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")  # restored after the command sets it
    result = CliRunner().invoke(cli, ["gateway", "--config", str(tmp_path / "gateway.yaml")])
    assert result.exit_code == 1, result.output
    assert log.read_text().startswith("CatalogUnavailable: catalog Secret in")
    assert "neither 'uri' nor 'host'" in log.read_text()
    assert "CatalogUnavailable" in result.stderr
