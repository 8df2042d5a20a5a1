"""The client's catalog, config file, rendering, and the check/repair/share logic over an
in-memory network (no sockets, no reactor: every fake answers at once)."""

from __future__ import annotations

import json
import os
import random
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Coroutine

import pytest
from nacl.public import PrivateKey
from twisted.internet import defer
from twisted.python.failure import Failure

from dsss.client import catalog
from dsss.client.cli import CommandLineError, build_parser, wants_json
from dsss.client.commands.files import parse_recipient
from dsss.client.config import (
    DEFAULT_SERVER,
    ConfigError,
    FileConfig,
    config_location,
    load_config,
    parse_config,
    resolve,
    settings_from,
)
from dsss.client.discovery import Introduction
from dsss.client.maintenance import repair, share, survey
from dsss.client.render import PutDisplay, human_size, table
from dsss.client.session import Session
from dsss.crypto.manifest import Manifest, PartRef, open_manifest, seal_manifest
from dsss.crypto.parts import encrypt_part
from dsss.errors import BadRequest, IntegrityError, NotFound, Unavailable, WrongKey
from dsss.model import PeerAddress, block_hash, matches

A1 = "a" * 64
A2 = "b" * 64


# --- catalog -------------------------------------------------------------------------------------


def entry(address: str = A1, **kw: Any) -> catalog.Entry:
    values: dict[str, Any] = dict(address=address, name="photo.jpg", size=2500, parts=3, created=1_700_000_000)
    values.update(kw)
    return catalog.Entry(**values)


def test_catalog_path_is_beside_the_key() -> None:
    assert catalog.catalog_path(Path("/home/a/.config/dsss/key")) == Path("/home/a/.config/dsss/key.catalog")


def test_catalog_append_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "k.catalog"
    assert catalog.read(path) == ([], 0)
    first = entry()
    shared = entry(A2, kind=catalog.shared_kind("c" * 64), source=A1)
    catalog.append(path, first)
    catalog.append(path, shared)
    assert catalog.read(path) == ([first, shared], 0)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert shared.kind == "shared-to " + "c" * 16 and shared.shared and not first.shared
    lines = path.read_bytes().splitlines()
    assert json.loads(lines[0]) == {"address": A1, "name": "photo.jpg", "size": 2500, "parts": 3,
                                    "created": 1_700_000_000, "kind": "put"}
    assert json.loads(lines[1])["source"] == A1


def test_catalog_tolerates_a_truncated_last_line(tmp_path: Path) -> None:
    path = tmp_path / "k.catalog"
    catalog.append(path, entry())
    with open(path, "ab") as f:
        f.write(entry(A2).to_line()[:30])  # a crash half way through a write
    assert catalog.read(path) == ([entry()], 1)
    catalog.append(path, entry(A2))  # starts on a fresh line
    entries, skipped = catalog.read(path)
    assert [e.address for e in entries] == [A1, A2] and skipped == 1


@pytest.mark.parametrize("line", [
    b"not json",
    b"[]",
    b'{"address": "xyz", "name": "a", "size": 1, "parts": 1, "created": 1}',
    b'{"address": "' + A1.encode() + b'", "name": "a", "size": -1, "parts": 1, "created": 1}',
    b'{"address": "' + A1.encode() + b'", "name": "a", "size": true, "parts": 1, "created": 1}',
    b'{"address": "' + A1.encode() + b'", "name": "a", "size": 1, "parts": 1}',
    b'{"address": "' + A1.encode() + b'", "name": "a", "size": 1, "parts": 1, "created": 1, "kind": "stolen"}',
    b"\xff\xfe",
])
def test_catalog_skips_bad_lines(line: bytes) -> None:
    good = entry().to_line()
    assert catalog.parse_lines(good + line + b"\n" + good) == ([entry(), entry()], 1)


def test_catalog_latest_keeps_one_entry_per_address() -> None:
    old, new, other = entry(name="old"), entry(name="new"), entry(A2)
    assert catalog.latest([old, other, new]) == [new, other]


def test_catalog_entry_rejects_bad_values() -> None:
    with pytest.raises(ValueError):
        entry("A" * 64)
    with pytest.raises(ValueError):
        entry(name="two\nlines")
    with pytest.raises(ValueError):
        entry(name="bell\x07")
    with pytest.raises(ValueError):
        entry(source="nope")


# --- config --------------------------------------------------------------------------------------


def test_config_file_with_every_key(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    text = 'server = "http://192.0.2.10:8470/"\nkey = "~/k"\npart-size = "4M"\nparallel = 8\n'
    conf = parse_config(text, path=path)
    assert conf == FileConfig(path=path, server="http://192.0.2.10:8470", key=Path("~/k").expanduser(),
                              part_size=4 * 1024 * 1024, parallel=8)
    assert parse_config("part-size = 4096\n", path=path).part_size == 4096
    # A relative key path is relative to the config file's directory.
    assert parse_config('key = "keys/work.key"\n', path=path).key == tmp_path / "keys" / "work.key"
    assert parse_config("", path=path) == FileConfig(path=path)


@pytest.mark.parametrize("text, message", [
    ("serverr = 'http://x:1'\n", "unknown setting 'serverr'"),
    ("[section]\nserver = 'x'\n", "unknown setting 'section'"),
    ("server = 'ftp://x:1'\n", "server URL must look like"),
    ("server = 'http://x:99999'\n", "bad port"),
    ("server = 8470\n", "server: the server URL must be a string"),
    ("key = ''\n", "key: must be the path"),
    ("key = 3\n", "key: must be the path"),
    ("part-size = 0\n", "part size must be between"),
    ("part-size = '17M'\n", "part size must be between"),
    ("part-size = 'lots'\n", "not a size"),
    ("part-size = 1.5\n", "part-size: must be"),
    ("part-size = true\n", "part-size: must be"),
    ("parallel = 0\n", "parallel must be"),
    ("parallel = 65\n", "parallel must be"),
    ("parallel = '4'\n", "parallel must be"),
    ("parallel = true\n", "parallel must be"),
    ("server = \n", "not valid TOML"),
])
def test_config_file_errors_name_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.toml"
    with pytest.raises(ConfigError) as e:
        parse_config(text, path=path)
    assert message in str(e.value) and str(path) in str(e.value)
    assert e.value.exit_code == 2


def test_config_location_and_loading(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert config_location(option=None, env={}, home=home) == (home / ".config" / "dsss" / "config.toml", False)
    assert config_location(option=None, env={"DSSS_CONFIG": "/etc/d.toml"}, home=home) == (Path("/etc/d.toml"), True)
    assert config_location(option="/x.toml", env={"DSSS_CONFIG": "/etc/d.toml"}, home=home) == (Path("/x.toml"), True)
    # The default file may be missing; a file named on purpose may not.
    assert load_config(tmp_path / "none.toml", required=False) == FileConfig()
    with pytest.raises(ConfigError, match="no config file at"):
        load_config(tmp_path / "none.toml", required=True)
    bad = tmp_path / "bin.toml"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad, required=True)
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * 70000)
    with pytest.raises(ConfigError, match="larger than"):
        load_config(big, required=True)


def test_precedence_command_line_then_environment_then_file_then_default(tmp_path: Path) -> None:
    home = tmp_path / "home"
    file = FileConfig(path=tmp_path / "c.toml", server="http://10.0.0.1:1", key=tmp_path / "file.key",
                      part_size=8192, parallel=2)
    env = {"DSSS_SERVER": "http://10.0.0.2:2", "DSSS_KEY": str(tmp_path / "env.key")}

    s = resolve(server=None, key=None, part_size=None, parallel=None, env={}, file=FileConfig(), home=home)
    assert (s.server, s.key, s.part_size, s.parallel) == (DEFAULT_SERVER, home / ".config" / "dsss" / "key", 4 << 20, 4)
    assert set(s.sources.values()) == {"default"}

    s = resolve(server=None, key=None, part_size=None, parallel=None, env={}, file=file, home=home)
    assert (s.server, s.key, s.part_size, s.parallel) == ("http://10.0.0.1:1", tmp_path / "file.key", 8192, 2)
    assert s.sources["server"] == f"config file {tmp_path / 'c.toml'}"

    s = resolve(server=None, key=None, part_size=None, parallel=None, env=env, file=file, home=home)
    assert (s.server, s.key) == ("http://10.0.0.2:2", tmp_path / "env.key")
    assert (s.sources["server"], s.sources["key"], s.sources["parallel"]) == ("$DSSS_SERVER", "$DSSS_KEY", s.sources["part-size"])

    s = resolve(server="http://10.0.0.3:3", key="cli.key", part_size="64K", parallel=16, env=env, file=file,
                home=home, erasure="3/5")
    assert (s.server, s.key, s.part_size, s.parallel) == ("http://10.0.0.3:3", Path("cli.key"), 65536, 16)
    assert str(s.erasure) == "3/5"
    assert set(s.sources.values()) == {"command line"}

    # An empty environment variable counts as unset.
    s = resolve(server=None, key=None, part_size=None, parallel=None, env={"DSSS_SERVER": ""}, file=file, home=home)
    assert s.server == "http://10.0.0.1:1"


def test_erasure_from_the_file_and_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    file = parse_config('erasure = "2/4"\n', path=path)
    s = resolve(server=None, key=None, part_size=None, parallel=None, env={}, file=file, home=tmp_path)
    assert str(s.erasure) == "2/4" and s.sources["erasure"] == f"config file {path}"
    s = resolve(server=None, key=None, part_size=None, parallel=None, env={}, file=file, home=tmp_path,
                erasure="off")
    assert s.erasure is None and s.sources["erasure"] == "command line"
    off = parse_config('erasure = "off"\n', path=path)
    assert resolve(server=None, key=None, part_size=None, parallel=None, env={}, file=off,
                   home=tmp_path, erasure=None).erasure is None
    s = resolve(server=None, key=None, part_size=None, parallel=None, env={}, file=FileConfig(), home=tmp_path)
    assert s.erasure is None and s.sources["erasure"] == "default"
    for bad in ('erasure = "4/2"', "erasure = 2", 'erasure = "two"'):
        with pytest.raises(ConfigError, match="erasure"):
            parse_config(bad + "\n", path=path)
    with pytest.raises(ConfigError, match="--erasure"):
        resolve(server=None, key=None, part_size=None, parallel=None, env={}, file=FileConfig(),
                home=tmp_path, erasure="1/1")


def test_bad_values_from_the_command_line_and_environment(tmp_path: Path) -> None:
    kw: dict[str, Any] = dict(server=None, key=None, part_size=None, parallel=None, env={}, file=FileConfig(), home=tmp_path)
    with pytest.raises(BadRequest, match="part size"):
        resolve(**{**kw, "part_size": "0"})
    with pytest.raises(BadRequest, match="parallel"):
        resolve(**{**kw, "parallel": 0})
    with pytest.raises(BadRequest, match="server URL"):
        resolve(**{**kw, "server": "192.0.2.1:8470"})
    with pytest.raises(ConfigError, match=r"\$DSSS_SERVER"):
        resolve(**{**kw, "env": {"DSSS_SERVER": "nope"}})


def test_settings_from_reads_the_file_in_home(tmp_path: Path) -> None:
    conf = tmp_path / ".config" / "dsss" / "config.toml"
    conf.parent.mkdir(parents=True)
    conf.write_text("parallel = 9\n")
    s = settings_from(config_option=None, server=None, key=None, part_size=None, parallel=None, env={}, home=tmp_path)
    assert s.parallel == 9 and s.config_file == conf


# --- command line and rendering ------------------------------------------------------------------


def test_json_flag_before_or_after_the_command() -> None:
    p = build_parser()
    assert p.parse_args(["--json", "ls"]).json is True
    assert p.parse_args(["ls", "--json"]).json is True
    assert p.parse_args(["ls"]).json is False
    assert wants_json(["put", "--json", "x"]) and not wants_json(["put", "--", "--json"])


def test_recipient_from_hex_or_file(tmp_path: Path) -> None:
    pk = PrivateKey.generate().public_key
    hexkey = bytes(pk).hex()
    assert parse_recipient(hexkey) == pk
    f = tmp_path / "bob.pub"
    f.write_text(f"# Bob\n{hexkey}\n")
    assert parse_recipient(str(f)) == pk
    priv = tmp_path / "key"
    priv.write_text("# DSSS private key\ndsss-key-v1 " + "11" * 32 + "\n")
    with pytest.raises(CommandLineError, match="private key file"):
        parse_recipient(str(priv))
    with pytest.raises(CommandLineError, match="neither a public key"):
        parse_recipient("g" * 64)
    f.write_text("hello\n")
    with pytest.raises(CommandLineError, match="does not hold a public key"):
        parse_recipient(str(f))


def test_human_sizes_and_tables() -> None:
    assert [human_size(n) for n in (0, 1023, 1024, 1536, 5 << 20, 3 << 40)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 KiB", "5.0 MiB", "3.0 TiB"]
    assert table(["A", "NUM", "LAST"], [["xyz", "1", "tail end"], ["q", "100", "z"]], right=[1]) == [
        "A    NUM  LAST", "xyz    1  tail end", "q    100  z"]


def test_put_summary_line() -> None:
    now = [100.0]
    d = PutDisplay([3 << 20, 1 << 20], enabled=False, clock=lambda: now[0])
    d.end_file(3 << 20)
    d.end_file(1 << 20)
    now[0] = 102.0
    assert d.summary() == "stored 2 files, 4.0 MiB in 2.0 s (2.0 MiB/s)"


# --- survey, repair and share over an in-memory network -----------------------------------------


def result_of(coro: Coroutine[Any, Any, Any]) -> Any:
    """The result of a coroutine whose fakes all answer at once; fails loudly if it waits."""
    d = defer.ensureDeferred(coro)
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the coroutine did not finish"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


@dataclass
class FakeNetwork:
    """Agents as dicts of blobs; `live` says who the server still counts."""

    agents: dict[PeerAddress, dict[str, bytes]] = field(default_factory=dict)
    live: set[PeerAddress] = field(default_factory=set)
    replicas: int = 3
    uploads: list[tuple[PeerAddress, str]] = field(default_factory=list)

    def add_agents(self, n: int) -> list[PeerAddress]:
        new = [PeerAddress("127.0.0.1", 40000 + len(self.agents) + i) for i in range(n)]
        for a in new:
            self.agents[a] = {}
            self.live.add(a)
        return new

    # DiscoveryClient
    async def who_has(self, block: str) -> list[PeerAddress]:
        return [a for a in sorted(self.live) if block in self.agents[a]]

    async def where_to_upload(self, size: int, exclude: list[PeerAddress] | None = None,
                              count: int | None = None) -> list[PeerAddress]:
        free = [a for a in sorted(self.live) if a not in (exclude or [])]
        if not free:
            raise Unavailable(f"server: no live agent has room for {size} bytes")
        return free[: count or self.replicas]

    async def introduce_me(self, to: PeerAddress, block: str, size: int, from_: PeerAddress) -> Introduction:
        return Introduction("k" * 32, "00" * 32, to)

    # As DiscoveryClient's against a server without /api/upload-to: the client falls back to
    # where_to_upload and one introduce_me per agent (PlacingNetwork and SharePlacingNetwork in
    # test_client_flows answer them).
    async def upload_to(self, block: str, size: int, from_: PeerAddress, *, copies: int,
                        exclude: list[PeerAddress] | None = None, chain: bool = False) -> None:
        return None

    async def upload_shares(self, blocks: list[str], size: int, from_: PeerAddress,
                            exclude: list[PeerAddress] | None = None) -> None:
        return None

    # As DiscoveryClient's against a server that does not audit: no list of proven holders,
    # and no audits (every copy is taken on its receipt).
    async def locate(self, block: str) -> tuple[list[PeerAddress], None]:
        return await self.who_has(block), None

    async def audit(self, items: list[tuple[str, str]]) -> None:
        return None

    # PeerNetwork
    public_address = PeerAddress("127.0.0.1", 1)

    async def upload(self, intro: Introduction, block: str, data: bytes) -> None:
        assert matches(block, data)
        self.agents[intro.address][block] = data
        self.uploads.append((intro.address, block))

    async def download(self, intro: Introduction, block: str, *, verify: bool = True) -> bytes:
        data = self.agents[intro.address].get(block)
        if data is None:
            raise NotFound("this agent does not store that part")
        if not matches(block, data):
            del self.agents[intro.address][block]  # quarantined, as a real agent does
            raise IntegrityError(f"part {block} is corrupt on disk; moved to quarantine")
        return data

    def session(self) -> Session:
        return Session(discovery=self, peers=self, replicas=self.replicas, parallel=2,  # type: ignore[arg-type]
                       rng=random.Random(1))

    def store(self, block: str, data: bytes, on: list[PeerAddress]) -> None:
        for a in on:
            self.agents[a][block] = data


OWNER = PrivateKey.generate()


def stored_file(net: FakeNetwork, nparts: int, holders: list[PeerAddress]) -> tuple[str, list[str]]:
    key, file_id = secrets.token_bytes(32), secrets.token_bytes(16)
    refs, hashes = [], []
    for i in range(nparts):
        c = encrypt_part(key, file_id, i, os.urandom(100))
        h = block_hash(c)
        net.store(h, c, holders)
        refs.append(PartRef(h, len(c), 100))
        hashes.append(h)
    m = Manifest(name="f.bin", size=100 * nparts, part_size=100, file_id=file_id, parts=tuple(refs), created=1)
    blob = seal_manifest(m, key, OWNER.public_key)
    address = block_hash(blob)
    net.store(address, blob, holders)
    return address, hashes


def test_survey_counts_holders_and_verify_finds_bad_copies() -> None:
    net = FakeNetwork()
    a, b, c, d = net.add_agents(4)
    address, parts = stored_file(net, 3, [a, b, c])
    health = result_of(survey(net.session(), address, OWNER))
    assert health.ok and health.part_counts() == [3, 3, 3] and len(health.blocks) == 4

    net.live.discard(a)
    net.agents[b][parts[0]] = b"rotten"
    health = result_of(survey(net.session(), address, OWNER))
    assert not health.ok and health.part_counts() == [2, 2, 2]  # who-has cannot see rot
    health = result_of(survey(net.session(), address, OWNER, verify=True))
    assert health.part_counts() == [1, 2, 2]
    bad = health.blocks[1]
    assert bad.verdicts == {b: "corrupt", c: "ok"} and bad.keep == [c]

    with pytest.raises(WrongKey):
        result_of(survey(net.session(), address, PrivateKey.generate()))
    with pytest.raises(NotFound):
        result_of(survey(net.session(), "f" * 64, OWNER))


def test_repair_copies_short_blocks_to_new_agents_only() -> None:
    net = FakeNetwork()
    a, b, c, d = net.add_agents(4)
    address, parts = stored_file(net, 2, [a, b, c])
    net.live.discard(a)
    session = net.session()
    health = result_of(survey(session, address, OWNER))
    results = result_of(repair(session, health))
    assert sorted(r.block.hash for r in results) == sorted([address, *parts])
    assert all(r.added == [d] and r.error is None for r in results)
    assert sorted(net.uploads) == sorted((d, h) for h in [address, *parts])
    assert result_of(survey(session, address, OWNER)).ok
    # Nothing to do now.
    assert result_of(repair(session, result_of(survey(session, address, OWNER)))) == []


def test_repair_reports_too_few_agents_and_lost_blocks() -> None:
    net = FakeNetwork()
    a, b, c = net.add_agents(3)
    address, parts = stored_file(net, 2, [a, b, c])
    net.live.discard(a)
    del net.agents[b][parts[1]]
    del net.agents[c][parts[1]]
    session = net.session()
    health = result_of(survey(session, address, OWNER))
    results = {r.block.hash: r for r in result_of(repair(session, health))}
    assert results[parts[1]].lost and "no healthy replica" in (results[parts[1]].error or "")
    short = results[parts[0]]
    assert not short.lost and short.added == []
    assert "could not add 1 more" in (short.error or "") and "no live agent has room" in (short.error or "")
    assert net.uploads == []


def test_share_stores_only_a_new_manifest_for_the_recipient() -> None:
    net = FakeNetwork()
    holders = net.add_agents(3)
    address, parts = stored_file(net, 3, holders)
    friend = PrivateKey.generate()
    new_address, manifest = result_of(share(net.session(), address, OWNER, friend.public_key))
    assert new_address != address and manifest.name == "f.bin"
    assert sorted(net.uploads) == sorted((h, new_address) for h in holders)
    shared_manifest, _ = open_manifest(net.agents[holders[0]][new_address], friend)
    assert [p.hash for p in shared_manifest.parts] == parts
    with pytest.raises(WrongKey):
        open_manifest(net.agents[holders[0]][new_address], OWNER)
