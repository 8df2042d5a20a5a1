"""The real CLI against real twistd processes: put, get, and what goes wrong."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dsss.model import block_hash, is_block_id
from tests.conftest import run_with_terminal_stderr, start_network

pytestmark = [pytest.mark.integration]

PART = 64 * 1024


def _put(net, path: Path, *extra: str) -> str:
    r = net.client("put", *extra, str(path))
    line = r.stdout.decode().strip().splitlines()
    assert len(line) == 1
    address = line[0].split()[0]
    assert is_block_id(address)
    return address


@pytest.mark.parametrize("size", [0, 1, PART, PART + 1, 3 * PART - 7])
def test_round_trip_sizes(shared_network, tmp_path, size):
    net = shared_network
    src = tmp_path / "in.bin"
    src.write_bytes(os.urandom(size))
    address = _put(net, src, "--part-size", str(PART))
    out = tmp_path / "out.bin"
    net.client("get", address, "-o", str(out))
    assert out.read_bytes() == src.read_bytes()
    # The manifest is on the network: who-has lists its replicas.
    code, doc = net.http(f"/api/who-has?q={address}")
    assert code == 200 and len(doc["addresses"]) == 3


def test_fifty_mib_round_trip_and_stdout(shared_network, tmp_path):
    net = shared_network
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(50 * 1024 * 1024))
    address = _put(net, src)
    out = tmp_path / "big.out"
    net.client("get", address, "-o", str(out))
    assert block_hash(out.read_bytes()) == block_hash(src.read_bytes())
    r = net.client("get", address, "-o", "-")
    assert block_hash(r.stdout) == block_hash(src.read_bytes())
    # Nothing but ciphertext reached the agents: no stored part contains a plaintext window.
    probe = src.read_bytes()[1000:1064]
    for agent in net.agents:
        for f in (agent.storage / "blocks").rglob("*"):
            if f.is_file():
                assert probe not in f.read_bytes()


def test_put_many_files_prints_each_address(shared_network, tmp_path):
    net = shared_network
    files = []
    for i in range(3):
        f = tmp_path / f"f{i}.txt"
        f.write_bytes(f"file {i}\n".encode() * (i + 1))
        files.append(f)
    r = net.client("put", *map(str, files))
    lines = r.stdout.decode().splitlines()
    assert len(lines) == 3
    for f, line in zip(files, lines):
        address, name = line.split(" ", 1)
        assert name == str(f)
        out = tmp_path / (f.name + ".out")
        net.client("get", address, "-o", str(out))
        assert out.read_bytes() == f.read_bytes()


def test_other_users_key_fails_cleanly_and_leaves_no_file(shared_network, tmp_path):
    net = shared_network
    src = tmp_path / "secret.txt"
    src.write_bytes(b"for my eyes only\n")
    address = _put(net, src)
    other = tmp_path / "other.key"
    net.client("keygen", key=other)
    out = tmp_path / "stolen.txt"
    r = net.client("get", address, "-o", str(out), key=other, check=False)
    assert r.returncode != 0
    assert "this file was not stored for your key" in r.stderr.decode()
    assert len(r.stderr.decode().strip().splitlines()) == 1
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".stolen")]


def test_unknown_address_and_bad_input(shared_network, tmp_path):
    net = shared_network
    r = net.client("get", "c" * 64, "-o", str(tmp_path / "x"), check=False)
    assert r.returncode != 0 and "unknown address" in r.stderr.decode()
    assert not (tmp_path / "x").exists()
    for bad in ("not-an-address", "s" + "c" * 64):  # a share ID is no file address
        r = net.client("get", bad, "-o", str(tmp_path / "x"), check=False)
        assert r.returncode == 2 and "not a file address" in r.stderr.decode()
    r = net.client("put", str(tmp_path / "missing"), check=False)
    assert r.returncode == 2 and "no such file" in r.stderr.decode()


def test_server_unreachable_is_one_clear_line(shared_network, tmp_path):
    net = shared_network
    src = tmp_path / "a"
    src.write_bytes(b"a")
    r = net.client("--server", "http://127.0.0.1:9", "put", str(src), check=False)
    # --server given twice: the last one wins with argparse.
    assert r.returncode != 0
    err = r.stderr.decode().strip()
    assert "cannot reach the discovery server" in err and "Traceback" not in err


def test_keygen_refuses_to_overwrite(tmp_path, shared_network):
    key = tmp_path / "k"
    r1 = shared_network.client("keygen", key=key)
    assert len(r1.stdout.decode().strip()) == 64
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    before = key.read_bytes()
    r2 = shared_network.client("keygen", key=key, check=False)
    assert r2.returncode != 0 and "refusing to overwrite" in r2.stderr.decode()
    assert key.read_bytes() == before


def _corrupt_all(agent) -> int:
    n = 0
    for f in (agent.storage / "blocks").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and not f.name.endswith(".tree"):
            data = bytearray(f.read_bytes())
            data[len(data) // 2] ^= 0x01
            f.write_bytes(bytes(data))
            n += 1
    return n


def test_get_survives_a_killed_agent_and_corrupt_replicas(make_network, tmp_path):
    net = start_network(make_network(heartbeat=0.5), agents=3)
    net.client("keygen")
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(5 * PART + 3))
    address = _put(net, src, "--part-size", str(PART))

    # With one agent killed, every part still has two replicas.
    net.agents[0].kill()
    out = tmp_path / "out1"
    net.client("get", address, "-o", str(out))
    assert out.read_bytes() == src.read_bytes()

    # Corrupt every part on agent2: whichever replica the client tries first, it gets good bytes.
    assert _corrupt_all(net.agents[1]) == 7  # 6 parts and the manifest
    out2 = tmp_path / "out2"
    net.client("get", address, "-o", str(out2))
    assert out2.read_bytes() == src.read_bytes()

    # Now only corrupt copies remain: a clean failure, no output, and the corrupt manifest
    # (asked for first) is moved to quarantine instead of being served.
    net.agents[2].kill()
    out3 = tmp_path / "out3"
    r = net.client("get", address, "-o", str(out3), check=False)
    assert r.returncode != 0
    err = r.stderr.decode()
    # Either the corrupt manifest is refused now, or it was already quarantined during the
    # previous get (and reported gone), leaving no holder at all.
    # (A file this key's catalog records as stored, with no holder left, is "offline": exit 8.)
    assert "corrupt on every replica" in err or "no agent holding it is online now" in err, err
    assert len(err.strip().splitlines()) == 1
    assert not out3.exists()
    quarantined = [p.name.split(".")[0] for p in (net.agents[1].storage / "quarantine").iterdir()]
    assert address in quarantined
    assert not net.agents[1].storage.joinpath("blocks", address[:2], address[2:4], address).exists()


def test_progress_bar_on_a_terminal_and_silence_on_a_pipe(shared_network, tmp_path):
    import sys

    from tools.harness import child_env

    net = shared_network
    src = tmp_path / "p.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024))
    # On a pipe: stdout has the address line only, stderr stays empty.
    r = net.client("put", str(src))
    assert r.stderr == b""
    assert len(r.stdout.decode().splitlines()) == 1

    # On a terminal: a tqdm bar with a byte rate.
    cmd = [sys.executable, "-m", "dsss.client", "--server", net.url, "--key", str(net.key), "put", str(src)]
    code, out, text = run_with_terminal_stderr(cmd, child_env())
    assert code == 0
    assert len(out.decode().split()[0]) == 64
    assert "p.bin" in text and "B/s" in text, text


def test_verbose_says_which_path_reached_each_agent(shared_network, tmp_path):
    net = shared_network
    f = tmp_path / "v"
    f.write_bytes(os.urandom(1000))
    live = net.live_addresses()
    # A file this small is one block (its manifest). With a chain the client sends it to the
    # first agent only, which passes it on; without (the default on loopback) to each of three.
    # Either way the put then takes its leases on each of the three holders.
    sent = {}
    for options in (("--chain",), (), ("--no-chain",)):
        r = net.client("-v", *options, "put", str(f))
        lines = [ln for ln in r.stderr.decode().splitlines() if ln.startswith("dsss: path ")]
        assert len(lines) == 3 and len(set(lines)) == len(lines)
        uploaded = [ln.split() for ln in r.stderr.decode().splitlines() if ln.startswith("dsss: uploaded ")]
        assert len(uploaded) == 1 and uploaded[0][4] == "3"  # dsss: uploaded N bytes, 3 copies stored
        sent[options] = int(uploaded[0][2])
        for ln in lines:
            _, _, address, path = ln.split()
            assert path == "direct" and address in live
        code, doc = net.http(f"/api/who-has?q={r.stdout.split()[0].decode()}")
        assert code == 200 and len(doc["addresses"]) == 3
    # The chain sent the blob once, the others three times (blobs of about the same size).
    assert sent[()] == sent[("--no-chain",)]
    assert 2 * sent[("--chain",)] < sent[()] < 4 * sent[("--chain",)]


def test_get_many_addresses_into_a_directory(shared_network, tmp_path):
    net = shared_network
    src = tmp_path / "src"
    src.mkdir()
    sizes = {"empty": 0, "one": 1, "note.txt": 4096, "sixteen": 16 * 1024, "parts.bin": 3 * PART + 5}
    for name, size in sizes.items():
        (src / name).write_bytes(os.urandom(size))
    names = list(sizes)
    r = net.client("put", "--part-size", str(PART), *(str(src / n) for n in names))
    addresses = [line.split()[0] for line in r.stdout.decode().splitlines()]
    assert len(addresses) == len(names)

    out = tmp_path / "out"
    out.mkdir()
    (out / "note.txt").write_bytes(b"an older note, replaced")
    # An existing file is not replaced without --force; nothing else is written then.
    r = net.client("get", *addresses, "-o", str(out), check=False)
    assert r.returncode == 2 and f"{out / 'note.txt'} exists; give --force to replace it" in r.stderr.decode()
    assert (out / "note.txt").read_bytes() == b"an older note, replaced"
    for n in names:
        if n != "note.txt":
            (out / n).unlink()
    # An address given twice is fetched once.
    r = net.client("get", *addresses, addresses[0], "-o", str(out), "--force")
    assert r.stderr == b""
    assert r.stdout.decode().splitlines() == [f"{a} {out / n}" for a, n in zip(addresses, names)]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # no temporary file left
    for n in names:
        assert (out / n).read_bytes() == (src / n).read_bytes()

    # --json: one object per file, in the order given; one address into a directory works too.
    out2 = tmp_path / "out2"
    out2.mkdir()
    r = net.client("--json", "get", addresses[2], "-o", str(out2))
    doc = json.loads(r.stdout)
    assert doc["name"] == "note.txt" and doc["output"] == str(out2 / "note.txt") and doc["inline"] is True
    assert (out2 / "note.txt").read_bytes() == (src / "note.txt").read_bytes()


def test_get_many_reports_each_failure_and_writes_only_whole_files(shared_network, tmp_path):
    net = shared_network
    mine = tmp_path / "mine.txt"
    mine.write_bytes(b"mine\n" * 100)
    theirs = tmp_path / "theirs.txt"
    theirs.write_bytes(b"theirs\n")
    other = tmp_path / "other.key"
    net.client("keygen", key=other)
    a_mine = _put(net, mine)
    a_theirs = net.client("put", str(theirs), key=other).stdout.decode().split()[0]
    unknown = "c" * 64
    out = tmp_path / "out"
    out.mkdir()
    r = net.client("get", a_mine, unknown, a_theirs, "-o", str(out), check=False)
    err = r.stderr.decode().splitlines()
    assert r.returncode == 3, err  # the first failure's code: unknown address
    assert err == [
        f"dsss: error: {unknown}: no file is stored at {unknown} (unknown address)",
        f"dsss: error: {a_theirs}: this file was not stored for your key",
        "dsss: error: fetched 1 of 3 files",
    ]
    assert r.stdout.decode() == f"{a_mine} {out / 'mine.txt'}\n"
    assert [p.name for p in out.iterdir()] == ["mine.txt"]  # nothing half-written
    assert (out / "mine.txt").read_bytes() == mine.read_bytes()

    # --json: the failures are objects too, after the files fetched.
    r = net.client("--json", "get", unknown, a_mine, "-o", str(out), "--force", check=False)
    docs = [json.loads(line) for line in r.stdout.decode().splitlines()]
    assert r.returncode == 3 and docs[0]["address"] == a_mine
    assert docs[1] == {"address": unknown, "error": f"no file is stored at {unknown} (unknown address)",
                       "code": "not-found", "exit-code": 3}

    # Two files of the same name: one is written, the other refused, never mixed.
    same = tmp_path / "sub"
    same.mkdir()
    (same / "mine.txt").write_bytes(b"another file of the same name\n")
    a_same = _put(net, same / "mine.txt")
    out3 = tmp_path / "out3"
    out3.mkdir()
    r = net.client("get", a_mine, a_same, "-o", str(out3), check=False)
    assert r.returncode == 1 and "is also named 'mine.txt'" in r.stderr.decode()
    assert [p.name for p in out3.iterdir()] == ["mine.txt"]
    assert (out3 / "mine.txt").read_bytes() in (mine.read_bytes(), (same / "mine.txt").read_bytes())

    # Command-line mistakes are refused before anything is fetched.
    r = net.client("get", a_mine, a_same, "-o", str(tmp_path / "missing"), check=False)
    assert r.returncode == 2 and "not a directory" in r.stderr.decode()
    r = net.client("get", a_mine, a_same, "-o", "-", check=False)
    assert r.returncode == 2 and "-o - takes one address" in r.stderr.decode()
    r = net.client("get", a_mine, "nope", "-o", str(out3), check=False)
    assert r.returncode == 2 and "not a file address" in r.stderr.decode()


def test_put_with_too_few_agents_is_refused_at_once(make_network, tmp_path):
    # Two agents for three replicas: no file can be stored.
    net = start_network(make_network(heartbeat=0.5, replicas=3), agents=2)
    net.client("keygen")
    files = []
    for i in range(3):
        f = tmp_path / f"f{i}"
        f.write_bytes(os.urandom(100 + i))
        files.append(str(f))
    r = net.client("put", *files, check=False)
    err = r.stderr.decode().strip()
    # Refused at once, before anything is sent: the server says how many agents are live.
    assert r.returncode == 9 and r.stdout == b""
    assert err == "dsss: error: too few agents (have 2, need 3): a new file needs 3 copies of each block"
    assert not net.key.with_name(net.key.name + ".catalog").exists()
