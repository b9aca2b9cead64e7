"""Bearer tokens from a mounted Secret, and the audit log, on real files."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from telerad.runtime.gateway import access
from telerad.runtime.gateway.access import TokenFileError, Tokens, new_token
from telerad.runtime.store.audit import AuditUnavailable
from telerad.runtime.store.audit_files import AuditFiles


def bearer(token: str) -> str:
    return f"Bearer {token}"


def test_verdicts(tmp_path: Path) -> None:
    viewer = new_token("radiology")
    (tmp_path / "viewer").write_text(viewer + "\n")
    (tmp_path / "..data").mkdir()  # kubelet's own entries are not tokens
    tokens = Tokens("radiology", tmp_path)
    assert tokens.check(bearer(viewer)) == access.Verdict(200, "viewer", "radiology")
    assert tokens.check(f"bearer   {viewer}").status == 200
    other = tokens.check(bearer(new_token("oncology")))
    assert (other.status, other.client, other.tenant) == (403, None, "oncology")
    assert tokens.check(bearer(new_token("radiology"))).status == 401
    for header in (None, "", "Bearer", f"Basic {viewer}", "Bearer radiology.short", "Bearer x"):
        assert tokens.check(header).status == 401, header
    assert Tokens("radiology", None).check(bearer(viewer)).status == 401


def test_rotation_is_picked_up_and_bad_edits_do_not_lock_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(access, "RELOAD_AFTER_S", 0.0)
    old, new = new_token("radiology"), new_token("radiology")
    (tmp_path / "worker").write_text(old)
    tokens = Tokens("radiology", tmp_path)
    (tmp_path / "worker").write_text(new)
    assert tokens.check(bearer(new)).status == 200
    assert tokens.check(bearer(old)).status == 401
    (tmp_path / "broken").write_text("not a token")
    assert tokens.check(bearer(new_token("radiology"))).status == 401
    assert tokens.check(bearer(new)).status == 200  # the last good set still holds


@pytest.mark.parametrize(
    ("content", "message"),
    [("hunter2", "is not <namespace>"), (new_token("oncology"), "belongs to namespace 'oncology'")],
)
def test_unusable_token_files_stop_the_start(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "viewer").write_text(content)
    with pytest.raises(TokenFileError, match=message) as raised:
        Tokens("radiology", tmp_path)
    assert "'viewer'" in str(raised.value)
    assert content not in str(raised.value)


def test_audit_lines_and_retention(tmp_path: Path) -> None:
    audit = AuditFiles(tmp_path / "audit")
    audit.write({"client": "viewer", "status": 200})
    audit.write({"client": None, "status": 401})
    audit.sync()
    (today,) = (tmp_path / "audit").glob("audit-*.jsonl")
    lines = [json.loads(line) for line in today.read_text().splitlines()]
    assert [line["status"] for line in lines] == [200, 401]
    assert all(line["time"].endswith("+00:00") for line in lines)
    old = tmp_path / "audit" / "audit-2000-01-01.jsonl"
    old.write_text("{}\n")
    audit.prune(time.time(), retention_days=30)
    assert not old.exists() and today.exists()
    audit.close()


def test_an_audit_file_that_cannot_be_written_is_a_clear_error(tmp_path: Path) -> None:
    """The gateway withholds the answer of a request it could not record (test_audit.py):
    what it catches is AuditUnavailable, naming the directory and the reason."""
    audit = AuditFiles(tmp_path / "audit")
    (tmp_path / "audit").rmdir()
    with pytest.raises(AuditUnavailable, match="No such file or directory") as raised:
        audit.write({"client": "viewer", "status": 200})
    assert str(tmp_path / "audit") in str(raised.value)
    audit.close()
