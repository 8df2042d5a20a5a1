"""Directories on the network through the real CLI against real twistd processes: a tree of
1,000 files with odd names (and a directory of 1,000 entries) round-trips (`put -r`, `ls ADDRESS`, `get -r`), a hostile directory
manifest is refused without writing anything, `put -` reads stdin, the catalog is backed up and
restored, and the gateway refuses a path where a name is expected."""

from __future__ import annotations

import http.client
import json
import os
import random
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from dsss.crypto.keys import load_key_file
from dsss.model import is_block_id
from tests.conftest import start_network
from tests.integration.test_cli_commands import User
from tests.support.hostile_tree import dir_entry, file_entry, head, seal_body
from tools.harness import LocalNetwork, child_env

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def one_copy_network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNetwork]:
    """A server keeping one copy of each blob, and two agents: these tests are about names,
    sizes, modes and times (replication has tests of its own), and a thousand files stored
    three times would triple their time."""
    net = LocalNetwork(tmp_path_factory.mktemp("dirs"), heartbeat=0.5, replicas=1)
    try:
        start_network(net, agents=2)
        yield net
    finally:
        net.stop()


ODD_NAMES = [
    "ünïcødé ✓.txt", "日本語", "with  two spaces", " leading space", "trailing space ",
    "-leading-dash", "--", "-r", "é" * 127 + "x", "y" * 255, "new\nline", "tab\tname",
    ".hidden", "...", "quote\"back\\slash", "emoji 🎉", "percent%2F", "star*?[x]",
]

DIR_NAMES = ["ünïcødé dir", "-dash dir", " spaced dir ", "日本 dir"]


def build_tree(root: Path, files: int, rng: random.Random, *, crowded: int = 0) -> None:
    """`files` small files in nested folders (three levels), with the odd names, empty files,
    an empty directory, and assorted modes and nanosecond times. With `crowded`, the directory
    `crowded` holds that many entries: the files from the 101st on, and empty directories."""
    dirs = [root]
    for i in range(8):
        top = root / (DIR_NAMES[i] if i < len(DIR_NAMES) else f"dir {i}")
        dirs.append(top)
        for j in range(3):
            sub = top / f"sub-{j}" / ("deeper" if j == 1 else "-x")
            dirs.append(sub)
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    (root / "empty directory").mkdir()
    if crowded:
        (root / "crowded").mkdir()
        for i in range(crowded - (files - 100)):
            (root / "crowded" / f"empty {i:03d}").mkdir()
    names = iter(ODD_NAMES)
    for n in range(files):
        name = next(names, None)
        d = root if name is not None else (root / "crowded" if crowded and n >= 100 else dirs[n % len(dirs)])
        name = name or f"file {n:04d}.bin"
        data = b"" if n % 50 == 0 else rng.randbytes(rng.randrange(1, 300))
        path = d / name
        path.write_bytes(data)
        os.chmod(path, (0o600, 0o644, 0o755, 0o400, 0o640)[n % 5])
        os.utime(path, ns=(0, 1_700_000_000_000_000_000 + n * 1_000_003_007))
    os.chmod(dirs[3], 0o750)
    if crowded:
        dirs.append(root / "crowded")
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        os.utime(d, ns=(0, 1_600_000_000_123_456_789 + len(str(d))))


def snapshot(root: Path) -> dict[str, tuple[str, int, int, int, bytes]]:
    out = {}
    for path in sorted(root.rglob("*")):
        st = os.lstat(path)
        rel = str(path.relative_to(root))
        if stat.S_ISDIR(st.st_mode):
            out[rel] = ("d", 0, stat.S_IMODE(st.st_mode), st.st_mtime_ns, b"")
        elif stat.S_ISREG(st.st_mode):
            out[rel] = ("f", st.st_size, stat.S_IMODE(st.st_mode), st.st_mtime_ns, path.read_bytes())
    return out


def test_a_tree_of_a_thousand_files_round_trips(one_copy_network: LocalNetwork, tmp_path: Path) -> None:
    user = User(one_copy_network, tmp_path, "alice")
    src = tmp_path / "src"
    src.mkdir()
    build_tree(src, 1000, random.Random(7), crowded=1000)
    (src / "a link").symlink_to(tmp_path)  # not followed, not stored
    os.utime(src, ns=(0, 1_650_000_000_000_000_000))
    before = snapshot(src)
    assert sum(1 for v in before.values() if v[0] == "f") == 1000

    r = user.cli("put", "-r", str(src))
    address, given = r.stdout.rstrip("\n").split(" ", 1)
    assert is_block_id(address) and given == str(src)
    assert "not stored (symbolic link" in r.stderr and "a link" in r.stderr
    entry = user.json("ls")["files"][-1]
    assert entry["address"] == address and entry["type"] == "directory" and entry["name"] == "src"

    listing = user.json("ls", address)
    assert listing["type"] == "directory" and listing["name"] == "src"
    top = {e["name"]: e for e in listing["entries"]}
    assert "a link" not in top and top["empty directory"]["type"] == "directory"
    crowded = user.json("ls", top["crowded"]["address"])["entries"]
    assert len(crowded) == 1000 and sum(e["type"] == "file" for e in crowded) == 900
    assert top[DIR_NAMES[0]]["type"] == "directory" and top[DIR_NAMES[0]]["mode"] == 0o755
    text = user.cli("ls", address).stdout
    assert "empty directory/" in text and "new\\nline" in text  # control characters escaped

    out = tmp_path / "restored"
    r = user.cli("get", "-r", address, "-o", str(out))
    assert r.stdout == f"{address} {out}\n"
    after = snapshot(out)
    assert after == before
    assert stat.S_IMODE(os.stat(out).st_mode) == stat.S_IMODE(os.stat(src).st_mode)
    assert os.stat(out).st_mtime_ns == 1_650_000_000_000_000_000

    # Again into the same place: refused before anything is written (--force is tested on a
    # small tree below).
    some = next(p for p in (out / DIR_NAMES[0] / "sub-0" / "-x").iterdir() if p.is_file())
    os.chmod(some, 0o600)
    some.write_bytes(b"changed")
    r = user.cli("get", "-r", address, "-o", str(out), check=False)
    assert r.returncode == 1 and "exist" in r.stderr and "--force" in r.stderr
    assert some.read_bytes() == b"changed"

    # A file command given the directory says so; `put DIR` without -r too.
    r = user.cli("get", address, "-o", str(tmp_path / "x"), check=False)
    assert r.returncode == 2 and "is a directory" in r.stderr and "-r" in r.stderr
    assert not (tmp_path / "x").exists()
    r = user.cli("info", address, check=False)
    assert r.returncode == 2 and "is a directory" in r.stderr
    r = user.cli("put", str(src), check=False)
    assert r.returncode == 2 and "is a directory" in r.stderr and "put -r" in r.stderr
    # ... and get -r given a file's address.
    file_address = next(e["address"] for e in listing["entries"] if e["type"] == "file")
    r = user.cli("get", "-r", file_address, "-o", str(tmp_path / "y"), check=False)
    assert r.returncode == 2 and "is a file" in r.stderr and not (tmp_path / "y").exists()


def test_get_r_replaces_existing_files_only_when_forced(one_copy_network: LocalNetwork, tmp_path: Path) -> None:
    user = User(one_copy_network, tmp_path, "force")
    src = tmp_path / "src"
    build_tree(src, 40, random.Random(3))
    before = snapshot(src)
    address = user.cli("put", "-r", str(src)).stdout.split()[0]
    out = tmp_path / "out"
    out.mkdir()
    (out / ODD_NAMES[0]).write_bytes(b"mine")
    (out / "unrelated").write_bytes(b"kept")
    r = user.cli("get", "-r", address, "-o", str(out), check=False)
    assert r.returncode == 1 and "nothing was written" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted([ODD_NAMES[0], "unrelated"])
    doc = user.json("get", "-r", address, "-o", str(out), "--force")
    assert doc["replaced"] == 1 and doc["files"] == 40 and doc["failed"] == []
    assert snapshot(out) == {**before, "unrelated": snapshot(out)["unrelated"]}
    assert (out / "unrelated").read_bytes() == b"kept"
    # A directory of the tree that is a file on disk is never replaced, even with --force.
    out2 = tmp_path / "out2"
    out2.mkdir()
    (out2 / DIR_NAMES[0]).write_bytes(b"a file")
    r = user.cli("get", "-r", address, "-o", str(out2), "--force", check=False)
    assert r.returncode == 1 and "not a directory" in r.stderr
    assert [p.name for p in out2.iterdir()] == [DIR_NAMES[0]]


def store_blobs(net: LocalNetwork, user: User, blobs: list[bytes], tmp_path: Path) -> list[str]:
    paths = []
    for i, blob in enumerate(blobs):
        p = tmp_path / f"blob{i}"
        p.write_bytes(blob)
        paths.append(str(p))
    r = subprocess.run([sys.executable, "-m", "tests.support.store_blob", net.url, str(user.key), *paths],
                       env=child_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_a_hostile_directory_is_refused_without_writing_anything(
        one_copy_network: LocalNetwork, tmp_path: Path) -> None:
    net = one_copy_network
    user = User(net, tmp_path, "mallory-victim")
    payload = tmp_path / "payload"
    payload.write_bytes(b"would be written outside")
    file_address = user.put(payload)
    owner = load_key_file(user.key).public_key

    # A good root whose sub-directory, two levels down, names a path that climbs out.
    evil_leaf = seal_body(head([file_entry("../../../escaped", file_address, 24)]), owner)
    [leaf] = store_blobs(net, user, [evil_leaf], tmp_path)
    middle = seal_body(head([file_entry("fine", file_address, 24), dir_entry("deeper", leaf)]), owner)
    [mid] = store_blobs(net, user, [middle], tmp_path)
    root = seal_body(head([file_entry("ok", file_address, 24), dir_entry("sub", mid)], name="innocent"), owner)
    absolute = seal_body(head([file_entry("/tmp/escaped-absolute", file_address, 24)]), owner)
    twice = seal_body(head([file_entry("same", file_address, 24), file_entry("same", file_address, 24)]), owner)
    addresses = store_blobs(net, user, [root, absolute, twice], tmp_path)

    work = tmp_path / "work"
    work.mkdir()
    for address in addresses:
        target = work / "target"
        r = user.cli("get", "-r", address, "-o", str(target), check=False)
        assert r.returncode == 1 and "bad name" in r.stderr, r.stderr
        assert not target.exists()
    assert sorted(p.name for p in work.iterdir()) == []
    assert not (tmp_path / "escaped").exists() and not Path("/tmp/escaped-absolute").exists()
    # `ls` refuses it the same way.
    r = user.cli("ls", addresses[1], check=False)
    assert r.returncode == 1 and "bad name" in r.stderr


def test_put_reads_stdin(one_copy_network: LocalNetwork, tmp_path: Path) -> None:
    user = User(one_copy_network, tmp_path, "stdin")
    data = os.urandom(200_000)
    r = subprocess.run([sys.executable, "-m", "dsss.client", "--server", one_copy_network.url, "--key", str(user.key),
                        "put", "-", "--name", "notes\t.bin", "--part-size", "64K"], input=data,
                       env=child_env({"HOME": str(user.home)}), capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    address, dash = r.stdout.decode().split()
    assert dash == "-"
    out = tmp_path / "back"
    user.cli("get", address, "-o", str(out))
    assert out.read_bytes() == data
    files = user.json("ls")["files"]
    # A control character in the name is kept as `?`, as for any stored file's name.
    assert files[-1]["name"] == "notes?.bin" and files[-1]["size"] == len(data) and files[-1]["parts"] == 4
    # Without --name the file is called `stdin`; an empty stdin is an empty file.
    r = subprocess.run([sys.executable, "-m", "dsss.client", "--server", one_copy_network.url, "--key", str(user.key),
                        "--json", "put", "-"], input=b"", env=child_env({"HOME": str(user.home)}),
                       capture_output=True, timeout=60)
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and doc["name"] == "stdin" and doc["size"] == 0
    # A name that is a path is refused before anything is read or stored.
    bad = user.cli("put", "-", "--name", "a/b", check=False)
    assert bad.returncode == 2 and "one path component" in bad.stderr
    assert user.cli("put", "-", str(out), check=False).returncode == 2


def test_the_catalog_is_backed_up_and_restored(one_copy_network: LocalNetwork, tmp_path: Path) -> None:
    user = User(one_copy_network, tmp_path, "laptop")
    a = tmp_path / "a.txt"
    a.write_bytes(b"a")
    tree = tmp_path / "tree"
    (tree / "x").mkdir(parents=True)
    (tree / "x" / "b").write_bytes(b"b")
    addr_a = user.put(a)
    addr_tree = user.cli("put", "-r", str(tree)).stdout.split()[0]
    before = user.json("ls")["files"]

    r = user.cli("catalog", "backup")
    backup = r.stdout.strip()
    assert is_block_id(backup) and "keep this address" in r.stderr
    catalog_file = Path(str(user.key) + ".catalog")
    catalog_file.unlink()  # the laptop is lost; the key was kept

    doc = user.json("catalog", "restore", backup)
    assert doc["restored"] == 2 and doc["present"] == 0
    after = user.json("ls")["files"]
    assert [(f["address"], f["name"], f.get("type")) for f in after] == [
        (f["address"], f["name"], f.get("type")) for f in before]
    assert {addr_a, addr_tree} == {f["address"] for f in after}
    assert user.json("catalog", "restore", backup)["restored"] == 0  # nothing twice

    # Another key cannot read it; a file that is not a backup is refused.
    other = User(one_copy_network, tmp_path, "thief")
    r = other.cli("catalog", "restore", backup, check=False)
    assert r.returncode == 6
    r = user.cli("catalog", "restore", addr_a, check=False)
    assert r.returncode == 1 and "not a DSSS catalog backup" in r.stderr
    empty = User(one_copy_network, tmp_path, "empty")
    assert empty.cli("catalog", "backup", check=False).returncode == 2


def gateway_request(gw: Any, method: str, path: str, body: bytes = b"") -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Authorization": f"Bearer {gw.token}"})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, json.loads(data) if resp.getheader("content-type", "").startswith("application/json") else data
    finally:
        conn.close()


def test_the_gateway_refuses_a_path_where_a_name_is_expected(
        one_copy_network: LocalNetwork, tmp_path: Path) -> None:
    from tests.integration.test_gateway import Gateway

    user = User(one_copy_network, tmp_path, "gw")
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "f").write_bytes(b"f")
    dir_address = user.cli("put", "-r", str(tree)).stdout.split()[0]
    gw = Gateway(one_copy_network, tmp_path, key=user.key)
    try:
        lines_before = Path(str(user.key) + ".catalog").read_bytes()
        for name in ("photos/2024/a.jpg", "../../etc/passwd", "/etc/passwd", "..", ".", "a%00b", "x" * 256):
            status, doc = gateway_request(gw, "PUT", f"/files?name={name}", b"data")
            assert status == 400 and doc["code"] == "bad-request" and "one path component" in doc["error"], (name, doc)
        assert Path(str(user.key) + ".catalog").read_bytes() == lines_before  # nothing stored
        status, doc = gateway_request(gw, "PUT", "/files?name=a.jpg", b"data")
        assert status == 201 and doc["name"] == "a.jpg"
        status, doc = gateway_request(gw, "GET", f"/files/{doc['address']}")
        assert status == 200 and doc == b"data"
        status, doc = gateway_request(gw, "GET", f"/files/{dir_address}")
        assert status == 400 and doc["code"] == "is-a-directory"
    finally:
        gw.stop()
