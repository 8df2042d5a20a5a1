# -*- test-case-name: tests.adapters.test_status_metrics -*-
"""The operators' status page served at `/`: one self-contained HTML document.

The page is rendered here from `DiscoveryServer.status()` so it shows without JavaScript; a small
inline script then fetches `api/status` every 2 s and rebuilds the same markup with DOM calls
(`textContent`, never `innerHTML`). There are no external assets and no build step; the
Content-Security-Policy sent with the page allows exactly the inline script and style below,
identified by their hashes, and requests to this server only.

Both renderers produce the same elements: numbers carry their exact value in `data-value` and a
human-readable text (binary units, one decimal rounded half up, as JavaScript's `toFixed` does).
"""

from __future__ import annotations

import base64
import hashlib
from datetime import datetime, timezone
from decimal import ROUND_HALF_UP, Decimal
from html import escape
from typing import Any

STATUS_AGENTS = 200
"""Agents listed on one page of the status document (the totals cover every agent)."""
STATUS_MAX_AGENTS = 1000
"""The most a caller may ask for on one page (`/api/status?limit=`)."""
STATUS_RATE = 5.0
"""Requests per second one IP address may make to `/`, `/api/status` and `/metrics`."""


REFRESH_SECONDS = 2
UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")

STYLE = """
:root { color-scheme: light dark; --fg: #1d2330; --muted: #667085; --bg: #f6f7f9; --card: #fff;
  --line: #e3e6eb; --ok: #18794e; --bad: #c0362c; --accent: #2f6fde; }
@media (prefers-color-scheme: dark) { :root { --fg: #e6e8ec; --muted: #98a2b3; --bg: #14171c;
  --card: #1d2128; --line: #2c323c; --ok: #4cc38a; --bad: #f07167; --accent: #7aa7ff; } }
* { box-sizing: border-box; }
body { margin: 0; padding: 24px 32px; font: 14px/1.45 system-ui, -apple-system, "Segoe UI",
  Roboto, sans-serif; color: var(--fg); background: var(--bg); }
header { display: flex; align-items: baseline; gap: 16px; flex-wrap: wrap; }
h1 { font-size: 22px; margin: 0; }
h2 { font-size: 15px; margin: 24px 0 8px; text-transform: uppercase; letter-spacing: .04em;
  color: var(--muted); }
#meta { color: var(--muted); margin: 0; }
#updated.stale { color: var(--bad); font-weight: 600; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 10px;
  margin: 0; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
  padding: 10px 14px; }
.card dt { color: var(--muted); font-size: 12px; }
.card dd { margin: 2px 0 0; font-size: 20px; font-weight: 600; font-variant-numeric: tabular-nums; }
table { width: 100%; border-collapse: collapse; background: var(--card);
  border: 1px solid var(--line); border-radius: 8px; overflow: hidden; }
th, td { padding: 6px 10px; text-align: left; border-bottom: 1px solid var(--line);
  white-space: nowrap; }
th { font-size: 12px; color: var(--muted); font-weight: 600; }
tr:last-child td { border-bottom: none; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.empty { color: var(--muted); text-align: center; padding: 14px; }
code { font: 12px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
meter { width: 90px; vertical-align: middle; margin-right: 6px; }
.badge { display: inline-block; padding: 0 8px; border-radius: 10px; font-size: 12px;
  font-weight: 600; border: 1px solid currentColor; }
.ok { color: var(--ok); }
.bad { color: var(--bad); }
footer { margin-top: 24px; color: var(--muted); font-size: 12px; }
"""

SCRIPT = """
"use strict";
(function () {
  var UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
  function bytes(n) {
    if (n < 1024) { return n + " B"; }
    var v = n, i = 0;
    while (v >= 1024 && i < UNITS.length - 1) { v /= 1024; i += 1; }
    return v.toFixed(1) + " " + UNITS[i];
  }
  function clock(t) { return new Date(t * 1000).toISOString().slice(11, 19) + " UTC"; }
  function el(tag, attrs) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (attrs[k] !== null && attrs[k] !== undefined) { node.setAttribute(k, String(attrs[k])); }
    });
    for (var i = 2; i < arguments.length; i += 1) {
      var c = arguments[i];
      if (c === null || c === undefined) { continue; }
      node.appendChild(typeof c === "object" ? c : document.createTextNode(String(c)));
    }
    return node;
  }
  function card(id, label, value, text) {
    return el("div", {"class": "card"}, el("dt", {}, label),
              el("dd", {id: id, "data-value": value}, text));
  }
  function num(value, text) { return el("td", {"class": "num", "data-value": value}, text); }
  function table(id, heads, rows, empty) {
    var head = el("tr", {});
    heads.forEach(function (h) { head.appendChild(el("th", {}, h)); });
    var body = el("tbody", {});
    if (rows.length === 0) {
      body.appendChild(el("tr", {}, el("td", {"class": "empty", colspan: heads.length}, empty)));
    }
    rows.forEach(function (r) { body.appendChild(r); });
    return el("table", {id: id}, el("thead", {}, head), body);
  }
  function render(s) {
    var t = s.totals, a = s.activity, out = [];
    out.push(el("h2", {}, "Network"));
    out.push(el("dl", {"class": "cards", id: "totals"},
      card("total-agents", "Agents", t.agents, String(t.agents)),
      card("total-live", "Live", t.live, String(t.live)),
      card("total-capacity", "Capacity", t.capacity, bytes(t.capacity)),
      card("total-used", "Used", t.used, bytes(t.used)),
      card("total-free", "Free", t.free, bytes(t.free)),
      card("total-leased", "Leased", t.leased, bytes(t.leased)),
      card("total-expired", "Expired", t.expired, bytes(t.expired)),
      card("total-collected", "Collected", t.collected, bytes(t.collected)),
      card("total-parts", "Parts stored", t.parts, String(t.parts)),
      card("total-parts-indexed", "Distinct parts", t["parts-indexed"], String(t["parts-indexed"]))));
    out.push(el("h2", {}, "Activity"));
    out.push(el("dl", {"class": "cards", id: "activity"},
      card("activity-puts", "Puts", a.puts, String(a.puts)),
      card("activity-gets", "Gets", a.gets, String(a.gets)),
      card("activity-who-has", "Who-has", a["who-has"], String(a["who-has"])),
      card("activity-failures", "Failures", a.failures, String(a.failures)),
      card("activity-relayed-bytes", "Relayed", a["relayed-bytes"], bytes(a["relayed-bytes"]))));
    out.push(el("h2", {}, "Agents"));
    out.push(table("agents",
      ["Agent", "Public address", "Reached", "State", "Capacity", "Used", "Free", "Parts",
       "Last heartbeat", "Version"],
      s.agents.map(function (g) {
        return el("tr", {"data-agent": g.id},
          el("td", {}, el("code", {title: g.id}, g.id.slice(0, 16))),
          el("td", {"class": "address"}, g.address === null ? "unknown" : g.address),
          el("td", {"class": "reached"}, g.reached),
          el("td", {}, el("span", {"class": "badge " + (g.live ? "ok" : "bad")},
                          g.live ? "live" : "down")),
          num(g.capacity, bytes(g.capacity)),
          el("td", {"class": "num", "data-value": g.used},
             el("meter", {min: 0, max: Math.max(1, g.capacity), value: g.used}), bytes(g.used)),
          num(g.free, bytes(g.free)),
          num(g.parts, String(g.parts)),
          num(g["last-heartbeat"], g["last-heartbeat"].toFixed(1) + " s ago"),
          el("td", {}, g.version));
      }), "No agent has registered yet."));
    if (s.next !== null && s.next !== undefined) {
      out.push(el("p", {id: "agents-more"}, "The first " + s.agents.length + " of " + t.agents +
        " agents; the rest through api/status?after=" + s.next));
    }
    out.push(el("h2", {}, "Recent activity"));
    out.push(table("recent", ["Time", "Operation", "Part", "Agent", "Result"],
      a.recent.map(function (e) {
        return el("tr", {},
          el("td", {}, clock(e.time)),
          el("td", {}, e.kind),
          el("td", {}, el("code", {}, e.part)),
          el("td", {}, e.agent !== null ? e.agent :
                       e.holders === null ? "" : e.holders + (e.holders === 1 ? " holder" : " holders")),
          el("td", {"class": e.ok ? "ok" : "bad"}, e.ok ? "ok" : (e.error || "failed")));
      }), "Nothing yet."));
    return out;
  }
  var main = document.getElementById("status");
  var updated = document.getElementById("updated");
  var refreshes = 0;
  function refresh() {
    fetch("api/status", {cache: "no-store", headers: {accept: "application/json"}})
      .then(function (r) {
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.json();
      })
      .then(function (s) {
        main.replaceChildren.apply(main, render(s));
        refreshes += 1;
        main.setAttribute("data-refreshes", String(refreshes));
        updated.textContent = "updated " + clock(s.server.time);
        updated.className = "";
      })
      .catch(function (e) {
        updated.textContent = "server unreachable (" + e.message + "), retrying";
        updated.className = "stale";
      });
  }
  refresh();
  setInterval(refresh, REFRESH_MS);
})();
""".replace("REFRESH_MS", str(REFRESH_SECONDS * 1000))


def _csp_hash(text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


CONTENT_SECURITY_POLICY = (
    "default-src 'none'; connect-src 'self'; img-src data:; "
    f"script-src {_csp_hash(SCRIPT)}; style-src {_csp_hash(STYLE)}; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _fixed1(value: float) -> str:
    """`value` with one decimal, ties rounded away from zero like JavaScript's toFixed(1)."""
    return str(Decimal(value).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))


def format_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value, i = float(n), 0
    while value >= 1024 and i < len(UNITS) - 1:
        value /= 1024
        i += 1
    return f"{_fixed1(value)} {UNITS[i]}"


def format_clock(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%H:%M:%S") + " UTC"


def _attrs(attrs: dict[str, Any]) -> str:
    return "".join(f' {k}="{escape(str(v))}"' for k, v in attrs.items() if v is not None)


def _el(tag: str, attrs: dict[str, Any] | None, *children: str) -> str:
    """An element; `children` are markup already (use `_text` for text)."""
    return f"<{tag}{_attrs(attrs or {})}>{''.join(children)}</{tag}>"


def _text(value: Any) -> str:
    return escape(str(value))


def _card(id_: str, label: str, value: int, text: str) -> str:
    return _el("div", {"class": "card"}, _el("dt", None, _text(label)),
               _el("dd", {"id": id_, "data-value": value}, _text(text)))


def _num(value: Any, text: str) -> str:
    return _el("td", {"class": "num", "data-value": value}, _text(text))


def _table(id_: str, heads: list[str], rows: list[str], empty: str) -> str:
    head = _el("tr", None, *(_el("th", None, _text(h)) for h in heads))
    if not rows:
        rows = [_el("tr", None, _el("td", {"class": "empty", "colspan": len(heads)}, _text(empty)))]
    return _el("table", {"id": id_}, _el("thead", None, head), _el("tbody", None, *rows))


def _agent_row(g: dict[str, Any]) -> str:
    live = bool(g["live"])
    return _el(
        "tr",
        {"data-agent": g["id"]},
        _el("td", None, _el("code", {"title": g["id"]}, _text(g["id"][:16]))),
        _el("td", {"class": "address"}, _text("unknown" if g["address"] is None else g["address"])),
        _el("td", {"class": "reached"}, _text(g["reached"])),
        _el("td", None, _el("span", {"class": "badge " + ("ok" if live else "bad")},
                            "live" if live else "down")),
        _num(g["capacity"], format_bytes(g["capacity"])),
        _el("td", {"class": "num", "data-value": g["used"]},
            _el("meter", {"min": 0, "max": max(1, g["capacity"]), "value": g["used"]}),
            _text(format_bytes(g["used"]))),
        _num(g["free"], format_bytes(g["free"])),
        _num(g["parts"], str(g["parts"])),
        _num(g["last-heartbeat"], f"{_fixed1(g['last-heartbeat'])} s ago"),
        _el("td", None, _text(g["version"])),
    )


def _event_agent(e: dict[str, Any]) -> str:
    if e["agent"] is not None:
        return str(e["agent"])
    holders = e.get("holders")
    if holders is None:
        return ""
    return f"{holders} holder" + ("" if holders == 1 else "s")


def _event_row(e: dict[str, Any]) -> str:
    result = "ok" if e["ok"] else (e["error"] or "failed")
    return _el(
        "tr",
        None,
        _el("td", None, _text(format_clock(e["time"]))),
        _el("td", None, _text(e["kind"])),
        _el("td", None, _el("code", None, _text(e["part"]))),
        _el("td", None, _text(_event_agent(e))),
        _el("td", {"class": "ok" if e["ok"] else "bad"}, _text(result)),
    )


def render_sections(status: dict[str, Any]) -> str:
    """The content of `<main id="status">`, as the script rebuilds it."""
    t, a = status["totals"], status["activity"]
    return "".join([
        _el("h2", None, "Network"),
        _el("dl", {"class": "cards", "id": "totals"},
            _card("total-agents", "Agents", t["agents"], str(t["agents"])),
            _card("total-live", "Live", t["live"], str(t["live"])),
            _card("total-capacity", "Capacity", t["capacity"], format_bytes(t["capacity"])),
            _card("total-used", "Used", t["used"], format_bytes(t["used"])),
            _card("total-free", "Free", t["free"], format_bytes(t["free"])),
            _card("total-leased", "Leased", t["leased"], format_bytes(t["leased"])),
            _card("total-expired", "Expired", t["expired"], format_bytes(t["expired"])),
            _card("total-collected", "Collected", t["collected"], format_bytes(t["collected"])),
            _card("total-parts", "Parts stored", t["parts"], str(t["parts"])),
            _card("total-parts-indexed", "Distinct parts", t["parts-indexed"], str(t["parts-indexed"]))),
        _el("h2", None, "Activity"),
        _el("dl", {"class": "cards", "id": "activity"},
            _card("activity-puts", "Puts", a["puts"], str(a["puts"])),
            _card("activity-gets", "Gets", a["gets"], str(a["gets"])),
            _card("activity-who-has", "Who-has", a["who-has"], str(a["who-has"])),
            _card("activity-failures", "Failures", a["failures"], str(a["failures"])),
            _card("activity-relayed-bytes", "Relayed", a["relayed-bytes"],
                  format_bytes(a["relayed-bytes"]))),
        _el("h2", None, "Agents"),
        _table("agents", ["Agent", "Public address", "Reached", "State", "Capacity", "Used", "Free",
                          "Parts", "Last heartbeat", "Version"],
               [_agent_row(g) for g in status["agents"]], "No agent has registered yet."),
        _more_agents(status),
        _el("h2", None, "Recent activity"),
        _table("recent", ["Time", "Operation", "Part", "Agent", "Result"],
               [_event_row(e) for e in a["recent"]], "Nothing yet."),
    ])


def _more_agents(status: dict[str, Any]) -> str:
    """Beyond one page of agents the page lists the first and says where the rest are."""
    if status.get("next") is None:
        return ""
    return _el("p", {"id": "agents-more"}, _text(
               f"The first {len(status['agents'])} of {status['totals']['agents']} agents; "
               f"the rest through api/status?after={status['next']}"))


def render_page(status: dict[str, Any]) -> bytes:
    server = status["server"]
    meta = (
        f"server {_text(server['version'])} · {_text(server['replicas'])} replicas per part · "
        f"heartbeat {_text(server['heartbeat'])} s · "
        f'<span id="updated">updated {_text(format_clock(server["time"]))}</span>'
    )
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="referrer" content="no-referrer">'
        '<link rel="icon" href="data:,">'
        "<title>DSSS network status</title>"
        '<noscript><meta http-equiv="refresh" content="10"></noscript>'
        f"<style>{STYLE}</style></head>\n<body>"
        f'<header><h1>DSSS network status</h1><p id="meta">{meta}</p></header>\n'
        f'<main id="status">{render_sections(status)}</main>\n'
        f"<footer>Refreshes every {REFRESH_SECONDS} s from "
        '<a href="api/status">api/status</a>; Prometheus metrics at <a href="metrics">metrics</a>.'
        "</footer>\n"
        f"<script>{SCRIPT}</script>\n</body></html>\n"
    ).encode("utf-8")
