"""DSSS benchmark suite, against Tahoe-LAFS 1.20 in the same run. See docs/performance.md.

    .venv/bin/python bench/run.py                       # everything but the profile (~25-30 min)
    .venv/bin/python bench/run.py --quick               # small sizes, 2 repeats (a few minutes)
    .venv/bin/python bench/run.py --only throughput small --repeat 5
    .venv/bin/python bench/run.py --only profile        # py-spy profile of a 64 MiB put/get

Measurements (in this order): startup, throughput, small, rss, discovery, nat; and profile
(only when named). Every DSSS figure comes from real processes on loopback (a server and four
agents, replicas 3), through the real CLI and through the gateway (`dsss gateway`, driven by
curl as Tahoe's web API is); Tahoe-LAFS runs as a local grid (introducer, four storage
nodes, one client node, 2-of-4 shares) in its own network namespace, on the same files, with
each repeat of DSSS and Tahoe interleaved. Prints a table per measurement (median, min, max;
MB = 10^6 bytes) and writes every figure, with each run's raw values, as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    BENCH_DIR,
    REPO_ROOT,
    MiB,
    compile_bytecode,
    file_digest,
    fmt,
    load_average,
    log,
    make_random_file,
    proc_cpu,
    ratio,
    render_table,
    run_timed,
    size_label,
    stat_cells,
    summary,
)

from dsss.errors import DSSSError  # noqa: E402
from dsss.model import parse_size  # noqa: E402

def size_arg(text: str) -> int:
    """argparse type for a file size such as 256M: a clear error for anything else."""
    try:
        size = parse_size(text)
    except (ValueError, DSSSError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if size < 1:
        raise argparse.ArgumentTypeError("a size must be at least 1 byte")
    return size


def relay_limit_arg(text: str) -> str:
    """argparse type for --relay-limit: checked as the server checks it (a size, at least 1K),
    kept as written for the server's command line."""
    if size_arg(text) < 1024:
        raise argparse.ArgumentTypeError("the relay limit must be at least 1K (bytes per second)")
    return text


ALL = ["startup", "throughput", "small", "rss", "discovery", "nat"]
EXTRA = ["profile"]

FULL = {
    "repeat": 3,
    "sizes": [1 * MiB, 64 * MiB, 256 * MiB],
    "small_files": 200,
    "small_single_gets": 10,
    "small_size": 4096,
    "small_repeat": 2,
    "rss_sizes": [64 * MiB, 1024 * MiB],
    "discovery_agents": [10, 100, 1000],
    "discovery_requests": 500,
    "nat_size": 64 * MiB,
    "profile_size": 64 * MiB,
}
QUICK = {
    "repeat": 2,
    "sizes": [1 * MiB, 16 * MiB],
    "small_files": 30,
    "small_single_gets": 5,
    "small_size": 4096,
    "small_repeat": 2,
    "rss_sizes": [16 * MiB, 64 * MiB],
    "discovery_agents": [10, 100],
    "discovery_requests": 200,
    "nat_size": 8 * MiB,
    "profile_size": 16 * MiB,
}


def mbps(size: int, seconds: float) -> float:
    return size / 1e6 / seconds


def use_erasure(coding: str, work: Path) -> None:
    """Make every DSSS client this process starts (they inherit the environment) store files
    erasure-coded: a config file with `erasure`, named by $DSSS_CONFIG."""
    from dsss.erasure import Coding

    config = work / "dsss-client.toml"
    config.write_text(f'erasure = "{Coding.parse(coding)}"\n')
    os.environ["DSSS_CONFIG"] = str(config)


def quartiles(timeline: list[tuple[float, int]]) -> list[int]:
    """VmRSS (kB) at 25, 50, 75 and 100% of a call's samples (0 when there are none)."""
    if not timeline:
        return [0, 0, 0, 0]
    n = len(timeline)
    return [timeline[min(n - 1, max(0, int(round(q * n)) - 1))][1] for q in (0.25, 0.5, 0.75, 1.0)]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cfg = dict(QUICK if args.quick else FULL)
        if args.sizes:
            self.cfg["sizes"] = list(args.sizes)
        if args.repeat:
            self.cfg["repeat"] = args.repeat
            self.cfg["small_repeat"] = args.repeat
        self.work = Path(args.work or tempfile.mkdtemp(prefix="dsss-bench-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, Any] = {"meta": self.meta(), "config": self.cfg, "measurements": {}}
        self.tables: list[str] = []
        self._dsss: Any = None
        self._tahoe: Any = None
        self._tahoe_tried = False

    # --- environment -----------------------------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        def cmd(*c: str) -> str:
            try:
                return subprocess.run(c, capture_output=True, text=True, cwd=REPO_ROOT, timeout=30).stdout.strip()
            except OSError:
                return ""

        return {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": platform.node(),
            "cores": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "dsss_commit": cmd("git", "rev-parse", "--short", "HEAD"),
            "load_average_start": load_average(),
            "quick": bool(self.args.quick),
            "argv": sys.argv[1:],
        }

    def dsss(self) -> Any:
        if self._dsss is None:
            from dsss_bench import DsssNetwork

            log("starting DSSS: a server and 4 agents on loopback (replicas 3, heartbeat 1 s, 65000-byte datagrams)")
            self._dsss = DsssNetwork(self.work / "dsss")
            self._dsss.start()
        return self._dsss

    def tahoe(self) -> Any:
        """The Tahoe grid, or None (with the reason recorded) if it cannot run here."""
        if self.args.no_tahoe:
            self.results["meta"]["tahoe"] = "not run (--no-tahoe)"
            return None
        if not self._tahoe_tried:
            from tahoe import TahoeGrid

            self._tahoe_tried = True
            grid = TahoeGrid(self.work / "tahoe")
            if grid.start():
                self._tahoe = grid
                version = grid.call("cli_startup")
                self.results["meta"]["tahoe"] = version.get("stdout", "").strip() if version.get("ok") else "?"
                self.results["meta"]["tahoe_grid_start_s"] = grid.setup.get("seconds")
            else:
                self.results["meta"]["tahoe"] = f"UNAVAILABLE: {grid.unavailable}"
        return self._tahoe

    def tahoe_op(self, op: str, *, stores: int = 0, **kw: Any) -> dict[str, Any] | None:
        """One operation on the Tahoe grid; a put that should store `stores` bytes of file must
        have grown the storage nodes' shares by at least that (2-of-4 stores twice the file):
        a put of bytes Tahoe already holds sends nothing (convergent encryption), and would
        be no measure of an upload."""
        grid = self.tahoe()
        if grid is None:
            return None
        r = grid.call(op, **kw)
        if not r.get("ok"):
            raise RuntimeError(f"Tahoe {op} failed: {r.get('error')}")
        if r.get("stored_bytes", 0) < stores:
            raise RuntimeError(f"Tahoe {op} of {stores} bytes stored only {r.get('stored_bytes')} new bytes: "
                               "it already held that content")
        return r

    def close(self) -> None:
        if self._tahoe is not None:
            self._tahoe.stop()
        if self._dsss is not None:
            self._dsss.stop()
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)
        else:
            log(f"work directory kept: {self.work}")

    def save(self) -> None:
        self.results["meta"]["load_average_end"] = load_average()
        self.results["meta"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        path = Path(self.args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str) + "\n")
        tmp.replace(path)

    def emit(self, text: str) -> None:
        self.tables.append(text)
        print(text, flush=True)

    # --- measurements ----------------------------------------------------------------------------

    def m_startup(self) -> dict[str, Any]:
        """Per-call overhead of each CLI: an interpreter start, imports, argument parsing."""
        from tools.harness import child_env

        env = child_env()
        n = max(3, self.cfg["repeat"])
        help_s, import_s, tahoe_s = [], [], []
        imports = "import dsss.client.cli, dsss.client.putflow, dsss.client.getflow, dsss.client.peer, dsss.client.discovery"
        for _ in range(n):
            help_s.append(run_timed([sys.executable, "-m", "dsss.client", "--help"], env=env)["seconds"])
            import_s.append(run_timed([sys.executable, "-c", imports], env=env)["seconds"])
            r = self.tahoe_op("cli_startup")
            if r is not None:
                tahoe_s.append(r["seconds"])
        res: dict[str, Any] = {"dsss_help_s": summary(help_s), "dsss_imports_s": summary(import_s),
                               "tahoe_version_s": summary(tahoe_s)}
        # Background load each side adds while the other is measured (DSSS agents scrub at their
        # default 8 MiB/s each, everyone heartbeats).
        d = self.dsss()
        pids = d.daemon_pids
        before = {k: proc_cpu(p) for k, p in pids.items()}
        time.sleep(10)
        res["dsss_idle_cpu_pct"] = 100 * sum(proc_cpu(p) - before[k] for k, p in pids.items()) / 10
        r = self.tahoe_op("idle_cpu", seconds=10)
        res["tahoe_idle_cpu_pct"] = None if r is None else 100 * r["nodes_cpu_s"] / 10
        self.emit(render_table(
            ["CLI start-up (s)", "median", "min", "max"],
            [["dsss --help (no network imports)", *stat_cells(res["dsss_help_s"])],
             ["dsss: python + client network imports", *stat_cells(res["dsss_imports_s"])],
             ["tahoe --version", *stat_cells(res["tahoe_version_s"])]],
            title="startup: per-call CLI overhead"))
        self.emit(f"idle daemons: DSSS server + 4 agents {fmt(res['dsss_idle_cpu_pct'], 1)}% of a core, "
                  f"Tahoe 5 nodes {fmt(res['tahoe_idle_cpu_pct'], 1)}% of a core (over 10 s)")
        return res

    def _throughput_one(self, size: int) -> dict[str, Any]:
        """One size: each repeat stores and reads back a file with DSSS and Tahoe. Every put is
        of new random bytes (Tahoe would not upload again a file it holds; DSSS seals every
        file under a new key either way)."""
        d = self.dsss()
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {
            s: {"put": [], "get": []} for s in ("dsss", "dsss_gw", "tahoe_web", "tahoe_cli")}
        d.start_gateway()
        src = self.work / "files" / f"rand-{size}.bin"
        dst = self.work / "out.bin"

        def fresh() -> str:
            make_random_file(src, size, fresh=True)
            return file_digest(src)

        def check(what: str, digest: str) -> None:
            ok = file_digest(dst) == digest
            dst.unlink()
            if not ok:
                raise RuntimeError(f"{what}: the bytes read back differ from those stored")

        def do_dsss() -> None:
            digest = fresh()
            p = d.put(src)
            runs["dsss"]["put"].append(p)
            g = d.get(p["address"], dst)
            check("dsss get", digest)
            runs["dsss"]["get"].append(g)
            digest = fresh()
            p = d.put_web(src)
            runs["dsss_gw"]["put"].append(p)
            g = d.get_web(p["address"], dst)
            check("dsss gateway get", digest)
            runs["dsss_gw"]["get"].append(g)

        def do_tahoe() -> None:
            for kind, put_op, get_op in (("tahoe_web", "put_web", "get_web"), ("tahoe_cli", "put_cli", "get_cli")):
                digest = fresh()
                p = self.tahoe_op(put_op, stores=size, file=str(src))
                if p is None:
                    return
                runs[kind]["put"].append(p)
                g = self.tahoe_op(get_op, cap=p["cap"], out=str(dst))
                check(f"tahoe {get_op}", digest)
                runs[kind]["get"].append(g)  # type: ignore[arg-type]

        for i in range(self.cfg["repeat"]):
            # Alternate who goes first, so a drift in the machine's load favours neither.
            for step in ((do_dsss, do_tahoe) if i % 2 == 0 else (do_tahoe, do_dsss)):
                step()
            line = [f"{size_label(size)} #{i + 1}:"]
            for sys_, ops in runs.items():
                if ops["put"]:
                    line.append(f"{sys_} put {mbps(size, ops['put'][-1]['seconds']):.1f} "
                                f"get {mbps(size, ops['get'][-1]['seconds']):.1f} MB/s")
            log(" ".join(line))
        entry: dict[str, Any] = {"size": size}
        for sys_, ops in runs.items():
            for op in ("put", "get"):
                rs = ops[op]
                entry[f"{sys_}_{op}_mbps"] = summary(mbps(size, r["seconds"]) for r in rs)
                entry[f"{sys_}_{op}_seconds"] = summary(r["seconds"] for r in rs)
                rss_key = {"dsss": "maxrss_kb", "dsss_gw": "gateway_peak_rss_kb"}.get(sys_, "tool_maxrss_kb")
                cpu_key = {"dsss": "cpu_s", "dsss_gw": "gateway_cpu_s"}.get(sys_, "tool_cpu_s")
                entry[f"{sys_}_{op}_client_maxrss_kb"] = summary(r.get(rss_key) for r in rs)
                entry[f"{sys_}_{op}_client_cpu_s"] = summary(r.get(cpu_key) for r in rs)
                if sys_ == "dsss_gw":
                    entry[f"dsss_gw_{op}_curl_cpu_s"] = summary(r.get("cpu_s") for r in rs)
                    entry[f"dsss_gw_{op}_daemons_cpu_s"] = summary(sum(r["daemons_cpu_s"].values()) for r in rs)
                elif sys_ == "dsss":
                    entry[f"dsss_{op}_daemons_cpu_s"] = summary(sum(r["daemons_cpu_s"].values()) for r in rs)
                else:
                    entry[f"{sys_}_{op}_nodes_cpu_s"] = summary(r.get("nodes_cpu_s") for r in rs)
                    entry[f"{sys_}_{op}_client_node_peak_rss_kb"] = summary(
                        r.get("client_node_peak_rss_kb") for r in rs)
                    entry[f"{sys_}_{op}_stored_bytes"] = summary(r.get("stored_bytes") for r in rs)
        # ratio_*: the DSSS CLI against Tahoe; gw_ratio_*: the DSSS gateway (curl) against Tahoe.
        for mine, prefix in (("dsss", "ratio"), ("dsss_gw", "gw_ratio")):
            for base in ("tahoe_web", "tahoe_cli"):
                for op in ("put", "get"):
                    a = entry[f"{mine}_{op}_mbps"]["values"]
                    b = entry[f"{base}_{op}_mbps"]["values"]
                    entry[f"{prefix}_{op}_vs_{base}"] = {
                        "of_medians": ratio(entry[f"{mine}_{op}_mbps"]["median"], entry[f"{base}_{op}_mbps"]["median"]),
                        "per_repeat": summary(x / y for x, y in zip(a, b)),
                    }
        if size >= 256 * MiB and not self.args.keep:
            src.unlink()  # disk space: the largest files are not needed again
        return entry

    def m_throughput(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for size in self.cfg["sizes"]:
            out[str(size)] = self._throughput_one(size)
            self.save_partial("throughput", out)
        rows = []
        for entry in out.values():
            for op in ("put", "get"):
                for sys_, label in (("dsss", "DSSS CLI"), ("dsss_gw", "DSSS gateway (curl)"),
                                    ("tahoe_web", "Tahoe web API (curl)"), ("tahoe_cli", "Tahoe CLI")):
                    s = entry[f"{sys_}_{op}_mbps"]
                    if not s["n"]:
                        continue
                    cells: list[Any] = []
                    for prefix in ("ratio", "gw_ratio"):
                        rat = entry.get(f"{prefix}_{op}_vs_{sys_}")
                        cells += [None if rat is None else rat["of_medians"],
                                  None if rat is None or not rat["per_repeat"]["n"]
                                  else f"{rat['per_repeat']['min']:.2f}..{rat['per_repeat']['max']:.2f}"]
                    rows.append([size_label(entry["size"]), op, label, *stat_cells(s), *cells])
        self.emit(render_table(["size", "op", "system", "MB/s median", "min", "max", "CLI/this (medians)",
                                "CLI/this per repeat", "gateway/this (medians)", "gateway/this per repeat"], rows,
                               title=f"throughput: MB/s (10^6 B/s), {self.cfg['repeat']} repeats, whole CLI/curl call"))
        return out

    def save_partial(self, name: str, value: Any) -> None:
        self.results["measurements"][name] = value
        self.save()

    def m_small(self) -> dict[str, Any]:
        d = self.dsss()
        n, size = self.cfg["small_files"], self.cfg["small_size"]
        sdir = self.work / "small" / "small"
        files = [sdir / f"f{i:04d}" for i in range(n)]
        digests: dict[str, str] = {}
        res: dict[str, Any] = {"files": n, "size": size, "runs": []}

        def fresh() -> None:
            """New bytes in every file, before every put (Tahoe would not upload again what it
            holds)."""
            for f in files:
                make_random_file(f, size, fresh=True)
            digests.clear()
            digests.update({f.name: file_digest(f) for f in files})

        def verify(outdir: Path, what: str) -> None:
            found = {p.name: file_digest(p) for p in outdir.rglob("f*") if p.is_file()}
            if found != digests:
                raise RuntimeError(f"{what}: {len(found)} files back, {sum(found.get(k) == v for k, v in digests.items())} intact")
            shutil.rmtree(outdir)

        for i in range(self.cfg["small_repeat"]):
            run: dict[str, Any] = {}
            fresh()
            limited = d.rate_limited_responses()
            asked = d.api_requests()
            p = d.put_many(files)
            put_requests = d.api_requests() - asked
            run["dsss_put"] = {"seconds": p["seconds"], "files_per_s": n / p["seconds"], "maxrss_kb": p["maxrss_kb"],
                               "cpu_s": p["cpu_s"], "daemons_cpu_s": p["daemons_cpu_s"],
                               "http_429": d.rate_limited_responses() - limited,
                               "api_requests_per_file": put_requests / n}
            outdir = self.work / "small-out"
            outdir.mkdir(exist_ok=True)
            # One `get` of every address into a directory: one process, one session.
            limited = d.rate_limited_responses()
            asked = d.api_requests()
            g = d.get_many(p["addresses"], outdir)
            get_requests = d.api_requests() - asked
            verify(outdir, "dsss get")
            run["dsss_get"] = {"seconds": g["seconds"], "files_per_s": n / g["seconds"], "maxrss_kb": g["maxrss_kb"],
                               "cpu_s": g["cpu_s"], "daemons_cpu_s": g["daemons_cpu_s"],
                               "http_429": d.rate_limited_responses() - limited,
                               "api_requests_per_file": get_requests / n}
            # A few separate `get` calls, for the cost of one call (start-up included).
            outdir.mkdir(exist_ok=True)
            calls = min(n, self.cfg["small_single_gets"])
            per_call = [d.get(address, outdir / f.name)["seconds"]
                        for f, address in list(zip(files, p["addresses"]))[:calls]]
            for f in files[:calls]:
                if file_digest(outdir / f.name) != digests[f.name]:
                    raise RuntimeError(f"dsss single get: {f.name} differs")
            shutil.rmtree(outdir)
            run["dsss_get_single"] = {"files_per_s": calls / sum(per_call), "per_call_s": summary(per_call),
                                      "calls": calls}
            # The gateway, driven like Tahoe's web API: one curl, one request per file.
            d.start_gateway()
            fresh()
            pg = d.put_many_web(files)
            run["dsss_gw_put"] = {"seconds": pg["seconds"], "files_per_s": n / pg["seconds"],
                                  "gateway_cpu_s": pg["gateway_cpu_s"], "daemons_cpu_s": pg["daemons_cpu_s"]}
            gg = d.get_many_web(pg["addresses"], outdir)
            verify(outdir, "dsss gateway get")
            run["dsss_gw_get"] = {"seconds": gg["seconds"], "files_per_s": n / gg["seconds"],
                                  "gateway_cpu_s": gg["gateway_cpu_s"], "daemons_cpu_s": gg["daemons_cpu_s"]}
            if self.tahoe() is not None:
                fresh()
                pw = self.tahoe_op("put_many_web", stores=n * size, files=[str(f) for f in files])
                assert pw is not None
                gw = self.tahoe_op("get_many_web", caps=pw["caps"], outdir=str(outdir))
                assert gw is not None
                verify(outdir, "tahoe web get")
                run["tahoe_web_put"] = {"seconds": pw["seconds"], "files_per_s": n / pw["seconds"]}
                run["tahoe_web_get"] = {"seconds": gw["seconds"], "files_per_s": n / gw["seconds"]}
                name = f"small-{i}"
                fresh()
                pc = self.tahoe_op("put_many_cli", stores=n * size, dir=str(sdir), name=name)
                gc = self.tahoe_op("get_many_cli", name=name, outdir=str(outdir))
                assert pc is not None and gc is not None
                verify(outdir, "tahoe cli get")
                run["tahoe_cli_put"] = {"seconds": pc["seconds"], "files_per_s": n / pc["seconds"]}
                run["tahoe_cli_get"] = {"seconds": gc["seconds"], "files_per_s": n / gc["seconds"]}
            res["runs"].append(run)
            log("small #%d: %s" % (i + 1, ", ".join(f"{k} {v['files_per_s']:.1f}/s" for k, v in run.items())))
        keys = ["dsss_put", "dsss_get", "dsss_get_single", "dsss_gw_put", "dsss_gw_get", "tahoe_web_put", "tahoe_web_get", "tahoe_cli_put",
                "tahoe_cli_get"]
        for k in keys:
            res[k + "_files_per_s"] = summary(r[k]["files_per_s"] for r in res["runs"] if k in r)
        res["dsss_get_per_call_s"] = summary(
            v for r in res["runs"] for v in r["dsss_get_single"]["per_call_s"]["values"])
        res["dsss_put_http_429"] = [r["dsss_put"]["http_429"] for r in res["runs"]]
        res["dsss_get_http_429"] = [r["dsss_get"]["http_429"] for r in res["runs"]]
        res["dsss_put_api_requests_per_file"] = [r["dsss_put"]["api_requests_per_file"] for r in res["runs"]]
        res["dsss_get_api_requests_per_file"] = [r["dsss_get"]["api_requests_per_file"] for r in res["runs"]]
        labels = {
            "dsss_put": "DSSS: one `put` of all files",
            "dsss_get": "DSSS: one `get` of all files (-o DIR)",
            "dsss_get_single": "DSSS: separate `get` calls, one file each",
            "dsss_gw_put": "DSSS gateway: one curl, PUT /files each",
            "dsss_gw_get": "DSSS gateway: one curl, GET /files/ADDRESS each",
            "tahoe_web_put": "Tahoe web: one curl, PUT /uri each",
            "tahoe_web_get": "Tahoe web: one curl, GET /uri/CAP each",
            "tahoe_cli_put": "Tahoe CLI: one `tahoe cp -r`",
            "tahoe_cli_get": "Tahoe CLI: one `tahoe cp -r` back",
        }
        rows = [[labels[k], *stat_cells(res[k + "_files_per_s"])] for k in keys if res[k + "_files_per_s"]["n"]]
        rows.append(["DSSS: seconds per `get` call", *stat_cells(res["dsss_get_per_call_s"])])
        for op in ("put", "get"):
            rows.append([f"DSSS: discovery requests per file, {op}",
                         *stat_cells(summary(res[f"dsss_{op}_api_requests_per_file"]))])
        self.emit(render_table(["files/s", "median", "min", "max"], rows,
                               title=f"small: {n} files of {size_label(size)}, {self.cfg['small_repeat']} repeats"))
        return res

    def m_rss(self) -> dict[str, Any]:
        d = self.dsss()
        res: dict[str, Any] = {}
        rows = []
        for size in self.cfg["rss_sizes"]:
            src = make_random_file(self.work / "files" / f"rss-{size}.bin", size)
            digest = file_digest(src)
            dst = self.work / "rss-out.bin"
            p = d.put(src, rss_every=0.25)
            g = d.get(p["address"], dst, rss_every=0.25)
            ok = file_digest(dst) == digest
            dst.unlink()
            if not ok:
                raise RuntimeError("rss: get returned different bytes")
            d.start_gateway()
            pw = d.put_web(src)
            gw = d.get_web(pw["address"], dst)
            ok = file_digest(dst) == digest
            dst.unlink()
            if not ok:
                raise RuntimeError("rss: the gateway's get returned different bytes")
            res[str(size)] = {
                "gateway_put_peak_rss_kb": pw["gateway_peak_rss_kb"], "gateway_get_peak_rss_kb": gw["gateway_peak_rss_kb"],
                "put_maxrss_kb": p["maxrss_kb"], "get_maxrss_kb": g["maxrss_kb"],
                "put_rss_quartiles_kb": quartiles(p["rss_timeline"]),
                "get_rss_quartiles_kb": quartiles(g["rss_timeline"]),
                "put_rss_timeline": p["rss_timeline"], "get_rss_timeline": g["rss_timeline"],
                "put_mbps": mbps(size, p["seconds"]), "get_mbps": mbps(size, g["seconds"]),
                "put_cpu_s": p["cpu_s"], "get_cpu_s": g["cpu_s"],
            }
            rows.append([size_label(size), p["maxrss_kb"] * 1024 / 1e6, g["maxrss_kb"] * 1024 / 1e6,
                         pw["gateway_peak_rss_kb"] * 1024 / 1e6, gw["gateway_peak_rss_kb"] * 1024 / 1e6,
                         "/".join(f"{kb * 1024 / 1e6:.0f}" for kb in res[str(size)]["put_rss_quartiles_kb"]),
                         "/".join(f"{kb * 1024 / 1e6:.0f}" for kb in res[str(size)]["get_rss_quartiles_kb"]),
                         mbps(size, p["seconds"]), mbps(size, g["seconds"])])
            if not self.args.keep:
                src.unlink()
            log(f"rss {size_label(size)}: put {p['maxrss_kb'] / 1024:.0f} MiB, get {g['maxrss_kb'] / 1024:.0f} MiB peak")
        self.emit(render_table(["file", "put peak RSS (MB)", "get peak RSS (MB)", "gateway peak in put (MB)",
                                "gateway peak in get (MB)", "put RSS at 25/50/75/100%",
                                "get RSS at 25/50/75/100%", "put MB/s", "get MB/s"], rows,
                               title="rss: DSSS client peak RSS (wait4 ru_maxrss; VmRSS sampled every 0.25 s "
                                     "at 25/50/75/100% of the call), one run each"))
        return res

    def m_discovery(self) -> dict[str, Any]:
        from discovery_scale import measure

        log(f"discovery: {self.cfg['discovery_agents']} simulated agents, all at once")
        res = measure(self.cfg["discovery_agents"], self.work / "discovery", requests=self.cfg["discovery_requests"])
        rows = []
        for n, r in res.items():
            rows.append([n, r["who_has_ms"]["p50"], r["who_has_ms"]["p99"], r["who_has_ms"]["max"],
                         r["where_to_upload_ms"]["p50"], r["where_to_upload_ms"]["p99"], r["where_to_upload_ms"]["max"],
                         r["server_rss_kb"]["registered"] / 1024, r["register_seconds"]])
        self.emit(render_table(["agents", "who-has p50 ms", "p99", "max", "where-to-upload p50 ms", "p99", "max",
                                "server RSS MiB", "register all (s)"], rows,
                               title=f"discovery: {self.cfg['discovery_requests']} sequential requests per count, "
                                     "the counts interleaved, one HTTP connection each"))
        return res

    def m_nat(self) -> dict[str, Any]:
        import nat_bench

        res = nat_bench.measure(self.work, self.cfg["nat_size"], self.cfg["repeat"], self.args.relay_limit)
        if "skipped" in res:
            self.emit(f"\n## nat: skipped: {res['skipped']}")
            return res
        rows = []
        for kind in nat_bench.CASES:
            r = res.get(kind, {})
            if "error" in r:
                rows.append([kind, "ERROR", r["error"][:60], None, None, None, None, None])
                continue
            for op in ("put", "get"):
                for how, pre in (("gateway", "gw_"), ("CLI", "")):
                    rows.append([kind, f"{op} ({how})", *stat_cells(r[f"{pre}{op}_mbps"]),
                                 ",".join(r[f"{pre}paths_seen"]), r["relayed_bytes"]])
        self.emit(render_table(["path", "op", "MB/s median", "min", "max", "paths reported", "relayed bytes"], rows,
                               title=f"nat: {size_label(res['size'])} across NATs, MTU 1500, 1452-byte datagrams, "
                                     f"relay limit {res['relay_limit']} per pair"))
        return res

    def m_profile(self) -> dict[str, Any]:
        import profile_dsss

        d = self.dsss()
        src = make_random_file(self.work / "files" / f"profile-{self.cfg['profile_size']}.bin", self.cfg["profile_size"])
        outdir = Path(self.args.json).resolve().parent / "profile"
        res = profile_dsss.profile(d, src, outdir)
        self.emit(profile_dsss.render(res))
        return res

    # --- targets ---------------------------------------------------------------------------------

    def targets(self) -> list[dict[str, Any]]:
        m = self.results["measurements"]
        out: list[dict[str, Any]] = []

        def add(target: str, measured: str, met: bool | None, note: str = "") -> None:
            out.append({"target": target, "measured": measured, "met": met, "note": note})

        tp = m.get("throughput")
        if isinstance(tp, dict) and tp:
            size = max(int(k) for k in tp)
            e = tp[str(size)]
            note = "" if size == 256 * MiB else f"largest size measured was {size_label(size)}, not 256 MiB"
            for op in ("put", "get"):
                # Like for like: DSSS's gateway and Tahoe's web API are both a local node driven
                # by curl; the CLI (a new process per call) is shown beside it.
                r = e[f"gw_ratio_{op}_vs_tahoe_web"]["of_medians"]
                cli = e[f"ratio_{op}_vs_tahoe_web"]["of_medians"]
                add(f"{op} 256 MiB >= 2x Tahoe web API", f"{r:.2f}x (gateway)" if r else "no Tahoe figure",
                    None if r is None else r >= 2.0,
                    "; ".join(x for x in (note, f"CLI {cli:.2f}x" if cli else "") if x))
        sm = m.get("small")
        if isinstance(sm, dict) and "dsss_put_files_per_s" in sm:
            for op in ("put", "get"):
                v = sm[f"dsss_{op}_files_per_s"]["median"]
                add(f"small files {op} >= 50 files/s", f"{v:.1f}/s", v >= 50)
        rs = m.get("rss")
        if isinstance(rs, dict) and rs:
            size = max(int(k) for k in rs)
            e = rs[str(size)]
            peak = max(e["put_maxrss_kb"], e["get_maxrss_kb"]) * 1024 / 1e6
            add("client peak RSS < 150 MB for 1 GiB", f"{peak:.0f} MB ({size_label(size)})", peak < 150,
                "" if size == 1024 * MiB else f"largest file measured was {size_label(size)}")
        dc = m.get("discovery")
        if isinstance(dc, dict) and dc:
            lo, hi = min(dc, key=int), max(dc, key=int)
            a, b = dc[lo]["who_has_ms"]["p99"], dc[hi]["who_has_ms"]["p99"]
            add("who-has p99 at 1000 agents <= 2x p99 at 10", f"{b:.1f} ms at {hi} vs {a:.1f} ms at {lo} ({b / a:.2f}x)",
                b <= 2 * a, "" if hi == "1000" else f"largest count measured was {hi}")
        nat = m.get("nat")
        if isinstance(nat, dict) and "size" in nat and isinstance(tp, dict) and tp:
            ref_size = str(nat["size"]) if str(nat["size"]) in tp else str(max(int(k) for k in tp))
            for kind in ("direct", "relay"):
                r = nat.get(kind, {})
                if "error" in r:
                    add(f"NAT {kind} >= Tahoe web on loopback", "error", False, r["error"][:80])
                    continue
                for op in ("put", "get"):
                    # Like for like, as for the throughput targets: the gateway against Tahoe's
                    # web API; the CLI in the note.
                    v = r[f"gw_{op}_mbps"]["median"]
                    cli = r[f"{op}_mbps"]["median"]
                    t = tp[ref_size][f"tahoe_web_{op}_mbps"]["median"]
                    note = f"Tahoe at {size_label(int(ref_size))}; CLI {cli:.1f} MB/s"
                    if kind == "relay" and self.args.relay_limit:
                        note += f"; relay limit {self.args.relay_limit} per pair, not the default 10M"
                    add(f"NAT {kind} {op} >= Tahoe web {op} on loopback",
                        f"{v:.1f} vs {t:.1f} MB/s (gateway)" if t else f"{v:.1f} MB/s (no Tahoe figure)",
                        None if t is None else v >= t, note)
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes and 2 repeats (a few minutes)")
    ap.add_argument("--only", nargs="+", choices=ALL + EXTRA, metavar="NAME",
                    help=f"run only these measurements ({', '.join(ALL + EXTRA)})")
    ap.add_argument("--repeat", type=int, default=None, help="repeats per measurement (default 3, quick 2)")
    ap.add_argument("--json", default=str(BENCH_DIR / "results" / "run.json"), help="where to write the results")
    ap.add_argument("--sizes", nargs="+", default=None, metavar="SIZE", type=size_arg,
                    help="file sizes for the throughput measurement, e.g. 256M (default 1M 64M 256M)")
    ap.add_argument("--no-tahoe", action="store_true", help="measure DSSS alone")
    ap.add_argument("--work", default=None, help="work directory (default: a new temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (files, logs, stores)")
    ap.add_argument("--erasure", default=None, metavar="K/N",
                    help="DSSS stores files erasure-coded (every CLI call and gateway, loopback and NAT "
                         "lab), say 2/4 as Tahoe's grid here; default: 3 replicas")
    ap.add_argument("--relay-limit", default=None, metavar="SIZE", type=relay_limit_arg,
                    help="the NAT lab server's --relay-limit (bytes per second per client/agent pair); "
                         "default: the server's own, 10M")
    args = ap.parse_args()
    names = args.only or ALL
    compile_bytecode()
    bench = Bench(args)
    if args.erasure:
        use_erasure(args.erasure, bench.work)
        bench.results["meta"]["erasure"] = args.erasure
    started = time.monotonic()
    log(f"work directory {bench.work}; results to {args.json}")
    failures = 0
    try:
        for name in (n for n in ALL + EXTRA if n in names):
            log(f"=== {name}")
            t0 = time.monotonic()
            try:
                value = getattr(bench, f"m_{name}")()
            except Exception as e:
                import traceback

                traceback.print_exc()
                value = {"error": f"{type(e).__name__}: {e}"}
                failures += 1
                bench.emit(f"\n## {name}: FAILED: {value['error']}")
            bench.results.setdefault("elapsed_s", {})[name] = round(time.monotonic() - t0, 1)
            bench.save_partial(name, value)
        bench.results["targets"] = bench.targets()
        rows = [[t["target"], t["measured"], {True: "yes", False: "NO", None: "?"}[t["met"]], t["note"]]
                for t in bench.results["targets"]]
        if rows:
            bench.emit(render_table(["target", "measured", "met", "note"], rows, title="targets"))
    finally:
        bench.results["meta"]["elapsed_s"] = round(time.monotonic() - started, 1)
        bench.save()
        bench.close()
    tahoe = bench.results["meta"].get("tahoe")
    if tahoe:
        print(f"\nTahoe-LAFS: {tahoe}")
    print(f"load average start {bench.results['meta']['load_average_start']}, end "
          f"{bench.results['meta']['load_average_end']}; {os.cpu_count()} cores; "
          f"elapsed {bench.results['meta']['elapsed_s']:.0f} s; JSON: {args.json}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
