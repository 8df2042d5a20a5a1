"""Every client command through the real CLI (`python -m dsss.client`) against real twistd
processes: ls, info, share between two keys, --json, the config file, check and repair."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dsss.client.cli import build_parser
from dsss.crypto.keys import generate_key_file, public_key_hex
from tools.harness import LocalNetwork, child_env
from dsss.model import block_hash, is_block_id
from tests.conftest import run_with_terminal_stderr, start_network

pytestmark = [pytest.mark.integration]

PART = 64 * 1024
EXIT_DEGRADED = 7


def run_cli(
    *args: str,
    home: Path,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """The CLI with only the given options: no --server/--key unless the test passes them, and
    a private HOME so that no config file or key of the user running the tests is read."""
    full_env = child_env({"HOME": str(home)})
    full_env.pop("DSSS_KEY", None)
    full_env.pop("DSSS_CONFIG", None)
    full_env.update(env or {})
    r = subprocess.run([sys.executable, "-m", "dsss.client", *args], env=full_env,
                       capture_output=True, text=True, timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"client {args} failed ({r.returncode}):\n{r.stderr}")
    return r


class User:
    """One key on one network, driven through the CLI."""

    def __init__(self, net: LocalNetwork, base: Path, name: str) -> None:
        self.net = net
        self.home = base / f"home-{name}"
        self.home.mkdir(parents=True)
        self.key = base / f"{name}.key"
        # Made here rather than through `keygen` (tested on its own) to keep the tests quick.
        self.pubkey = public_key_hex(generate_key_file(self.key))

    def cli(self, *args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return run_cli("--server", self.net.url, "--key", str(self.key), *args,
                       home=self.home, env=env, check=check)

    def json(self, *args: str, check: bool = True) -> Any:
        r = self.cli("--json", *args, check=check)
        return json.loads(r.stdout)

    def put(self, path: Path, *extra: str) -> str:
        r = self.cli("put", *extra, str(path))
        address = r.stdout.split()[0]
        assert is_block_id(address)
        return address


def stored_blocks(net: LocalNetwork) -> list[str]:
    """Every blob on every agent's disk (one entry per replica; not the parts' outboards)."""
    found = []
    for agent in net.agents:
        for f in (agent.storage / "blocks").rglob("*"):
            if f.is_file() and not f.name.endswith(".tree"):
                found.append(f.name)
    return sorted(found)


def holders_of(net: LocalNetwork, block: str) -> list[int]:
    return [i for i, a in enumerate(net.agents)
            if (a.storage / "blocks" / block[:2] / block[2:4] / block).exists()]


# --- ls, info, share -----------------------------------------------------------------------------


def test_ls_lists_what_this_key_stored(shared_network, tmp_path):
    alice = User(shared_network, tmp_path, "alice")
    assert "no files recorded" in alice.cli("ls").stderr
    a = tmp_path / "a\tx.txt"  # a control character: recorded as the manifest keeps it
    a.write_bytes(b"a" * 1500)
    b = tmp_path / "b b.bin"
    b.write_bytes(os.urandom(3 * PART))
    addr_a = alice.put(a)
    addr_b = alice.put(b, "--part-size", "64K")

    out = alice.cli("ls").stdout.splitlines()
    assert out[0].split() == ["NAME", "SIZE", "DATE", "EXPIRES", "ADDRESS"]
    assert len(out) == 3
    assert out[1].startswith("a?x.txt") and "1.5 KiB" in out[1] and out[1].endswith(addr_a)
    assert out[2].startswith("b b.bin") and "192.0 KiB" in out[2] and out[2].endswith(addr_b)

    doc = alice.json("ls")
    assert doc["catalog"] == str(alice.key) + ".catalog"
    files = {f["address"]: f for f in doc["files"]}
    # 1500 bytes travel inside the manifest: no part of their own.
    assert files[addr_a]["name"] == "a?x.txt" and files[addr_a]["size"] == 1500 and files[addr_a]["parts"] == 0
    assert files[addr_b]["parts"] == 3 and files[addr_b]["kind"] == "put"
    # Kept for put's default 90 days: when is recorded.
    assert abs(files[addr_b]["expires"] - (files[addr_b]["created"] + 90 * 86400)) <= 5
    assert doc["skipped-lines"] == 0

    # A line cut short by a crash is skipped with a warning, and the next put still lands.
    catalog = Path(doc["catalog"])
    with open(catalog, "ab") as f:
        f.write(b'{"address": "abc')
    addr_c = alice.put(a)
    r = alice.cli("ls")
    assert "skipped 1 damaged line" in r.stderr
    assert [line.split()[-1] for line in r.stdout.splitlines()[1:]] == [addr_a, addr_b, addr_c]

    # Another key has its own catalog.
    bob = User(shared_network, tmp_path, "bob")
    assert bob.json("ls")["files"] == []


def test_info_shows_the_manifest_and_replicas_found_now(shared_network, tmp_path):
    alice = User(shared_network, tmp_path, "alice")
    src = tmp_path / "three.bin"
    src.write_bytes(os.urandom(2 * PART + 10))
    address = alice.put(src, "--part-size", "64K")

    text = alice.cli("info", address).stdout
    assert "name:      three.bin" in text
    assert f"({2 * PART + 10} bytes)" in text
    assert "part size: 64.0 KiB (65536 bytes)" in text
    assert "parts:     3" in text
    assert "replicas:  manifest 3, parts 3; target 3" in text

    doc = alice.json("info", address)
    assert doc["address"] == address and doc["name"] == "three.bin"
    assert doc["size"] == 2 * PART + 10 and doc["part-size"] == PART and doc["parts"] == 3
    assert doc["replicas"] == {"target": 3, "manifest": 3, "min": 3, "max": 3, "parts": [3, 3, 3]}
    assert len(doc["part-hashes"]) == 3 and all(is_block_id(h) for h in doc["part-hashes"])

    # Someone else's key cannot read the manifest; an unknown address is not found.
    bob = User(shared_network, tmp_path, "bob")
    r = bob.cli("info", address, check=False)
    assert r.returncode == 6 and "not stored for your key" in r.stderr
    r = alice.cli("info", "d" * 64, check=False)
    assert r.returncode == 3 and r.stderr.count("\n") == 1


def test_share_between_two_keys_without_uploading_parts(shared_network, tmp_path):
    net = shared_network
    alice = User(net, tmp_path, "alice")
    bob = User(net, tmp_path, "bob")
    bob_pub = tmp_path / "bob.pub"
    bob_pub.write_text(bob.cli("pubkey").stdout)
    assert bob_pub.read_text().strip() == bob.pubkey

    src = tmp_path / "report.pdf"
    src.write_bytes(os.urandom(4 * PART - 100))
    original = alice.put(src, "--part-size", "64K")
    before = stored_blocks(net)

    r = alice.cli("share", original, "--to", str(bob_pub))
    shared, name = r.stdout.split(" ", 1)
    assert is_block_id(shared) and shared != original and name.strip() == "report.pdf"
    after = stored_blocks(net)
    added = list(after)
    for b in before:
        added.remove(b)
    # Only the new manifest was stored (on 3 agents); no part went up again.
    assert added == [shared] * 3

    # Bob reads the shared address with his own key; the original stays Alice's only.
    out = tmp_path / "bob.pdf"
    bob.cli("get", shared, "-o", str(out))
    assert out.read_bytes() == src.read_bytes()
    r = bob.cli("get", original, "-o", str(tmp_path / "no.pdf"), check=False)
    assert r.returncode == 6 and "not stored for your key" in r.stderr
    r = alice.cli("get", shared, "-o", str(tmp_path / "no2.pdf"), check=False)
    assert r.returncode == 6
    out2 = tmp_path / "alice.pdf"
    alice.cli("get", original, "-o", str(out2))
    assert out2.read_bytes() == src.read_bytes()

    # --to also takes the hex key; the catalog records the shares.
    doc = alice.json("share", original, "--to", bob.pubkey)
    assert doc["source"] == original and doc["to"] == bob.pubkey and is_block_id(doc["address"])
    kinds = {f["address"]: f["kind"] for f in alice.json("ls")["files"]}
    assert kinds[original] == "put"
    assert kinds[shared] == kinds[doc["address"]] == "shared-to " + bob.pubkey[:16]
    assert "(shared to " + bob.pubkey[:16] + ")" in alice.cli("ls").stdout

    # Mistakes are refused before anything is stored.
    r = alice.cli("share", original, "--to", str(alice.key), check=False)
    assert r.returncode == 2 and "private key file" in r.stderr
    r = alice.cli("share", original, "--to", "abc", check=False)
    assert r.returncode == 2 and "neither a public key" in r.stderr
    r = bob.cli("share", original, "--to", alice.pubkey, check=False)
    assert r.returncode == 6


# --- --json, --help, config ----------------------------------------------------------------------


def test_json_output_of_every_command(shared_network, tmp_path):
    net = shared_network
    home = tmp_path / "home"
    home.mkdir()
    key = tmp_path / "j.key"
    base = ["--server", net.url, "--key", str(key)]

    def j(*args: str, code: int = 0) -> Any:
        r = run_cli(*base, *args, home=home, check=False)
        assert r.returncode == code, r.stderr
        return r

    doc = json.loads(j("--json", "keygen").stdout)
    pub = doc["public-key"]
    assert len(pub) == 64 and doc["key-file"] == str(key)
    assert json.loads(j("pubkey", "--json").stdout)["public-key"] == pub  # --json after the command

    files = []
    for i in range(2):
        f = tmp_path / f"j{i}.txt"
        f.write_bytes(b"json %d\n" % i * 1000)
        files.append(f)
    lines = j("--json", "put", *map(str, files)).stdout.splitlines()
    assert len(lines) == 2  # JSON lines: one object per file
    puts = [json.loads(line) for line in lines]
    assert [p["file"] for p in puts] == [str(f) for f in files]
    assert all(is_block_id(p["address"]) and p["parts"] == 0 for p in puts)  # inline
    address = puts[0]["address"]

    out = tmp_path / "out.txt"
    doc = json.loads(j("--json", "get", address, "-o", str(out)).stdout)
    assert doc["name"] == "j0.txt" and doc["size"] == files[0].stat().st_size and doc["output"] == str(out)
    assert out.read_bytes() == files[0].read_bytes()

    assert [f["address"] for f in json.loads(j("--json", "ls").stdout)["files"]] == [p["address"] for p in puts]
    assert json.loads(j("--json", "info", address).stdout)["replicas"]["manifest"] == 3
    doc = json.loads(j("--json", "check", address).stdout)
    assert doc["ok"] is True and doc["target"] == 3 and doc["files"][0]["blocks"][0]["replicas"] == 3
    doc = json.loads(j("--json", "repair", address).stdout)
    assert doc["ok"] is True and doc["files"][0]["repaired"] == []
    doc = json.loads(j("--json", "config").stdout)
    assert doc["server"] == net.url and doc["sources"]["server"] == "command line"
    other = run_cli("--key", str(tmp_path / "other.key"), "keygen", home=home).stdout.strip()
    shared = json.loads(j("--json", "share", address, "--to", other).stdout)
    assert is_block_id(shared["address"])

    # Errors: the usual one line on stderr, and a JSON object on stdout.
    r = j("--json", "get", "e" * 64, "-o", str(tmp_path / "x"), code=3)
    assert json.loads(r.stdout) == {"error": r.stderr.strip().removeprefix("dsss: error: "),
                                    "code": "not-found", "exit-code": 3}
    assert len(r.stderr.splitlines()) == 1
    r = j("--json", "frobnicate", code=2)
    assert json.loads(r.stdout)["code"] == "usage" and r.stderr.startswith("dsss: error: argument COMMAND")
    r = j("--json", "get", address, "-o", "-", code=2)
    assert "stdout carries the file" in json.loads(r.stdout)["error"]


def test_help_shows_examples_for_every_command(tmp_path, capsys):
    text = run_cli("--help", home=tmp_path).stdout
    assert "examples:" in text and "config.toml" in text
    assert "examples:" in run_cli("share", "--help", home=tmp_path).stdout
    # The other commands' help in this process: the same parser, without the start-up cost.
    for command in ("keygen", "pubkey", "put", "get", "ls", "info", "check", "repair", "config"):
        with pytest.raises(SystemExit) as exit:
            build_parser().parse_args([command, "--help"])
        assert exit.value.code == 0
        text = capsys.readouterr().out
        assert "examples:" in text and f"python -m dsss.client {command}" in text, command


def test_config_file_and_precedence(shared_network, tmp_path):
    net = shared_network
    home = tmp_path / "home"
    (home / ".config" / "dsss").mkdir(parents=True)
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    conf = conf_dir / "config.toml"
    conf.write_text(f'server = "{net.url}"\nkey = "my.key"\npart-size = "64K"\nparallel = 2\nerasure = "off"\n')
    env = {"DSSS_CONFIG": str(conf)}

    doc = json.loads(run_cli("--json", "config", home=home, env=env).stdout)
    assert doc == {
        "server": net.url, "key": str(conf_dir / "my.key"), "part-size": PART, "parallel": 2, "erasure": "off",
        "config-file": str(conf),
        "sources": {k: f"config file {conf}" for k in ("server", "key", "part-size", "parallel", "erasure")},
    }
    run_cli("keygen", home=home, env=env)
    assert (conf_dir / "my.key").exists()  # a relative key path is beside the config file
    src = tmp_path / "c.bin"
    src.write_bytes(os.urandom(2 * PART + 1))
    address = run_cli("put", str(src), home=home, env=env).stdout.split()[0]
    info = json.loads(run_cli("--json", "info", address, home=home, env=env).stdout)
    assert info["part-size"] == PART and info["parts"] == 3

    # The environment beats the file, the command line beats both.
    bad = {**env, "DSSS_SERVER": "http://127.0.0.1:9"}
    doc = json.loads(run_cli("--json", "config", home=home, env=bad).stdout)
    assert doc["server"] == "http://127.0.0.1:9" and doc["sources"]["server"] == "$DSSS_SERVER"
    r = run_cli("put", str(src), home=home, env=bad, check=False)
    assert r.returncode == 4 and "cannot reach the discovery server" in r.stderr
    r = run_cli("--server", net.url, "--parallel", "3", "put", "--part-size", "100K", str(src), home=home, env=bad)
    info = json.loads(run_cli("--json", "info", r.stdout.split()[0], home=home, env=env).stdout)
    assert info["part-size"] == 100 * 1024 and info["parts"] == 2
    doc = json.loads(run_cli("--json", "--parallel", "3", "config", home=home, env=bad).stdout)
    assert doc["parallel"] == 3 and doc["sources"]["parallel"] == "command line"

    # Without $DSSS_CONFIG the file in ~/.config/dsss is read, if there is one.
    assert json.loads(run_cli("--json", "config", home=home).stdout)["config-file"] is None
    (home / ".config" / "dsss" / "config.toml").write_text("parallel = 7\n")
    doc = json.loads(run_cli("--json", "config", home=home).stdout)
    assert doc["parallel"] == 7 and doc["key"] == str(home / ".config" / "dsss" / "key")

    # Mistakes are one clear line and exit code 2.
    for text, message in [
        ("serve = 'x'\n", "unknown setting 'serve'"),
        ("parallel = 0\n", "parallel must be"),
        ("part-size = '1T'\n", "part size must be between"),
        ("server = 'ftp://x'\n", "server URL must look like"),
        ("server = \n", "not valid TOML"),
    ]:
        conf.write_text(text)
        r = run_cli("config", home=home, env=env, check=False)
        assert r.returncode == 2 and message in r.stderr and str(conf) in r.stderr, (text, r.stderr)
        assert len(r.stderr.splitlines()) == 1
    r = run_cli("config", home=home, env={"DSSS_CONFIG": str(tmp_path / "missing.toml")}, check=False)
    assert r.returncode == 2 and "no config file at" in r.stderr


def test_multi_file_put_progress_on_a_terminal(shared_network, tmp_path):
    net = shared_network
    key = tmp_path / "t.key"
    net.client("keygen", key=key)
    files = []
    for i in range(3):
        f = tmp_path / f"t{i}.bin"
        f.write_bytes(os.urandom(300 * 1024))
        files.append(str(f))
    cmd = [sys.executable, "-m", "dsss.client", "--server", net.url, "--key", str(key), "put", *files]
    code, out, text = run_with_terminal_stderr(cmd, child_env({"HOME": str(tmp_path)}))
    assert code == 0
    assert [line.split()[1] for line in out.decode().splitlines()] == files
    assert "3 files" in text and "t0.bin" in text and "B/s" in text, text
    assert "stored 3 files, 0.9 MiB in" in text and "MiB/s)" in text, text


# --- check and repair ----------------------------------------------------------------------------


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_check_and_repair_after_an_agent_is_gone(make_network, tmp_path):
    net = start_network(make_network(heartbeat=0.5), agents=4)
    alice = User(net, tmp_path, "alice")
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(5 * PART + 3))
    address = alice.put(src, "--part-size", "64K")
    parts = alice.json("info", address)["part-hashes"]
    blocks = [address, *parts]

    r = alice.cli("check", address)
    assert "manifest" in r.stdout and "7 of 7 blocks have 3 replicas (proven); 0 below" in r.stdout
    assert r.stdout.count("3/3") == 7

    # A corrupt copy: who-has still counts it, --verify does not; repair --verify replaces it.
    victim = parts[1]
    holder = holders_of(net, victim)[0]
    _corrupt(net.agents[holder].storage / "blocks" / victim[:2] / victim[2:4] / victim)
    r = alice.cli("check", "--verify", address, check=False)
    assert r.returncode == EXIT_DEGRADED, r.stderr
    # Either our download found the bad copy, or the agent's background scrub found it first
    # and reported it gone.
    assert r.stdout.count("2/3") == 1 and r.stdout.count("3/3") == 6
    doc = alice.json("repair", "--verify", address)
    assert doc["ok"] is True
    assert [(b["index"], b["before"], b["after"]) for b in doc["files"][0]["repaired"]] == [(1, 2, 3)]
    assert alice.cli("check", "--verify", address).returncode == 0

    # An agent gone for good: the blocks it held are short until repaired.
    gone = max(range(4), key=lambda i: sum(i in holders_of(net, b) for b in blocks))
    lost = [b for b in blocks if gone in holders_of(net, b)]
    assert lost
    net.agents[gone].kill()
    net.wait_live(3)
    r = alice.cli("check", address, check=False)
    assert r.returncode == EXIT_DEGRADED
    assert r.stdout.count("2/3") == len(lost)
    assert f"{len(lost)} block(s) in 1 file(s) have fewer than 3 proven replicas" in r.stderr
    doc = alice.json("check", address, check=False)
    assert doc["ok"] is False
    assert sorted(b["hash"] for b in doc["files"][0]["blocks"] if b["replicas"] == 2) == sorted(lost)

    r = alice.cli("repair", address)
    assert f"{len(lost)} of 7 blocks were below 3 replicas; added {len(lost)} cop" in r.stdout
    assert r.stdout.count("2 -> 3") == len(lost)
    doc = alice.json("check", address)
    assert all(b["replicas"] == 3 for b in doc["files"][0]["blocks"])
    out = tmp_path / "out.bin"
    alice.cli("get", address, "-o", str(out))
    assert block_hash(out.read_bytes()) == block_hash(src.read_bytes())
    # `--all` finds the file in the catalog; nothing left to do.
    assert "nothing to do" in alice.cli("repair", "--all").stdout

    # With only two agents left, three replicas cannot be reached: a clear error.
    live = sorted(i for i in range(4) if i != gone)
    net.agents[live[0]].kill()
    net.wait_live(2)
    r = alice.cli("repair", address, check=False)
    assert r.returncode == 4, r.stderr
    assert "still below 3 replicas" in r.stderr and len(r.stderr.splitlines()) == 1
    assert "Traceback" not in r.stderr
