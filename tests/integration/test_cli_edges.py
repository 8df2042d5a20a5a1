"""The rough edges a new user hit, through the real CLI against real twistd processes: long and
odd names, `get` without -o and --force, upper-case addresses, a broken pipe, a wrong --key file,
--version, and a share its maker checks and repairs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import dsss
from dsss.client import catalog
from dsss.crypto.keys import generate_key_file, public_key_hex
from dsss.model import is_block_id
from tools.harness import LocalNetwork, child_env

pytestmark = [pytest.mark.integration]


def cli(net: LocalNetwork, key: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dsss.client", "--server", net.url, "--key", str(key), *args],
                          env=child_env(), cwd=cwd, text=True, capture_output=True, timeout=120)


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "me.key"
    generate_key_file(path)
    return path


def test_a_255_byte_name_and_a_name_with_a_newline_round_trip(
    shared_network: LocalNetwork, tmp_path: Path, key: Path
) -> None:
    net = shared_network
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    long_name = "é" * 100 + "x" * 51 + ".bin"  # 255 bytes in UTF-8, the most a name may have
    assert len(long_name.encode()) == 255
    long_file = src_dir / long_name
    long_file.write_bytes(os.urandom(300_000))  # several parts: fetched through a partial file
    odd = src_dir / "two\nlines\\.txt"
    odd.write_bytes(b"odd")
    r = cli(net, key, "put", "--part-size", "64K", str(long_file), str(odd))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2  # one line per file, whatever its name
    assert lines[1].split(" ", 1)[1] == str(src_dir / "two\\nlines\\\\.txt")
    long_address, odd_address = lines[0].split()[0], lines[1].split()[0]

    out = tmp_path / "out"
    out.mkdir()
    r = cli(net, key, "get", long_address, cwd=out)
    assert r.returncode == 0, r.stderr
    assert (out / long_name).read_bytes() == long_file.read_bytes()
    r = cli(net, key, "get", long_address, "-o", str(out / "again.bin"))
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == sorted([long_name, "again.bin"])  # no partial left
    r = cli(net, key, "get", odd_address, long_address, "-o", str(tmp_path / "out"), "--force")
    assert r.returncode == 0, r.stderr
    # The manifest keeps the name with its control characters as `?` (see `clean_name`).
    assert (out / "two?lines\\.txt").read_bytes() == b"odd"
    assert len(r.stdout.splitlines()) == 2


def test_get_without_output_uses_the_stored_name_and_never_replaces_without_force(
    shared_network: LocalNetwork, tmp_path: Path, key: Path
) -> None:
    net = shared_network
    src = tmp_path / "report.pdf"
    src.write_bytes(b"%PDF first")
    address = cli(net, key, "put", str(src)).stdout.split()[0]
    here = tmp_path / "here"
    here.mkdir()
    r = cli(net, key, "get", address.upper(), cwd=here)  # upper-case addresses are accepted
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{address} report.pdf\n"
    assert (here / "report.pdf").read_bytes() == b"%PDF first"
    (here / "report.pdf").write_bytes(b"my edits")
    r = cli(net, key, "get", address, cwd=here)
    assert r.returncode == 2 and "report.pdf exists; give --force to replace it" in r.stderr
    assert (here / "report.pdf").read_bytes() == b"my edits"
    r = cli(net, key, "get", address, "-o", str(here / "report.pdf"))
    assert r.returncode == 2 and (here / "report.pdf").read_bytes() == b"my edits"
    r = cli(net, key, "get", address, "--force", cwd=here)
    assert r.returncode == 0 and (here / "report.pdf").read_bytes() == b"%PDF first"
    # A directory that does not exist: a usage error before anything is fetched.
    r = cli(net, key, "get", address, "-o", str(tmp_path / "no" / "such" / "dir" / "f"))
    assert r.returncode == 2 and "no directory" in r.stderr
    assert os.listdir(here) == ["report.pdf"]


def test_a_closed_pipe_ends_the_command_quietly(shared_network: LocalNetwork, tmp_path: Path, key: Path) -> None:
    net = shared_network
    path = catalog.catalog_path(key)
    for i in range(3000):  # more than a pipe holds
        catalog.append(path, catalog.Entry(address=f"{i:064x}", name=f"file{i}", size=i, parts=1,
                                           created=1_700_000_000))
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024))
    address = cli(net, key, "put", str(src)).stdout.split()[0]
    for args in (("ls",), ("get", address, "-o", "-")):
        p = subprocess.Popen([sys.executable, "-m", "dsss.client", "--server", net.url, "--key", str(key), *args],
                             env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert p.stdout is not None and p.stderr is not None
        assert p.stdout.read(100)  # `| head -c 100`
        p.stdout.close()
        err = p.stderr.read().decode()
        assert p.wait(60) in (0, 141), (args, err)
        assert err == "", (args, err)


def test_version_and_a_key_option_that_names_something_else(tmp_path: Path) -> None:
    env = child_env({"HOME": str(tmp_path)})
    r = subprocess.run([sys.executable, "-m", "dsss.client", "--version"], env=env, text=True,
                       capture_output=True, timeout=60)
    assert r.returncode == 0 and r.stdout == f"dsss {dsss.__version__}\n"
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(100_000))
    text = tmp_path / "notes.txt"
    text.write_text("just some notes\n")
    for path, why in ((big, "larger than 4096 bytes"), (text, "is not a DSSS key file"),
                      (tmp_path, "is a directory")):
        r = subprocess.run([sys.executable, "-m", "dsss.client", "--key", str(path), "pubkey"], env=env,
                           text=True, capture_output=True, timeout=60)
        assert r.returncode == 2 and why in r.stderr, r.stderr
        assert len(r.stderr.splitlines()) == 1 and "codec" not in r.stderr and "Error" not in r.stderr


def test_the_maker_of_a_share_checks_it_and_repair_all_includes_it(
    shared_network: LocalNetwork, tmp_path: Path, key: Path
) -> None:
    net = shared_network
    bob = tmp_path / "bob.key"
    bob_pub = public_key_hex(generate_key_file(bob))
    src = tmp_path / "shared.bin"
    src.write_bytes(os.urandom(200_000))
    original = cli(net, key, "put", "--part-size", "64K", str(src)).stdout.split()[0]
    r = cli(net, key, "share", original, "--to", bob_pub)
    assert r.returncode == 0, r.stderr
    shared = r.stdout.split()[0]
    assert is_block_id(shared) and shared != original
    r = cli(net, key, "--json", "check", shared)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    (checked,) = doc["files"]
    assert checked["address"] == shared and checked["ok"] is True
    assert checked["blocks"][0]["hash"] == shared  # the share's own manifest, then the parts
    assert len(checked["blocks"]) == 1 + 4
    assert "shared.bin" in cli(net, key, "info", shared).stdout
    r = cli(net, key, "--json", "repair", "--all")
    assert r.returncode == 0, r.stderr
    assert {f["address"] for f in json.loads(r.stdout)["files"]} == {original, shared}
