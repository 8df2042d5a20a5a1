"""What-if runs: DSSS with different knobs, side by side in one run, on the same file.

    .venv/bin/python bench/whatif.py --size 64M --repeat 3 \\
        base datagram=16000 parallel=8 "datagram=16000 parallel=8"

Each variant gets its own network (a server and four agents on loopback, replicas 3), all
started at once; each repeat does a put and a get of the same random file with every variant in
turn (the order rotates), so a change in the machine's load hits them alike. Knobs:
`datagram=N` (agents' --datagram-size and the client's), `parallel=N` (the client's --parallel),
`part=SIZE` (put --part-size), `replicas=N` (the server's --replicas), `chain=0|1` (the client's
--no-chain or --chain; its default on loopback is no chain), `erasure=K/N` (the client stores
parts erasure-coded, say erasure=2/4), `gateway=1` (put and get with curl
through `dsss gateway`, started once per variant, instead of one CLI process per call; the
client CPU is then the gateway's plus curl's). Prints MB/s (median, min, max), the ratio to the first variant,
and CPU per MB of the client and of the daemons; `--json PATH` keeps the raw figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import compile_bytecode, file_digest, log, make_random_file, render_table, stat_cells, summary  # noqa: E402
from dsss_bench import DsssNetwork  # noqa: E402

from dsss.model import parse_size  # noqa: E402


def parse_variant(text: str) -> dict[str, Any]:
    knobs: dict[str, Any] = {"name": text, "datagram": 65000, "parallel": None, "part": None, "replicas": 3,
                             "chain": None, "gateway": 0, "erasure": None}
    for word in text.split():
        if word == "base":
            continue
        key, sep, value = word.partition("=")
        if not sep or key not in ("datagram", "parallel", "part", "replicas", "chain", "gateway", "erasure"):
            raise SystemExit(f"unknown knob {word!r} (datagram=N, parallel=N, part=SIZE, replicas=N, chain=0|1, "
                             f"gateway=0|1, erasure=K/N)")
        if key not in ("part", "erasure") and not value.isdigit():
            raise SystemExit(f"{key} takes a whole number: {word!r}")
        if key == "erasure":
            from dsss.erasure import Coding, CodingError

            try:
                value = str(Coding.parse(value))
            except CodingError as e:
                raise SystemExit(f"{word!r}: {e}") from None
        knobs[key] = value if key in ("part", "erasure") else int(value)
    return knobs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", help='e.g. base "datagram=16000" "parallel=8 part=4M"')
    ap.add_argument("--size", default="64M")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    compile_bytecode()
    size = parse_size(args.size)
    variants = [parse_variant(v) for v in args.variants]
    work = Path(tempfile.mkdtemp(prefix="dsss-whatif-"))
    nets: list[DsssNetwork] = []
    try:
        for i, v in enumerate(variants):
            options = ["--datagram-size", str(v["datagram"])]
            if v["parallel"]:
                options += ["--parallel", str(v["parallel"])]
            if v["chain"] is not None:
                options += ["--chain" if v["chain"] else "--no-chain"]
            net = DsssNetwork(work / f"v{i}", datagram_size=v["datagram"], replicas=v["replicas"],
                              client_options=options)
            if v["erasure"]:
                config = work / f"v{i}.toml"
                config.write_text(f'erasure = "{v["erasure"]}"\n')
                net.env["DSSS_CONFIG"] = str(config)
            net.start()
            nets.append(net)
            if v["gateway"]:
                net.start_gateway(*(["--part-size", v["part"]] if v["part"] else []))
        src = make_random_file(work / "file.bin", size)
        digest = file_digest(src)
        runs: list[dict[str, list[dict[str, Any]]]] = [{"put": [], "get": []} for _ in variants]
        for r in range(args.repeat):
            order = list(range(len(variants)))
            order = order[r % len(order):] + order[:r % len(order)]
            for i in order:
                v, net = variants[i], nets[i]
                out = work / "out.bin"
                if v["gateway"]:
                    p = net.put_web(src)
                    g = net.get_web(p["address"], out)
                    for x in (p, g):
                        x["cpu_s"] += x["gateway_cpu_s"]
                    if file_digest(out) != digest:
                        raise RuntimeError(f"{v['name']}: the gateway's get returned other bytes")
                    out.unlink()
                    runs[i]["put"].append(p)
                    runs[i]["get"].append(g)
                    log(f"{v['name']}: put {size / 1e6 / p['seconds']:.1f} get {size / 1e6 / g['seconds']:.1f} MB/s")
                    continue
                put_args = ["put", str(src)] + (["--part-size", v["part"]] if v["part"] else [])
                p = net.client(*put_args)
                if p["rc"] != 0:
                    raise RuntimeError(f"{v['name']}: put failed: {p['stderr'][-800:]}")
                g = net.client("get", p["stdout"].split()[0], "-o", str(out))
                if g["rc"] != 0 or file_digest(out) != digest:
                    raise RuntimeError(f"{v['name']}: get failed: {g['stderr'][-800:]}")
                out.unlink()
                runs[i]["put"].append(p)
                runs[i]["get"].append(g)
                log(f"{v['name']}: put {size / 1e6 / p['seconds']:.1f} get {size / 1e6 / g['seconds']:.1f} MB/s")
        rows, result = [], []
        mb = size / 1e6
        base = {op: summary(mb / x["seconds"] for x in runs[0][op])["median"] for op in ("put", "get")}
        for v, rs in zip(variants, runs):
            entry: dict[str, Any] = {"variant": v}
            for op in ("put", "get"):
                s = summary(mb / x["seconds"] for x in rs[op])
                client = summary(x["cpu_s"] / mb * 1000 for x in rs[op])
                daemons = summary(sum(x["daemons_cpu_s"].values()) / mb * 1000 for x in rs[op])
                entry[op] = {"mbps": s, "client_cpu_ms_per_mb": client, "daemons_cpu_ms_per_mb": daemons}
                rows.append([v["name"], op, *stat_cells(s), s["median"] / base[op], client["median"], daemons["median"]])
            result.append(entry)
        print(render_table(["variant", "op", "MB/s median", "min", "max", "vs first", "client CPU ms/MB",
                            "daemons CPU ms/MB"], rows,
                           title=f"what-if: {args.size} file, {args.repeat} repeats, variants interleaved"))
        if args.json:
            Path(args.json).write_text(json.dumps({"size": size, "repeat": args.repeat, "results": result}, indent=1))
    finally:
        for net in nets:
            net.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
