# -*- test-case-name: tests.unit.test_tree -*-
"""put -r and get -r (dsss.client.tree) against the in-memory network of
test_client_catalog_config: the walk, the round trip of names, sizes, modes and times, large
directories split into continuations, what is on disk already, and hostile trees."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest
from nacl.public import PrivateKey

from dsss.client import tree
from dsss.crypto import directory as d
from dsss.crypto.manifest import open_manifest
from dsss.errors import RemoteProtocolError
from dsss.model import block_hash
from tests.support.hostile_tree import dir_entry, file_entry, head, seal_body
from tests.unit.test_client_catalog_config import FakeNetwork, result_of

OWNER = PrivateKey.generate()


def make_tree(base: Path) -> Path:
    root = base / "src"
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "top.txt").write_bytes(b"top")
    (root / "a" / "ünï cødé").write_bytes(os.urandom(5000))
    (root / "a" / "b" / "-dash").write_bytes(b"")
    (root / "a" / "b" / "c" / ("é" * 127 + "x")).write_bytes(os.urandom(40_000))  # two parts of 32 KiB
    (root / "a" / "b" / "c" / "ro").write_bytes(b"read only")
    os.chmod(root / "a" / "b" / "c" / "ro", 0o444)
    os.chmod(root / "a" / "b", 0o750)
    os.utime(root / "top.txt", ns=(1, 1_600_000_000_123_456_789))
    os.utime(root / "a", ns=(1, 1_500_000_000_000_000_001))
    return root


def snapshot(root: Path) -> dict[str, tuple[str, int, int, int, bytes]]:
    """Every path below root: kind, size, mode, mtime (ns) and content (files)."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = os.lstat(path)
        rel = str(path.relative_to(root))
        if stat.S_ISDIR(st.st_mode):
            out[rel] = ("d", 0, stat.S_IMODE(st.st_mode), st.st_mtime_ns, b"")
        else:
            out[rel] = ("f", st.st_size, stat.S_IMODE(st.st_mode), st.st_mtime_ns, path.read_bytes())
    return out


def network() -> FakeNetwork:
    net = FakeNetwork()
    net.add_agents(4)
    return net


def put(net: FakeNetwork, root: Path, per_blob: int = d.ENTRIES_PER_BLOB) -> tree.PutTreeResult:
    top, _skipped = tree.scan_tree(root)
    return result_of(tree.put_tree(net.session(), top, owner=OWNER.public_key, part_size=32 * 1024,
                                    per_blob=per_blob))


def get(net: FakeNetwork, address: str, target: Path, force: bool = False) -> tree.GetTreeResult:
    remote = result_of(tree.fetch_tree(net.session(), address, OWNER))
    return result_of(tree.get_tree(net.session(), remote, target, key=OWNER, force=force))


def test_a_tree_round_trips_with_names_sizes_modes_and_times(tmp_path: Path) -> None:
    net = network()
    root = make_tree(tmp_path)
    before = snapshot(root)
    stored = put(net, root)
    assert stored.files == 5 and stored.directories == 5 and stored.bytes == 3 + 5000 + 40_000 + 9
    remote = result_of(tree.fetch_tree(net.session(), stored.address, OWNER))
    assert sorted(remote.blobs()) == sorted(stored.blobs) and len(stored.blobs) == 5
    assert sorted("/".join(p) for p, _e in remote.files()) == sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    out = tmp_path / "out"
    got = get(net, stored.address, out)
    assert not got.failures and got.files == 5 and got.directories == 5
    assert snapshot(out) == before
    assert stat.S_IMODE(os.stat(out).st_mode) == stat.S_IMODE(os.stat(root).st_mode)
    # No temporary file is left anywhere.
    assert not [p for p in out.rglob("*") if p.name.startswith(".dsss-")]
    # Nothing readable on the agents: not a name, not a byte of a small file.
    for blobs in net.agents.values():
        for blob in blobs.values():
            assert b"top.txt" not in blob and "ünï".encode() not in blob


def test_the_root_directory_is_listed_with_its_entries(tmp_path: Path) -> None:
    net = network()
    root = make_tree(tmp_path)
    stored = put(net, root)
    top = result_of(tree.fetch_directory(net.session(), stored.address, OWNER))
    assert top.name == "src"
    assert [(e.kind, e.name) for e in top.entries] == [("d", "a"), ("d", "empty-dir"), ("f", "top.txt")]
    sub = next(e for e in top.entries if e.name == "a")
    assert sub.size == 5000 + 40_000 + 9 and sub.mtime == 1_500_000_000_000_000_001
    # A file address is not a directory; an entry's address opens as that file's manifest.
    f = next(e for e in top.entries if e.name == "top.txt")
    with pytest.raises(d.NotDirectory, match="is a file"):
        result_of(tree.fetch_directory(net.session(), f.address, OWNER))
    assert isinstance(result_of(tree.fetch_entry(net.session(), sub.address, OWNER)), d.Directory)
    blob = next(b[f.address] for b in net.agents.values() if f.address in b)
    assert open_manifest(blob, OWNER)[0].size == 3


def test_links_and_special_files_are_skipped_not_followed(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    secret = tmp_path / "secret"
    secret.write_bytes(b"outside the tree")
    (root / "link").symlink_to(secret)
    (root / "dirlink").symlink_to(tmp_path)
    os.mkfifo(root / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock"))
    (root / "real").write_bytes(b"x")
    top, skipped = tree.scan_tree(root)
    sock.close()
    assert [f.name for f in top.files] == ["real"] and top.dirs == []
    assert sorted((s.path.name, s.why) for s in skipped) == [
        ("dirlink", "symbolic link"), ("fifo", "FIFO"), ("link", "symbolic link"), ("sock", "socket")]
    # The root given may itself be a link to a directory.
    (tmp_path / "rootlink").symlink_to(root)
    assert [f.name for f in tree.scan_tree(tmp_path / "rootlink")[0].files] == ["real"]


def test_a_name_that_is_not_utf8_stops_the_put_before_anything_is_stored(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    (root / "fine").write_bytes(b"x")
    with open(os.fsencode(root) + b"/bad\xff", "wb"):
        pass
    with pytest.raises(tree.UnstorableTree, match=r"bad\\xff.*Nothing was stored"):
        tree.scan_tree(root)


def test_large_directories_are_split_and_restored(tmp_path: Path) -> None:
    net = network()
    root = tmp_path / "src"
    root.mkdir()
    for i in range(23):
        (root / f"f{i:02d}").write_bytes(bytes([i]) * i)
    stored = put(net, root, per_blob=5)
    assert len(stored.blobs) == 5  # one head and four continuations
    remote = result_of(tree.fetch_tree(net.session(), stored.address, OWNER))
    assert sorted(remote.blobs()) == sorted(stored.blobs) and remote.blobs()[0] == stored.address
    out = tmp_path / "out"
    assert get(net, stored.address, out).files == 23
    assert snapshot(out) == snapshot(root)


def test_existing_files_are_kept_unless_forced(tmp_path: Path) -> None:
    net = network()
    root = make_tree(tmp_path)
    stored = put(net, root)
    out = tmp_path / "out"
    out.mkdir()
    (out / "top.txt").write_bytes(b"mine")
    with pytest.raises(tree.PathExists, match="top.txt exist.*nothing was written.*--force"):
        get(net, stored.address, out)
    assert [p.name for p in out.iterdir()] == ["top.txt"]  # nothing else was made
    assert (out / "top.txt").read_bytes() == b"mine"
    got = get(net, stored.address, out, force=True)
    assert got.replaced == 1 and (out / "top.txt").read_bytes() == b"top"
    # A directory of the tree that is a file (or a link) on disk is never replaced.
    out2 = tmp_path / "out2"
    out2.mkdir()
    (out2 / "a").symlink_to(tmp_path)
    with pytest.raises(tree.PathExists, match="symbolic link"):
        get(net, stored.address, out2, force=True)
    out3 = tmp_path / "out3"
    (out3 / "top.txt").mkdir(parents=True)
    with pytest.raises(tree.PathExists, match="is a directory on disk"):
        get(net, stored.address, out3, force=True)
    (tmp_path / "afile").write_bytes(b"")
    with pytest.raises(tree.PathExists, match="not a directory"):
        get(net, stored.address, tmp_path / "afile")


def store(net: FakeNetwork, blob: bytes) -> str:
    address = block_hash(blob)
    net.store(address, blob, list(net.agents)[:3])
    return address


def test_hostile_trees_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    net = network()
    file_blob = None
    root = tmp_path / "one"
    root.mkdir()
    (root / "x").write_bytes(b"payload")
    one = put(net, root)
    x = result_of(tree.fetch_directory(net.session(), one.address, OWNER)).entries[0]
    # A name that climbs out: refused when the directory is opened.
    evil = store(net, seal_body(head([file_entry("../../escaped", x.address, 7)]), OWNER.public_key))
    target = tmp_path / "target"
    with pytest.raises(RemoteProtocolError, match="bad name"):
        result_of(tree.fetch_tree(net.session(), evil, OWNER))
    # The same sub-directory twice (a tree that would grow without bound as a DAG).
    sub = store(net, seal_body(head([file_entry("f", x.address, 7)]), OWNER.public_key))
    twice = store(net, seal_body(head([dir_entry("a", sub), dir_entry("b", sub)]), OWNER.public_key))
    with pytest.raises(RemoteProtocolError, match="twice"):
        result_of(tree.fetch_tree(net.session(), twice, OWNER))
    # A size that does not match the file: that file fails, leaving nothing.
    liar = store(net, seal_body(head([file_entry("f", x.address, 999)]), OWNER.public_key))
    got = get(net, liar, target)
    assert got.files == 0 and len(got.failures) == 1 and "999" in str(got.failures[0][1])
    assert list(target.iterdir()) == []
    assert not (tmp_path / "escaped").exists() and file_blob is None
