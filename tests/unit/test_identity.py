"""The agent's identity and registration numbers (dsss.agent.identity)."""

from __future__ import annotations

from pathlib import Path

from nacl.signing import SigningKey

from dsss.agent.identity import SEQ_FILE, AgentIdentity


def test_numbers_increase_and_are_recorded(tmp_path: Path) -> None:
    ident = AgentIdentity.load_or_create(tmp_path)
    first, second = ident.next_seq(), ident.next_seq()
    assert second > first
    assert int((tmp_path / SEQ_FILE).read_text()) == second
    # A restart (a new AgentIdentity) continues above the recorded number even if the clock
    # went back: the file holds a number far in the future.
    (tmp_path / SEQ_FILE).write_text(f"{second + 10**12}\n")
    assert AgentIdentity.load_or_create(tmp_path).next_seq() == second + 10**12 + 1


def test_an_unwritable_record_does_not_stop_registration(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    # The record would go under a regular file: every write fails, as on a full or read-only disk.
    ident = AgentIdentity(SigningKey.generate(), tmp_path / "file" / SEQ_FILE)
    first = ident.next_seq()
    second = ident.next_seq()
    assert second > first
