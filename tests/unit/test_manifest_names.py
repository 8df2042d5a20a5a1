from __future__ import annotations

import pytest

from dsss.crypto.manifest import clean_name, safe_name


@pytest.mark.parametrize("name", ["a\x1bb", "a\x9bb", "evil\u202etxt.exe", "zero\u200bwidth", "tab\there"])
def test_names_that_could_spoof_a_terminal_are_unsafe(name):
    assert not safe_name(name)
    assert safe_name(clean_name(name)) and "?" in clean_name(name)


@pytest.mark.parametrize("name", ["photo.jpg", "Résumé 2026.pdf", "写真.png", "emoji 🎉.txt", ""])
def test_ordinary_names_are_kept(name):
    assert safe_name(name) and clean_name(name) == name
