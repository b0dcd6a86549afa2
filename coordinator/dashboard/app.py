"""The dashboard: runs list and run pages (HTML) with JSON endpoints behind every page.

    GET /                         runs list            GET /api/runs
    GET /runs/{id}                a run's page         GET /api/runs/{id}, /api/runs/{id}/rounds
    GET /runs/{id}/panel          the page's live part (the page re-fetches it while the run goes on)

Read-only; it shows run records only: never a prefix, a key or a data row (the run record
holds none; the simulation key seed is left out of run.json). Pages are rendered with
Jinja2 (autoescaped: rejection reasons come from nodes) and charts are inline SVG, so it
works offline, without a CDN or external fonts. Text from a record is shown cut to
SHOWN_CHARS, its control and invisible characters escaped; answers name files relative to the
runs folder; every answer forbids framing and scripts other than the page's own.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
import re
from collections.abc import Collection
from pathlib import Path

from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse, JSONResponse
from fedprefix.common.http_guards import HostCheck
from fedprefix.coordinator.records import RunFolderError
from fedprefix.coordinator.runs import is_run_id, list_runs, load_run, summarize
from fedprefix.coordinator.views import fmt_num, mode_label, printable
from jinja2 import Environment, select_autoescape

from .charts import line_chart

POLL_MS = 2000
TABLE_ROWS = 100  # the run page's tables show the latest rounds and rejections; the JSON has all
SHOWN_CHARS = 300  # of one text from a record (a node's reasons are cut to this when recorded)


def shown(text: object) -> str:
    """A record's text for a page: control and invisible characters escaped (bidi overrides could
    reorder what a reader sees), cut to SHOWN_CHARS (a 100 MB reason made a 100 MB page)."""
    text = str(text)
    return (
        printable(text) if len(text) <= SHOWN_CHARS else printable(text[:SHOWN_CHARS]) + f"… ({len(text):,} characters)"
    )


_env = Environment(autoescape=select_autoescape(default=True, default_for_string=True))
_env.filters["num"] = fmt_num
_env.filters["mode"] = lambda config: shown(mode_label(config))
_env.filters["shown"] = shown
_env.filters["when"] = lambda t: "-" if not t else datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; margin: 12px 0; font-size: 14px; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.charts { display: flex; flex-wrap: wrap; gap: 16px; }
svg.chart { border: 1px solid #eee; background: #fff; }
svg .grid { stroke: #eee; } svg .tick, svg .legend { font-size: 11px; fill: #555; } svg .title { font-size: 13px; }
.status-running { color: #b58900; } .status-finished { color: #2aa198; } .status-failed { color: #dc322f; }
.muted { color: #777; font-size: 13px; }
"""

LAYOUT = _env.from_string("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }} · fedprefix</title>
<style>{{ style }}</style></head><body>
<p class="muted"><a href="/">runs</a> · fedprefix dashboard (read-only)</p>
{{ body | safe }}
</body></html>""")

RUNS_PAGE = _env.from_string("""<h1>Runs</h1>
{% if not runs %}<p>No runs in {{ folder }} yet. Start one: <code>fedprefix simulate --out {{ folder }}/demo</code></p>
{% else %}<table id="runs"><tr><th>run</th><th>status</th><th>mode</th><th>base</th><th>users</th><th>rounds</th>
<th>base loss</th><th>shared</th><th>personal</th><th>started</th><th>problems</th></tr>
{% for r in runs %}<tr><td>{% if r.linkable %}<a href="/runs/{{ r.id | urlencode }}">{{ r.id | shown }}</a>{% else %}{{ r.id | shown }}{% endif %}</td>
<td class="status-{{ r.status }}">{{ r.status }}</td><td>{{ r.mode | shown }}</td><td>{{ r.base | shown }}</td><td>{{ r.users }}</td>
<td>{{ r.rounds_done }}/{{ r.rounds_planned }}</td><td>{{ r.last_eval_loss_base | num }}</td>
<td>{{ r.last_eval_loss_shared | num }}</td><td>{{ r.last_eval_loss_personal | num }}</td>
<td>{{ r.started | when }}</td><td class="status-failed" style="text-align:left">{% for p in r.problems[:3] %}{{ p | shown }}<br>{% endfor %}{% if r.problems | length > 3 %}and {{ r.problems | length - 3 }} more{% endif %}</td></tr>{% endfor %}</table>{% endif %}""")

# The run page's one script, the same text on every page, so that the Content-Security-Policy
# allows it by its hash and nothing else: an injected script would not run.
POLL_SCRIPT = f"""
// Re-fetch the live part while the run goes on; no page reload, no external script.
(function poll() {{
  const panel = document.getElementById("panel");
  if (panel.dataset.status !== "running") return;
  setTimeout(async () => {{
    try {{
      const reply = await fetch(location.pathname.replace(/\\/$/, "") + "/panel");
      if (reply.ok) {{
        panel.innerHTML = await reply.text();
        panel.dataset.status = reply.headers.get("X-Run-Status") || "running";
      }}
    }} finally {{ poll(); }}
  }}, {POLL_MS});
}})();
"""
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(POLL_SCRIPT.encode()).digest()).decode()
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        f"default-src 'none'; script-src 'sha256-{_SCRIPT_HASH}'; style-src 'unsafe-inline'; connect-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}

RUN_PAGE = _env.from_string("""<h1>Run {{ run_id }}</h1>
<div id="panel" data-status="{{ status }}">{{ panel | safe }}</div>
<script>{{ script | safe }}</script>""")

PANEL = _env.from_string("""<p><span class="status-{{ info.status }}">{{ info.status }}</span> · mode {{ info.config | mode }}
· base {{ info.base | shown }} <span class="muted">({{ info.base_fingerprint[:12] | shown }}…)</span> · {{ info.config.num_users | shown }} users
· {{ rounds_done }}/{{ info.config.num_rounds | shown }} rounds · aggregator {{ info.config.aggregator | shown }}
· started {{ info.started | when }}{% if info.ended %} · ended {{ info.ended | when }}{% endif %}</p>
{% if info.error %}<p class="status-failed">error: {{ info.error | shown }}</p>{% endif %}
{% for p in problems %}<p class="status-failed">{{ p | shown }}</p>{% endfor %}
<div class="charts">{{ loss_chart | safe }}{{ norm_chart | safe }}{{ uplink_chart | safe }}</div>
<h2>Rounds</h2>
{% if rounds | length < rounds_done %}<p class="muted" id="rounds-note">The latest {{ rounds | length }} of {{ rounds_done }} rounds;
all of them: <a href="/api/runs/{{ run_id }}/rounds">/api/runs/{{ run_id }}/rounds</a>.</p>{% endif %}
<table id="rounds"><tr><th>round</th><th>users</th><th>accepted</th><th>rejected</th><th>train loss</th>
<th>base</th><th>shared</th><th>personal</th><th>gain</th><th>update norm</th><th>uplink bytes</th><th>seconds</th>
{% if dp %}<th>ε (δ)</th>{% endif %}</tr>
{% for r in rounds %}<tr class="round"><td>{{ r.round }}</td><td>{{ r.sampled_users | length }}</td>
<td>{{ r.replies_accepted }}</td><td>{{ r.replies_rejected }}</td><td>{{ r.train_loss | num }}</td>
<td>{{ r.eval_loss_base | num }}</td><td>{{ r.eval_loss_shared | num }}</td><td>{{ r.eval_loss_personal | num }}</td>
<td>{{ r.personalization_gain | num }}</td>
<td>{{ r.shared_update_norm | num }}</td><td>{{ "{:,}".format(r.uplink_bytes) }}</td><td>{{ r.seconds | num(1) }}</td>
{% if dp %}<td>{% if r.privacy and r.privacy.epsilon is not none %}{{ r.privacy.epsilon | num(2) }} ({{ r.privacy.delta }}){% else %}{{ r.privacy.reason if r.privacy else "-" }}{% endif %}</td>{% endif %}
</tr>{% endfor %}</table>
{% if rejections %}<h2>Rejected replies</h2>{% if rejections | length < rejections_total %}
<p class="muted">The latest {{ rejections | length }} of {{ rejections_total }}.</p>{% endif %}<table id="rejections"><tr><th>round</th><th>node</th><th>reason</th></tr>
{% for round, rej in rejections %}<tr><td>{{ round }}</td><td>{{ rej.node | shown }}</td><td style="text-align:left">{{ rej.reason | shown }}</td></tr>{% endfor %}
</table>{% endif %}
{% if dp %}<p>Differential privacy: noise multiplier {{ dp.noise_multiplier | shown }}, clipping norm {{ dp.clipping_norm | shown }}.</p>{% endif %}
<p class="muted">JSON: <a href="/api/runs/{{ run_id }}">/api/runs/{{ run_id }}</a>,
<a href="/api/runs/{{ run_id }}/rounds">/api/runs/{{ run_id }}/rounds</a></p>""")


def create_dashboard(runs_dir: str | os.PathLike, allowed_hosts: Collection[str] | None = None) -> FastAPI:
    """The dashboard app over the run folders in `runs_dir`; `allowed_hosts`: the Host names it
    answers (None: any; common.http_guards.allowed_hosts)."""
    # no /docs: FastAPI's pages load Swagger from a CDN, and the dashboard works offline
    app = FastAPI(title="fedprefix dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    # the runs folder's path where a message names it whole (not inside a run id, nor every "."
    # of a folder given as "."), followed by a separator or by nothing more of a path
    named = re.compile(rf"(?<![\w.\-/]){re.escape(str(Path(runs_dir)))}(?:{re.escape(os.sep)}|(?![\w.\-/]))")

    def public(text: str) -> str:
        """`text` naming files relative to the runs folder: an answer does not show where it is."""
        return named.sub(lambda found: "" if found.group().endswith(os.sep) else "the runs folder", text)

    @app.middleware("http")
    async def security_headers(request, call_next):
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    bad_host = lambda scope, message: JSONResponse({"detail": message}, 400, headers=SECURITY_HEADERS)  # noqa: E731
    app.add_middleware(HostCheck, allowed=allowed_hosts, refuse=bad_host)

    def page(title: str, body: str) -> HTMLResponse:
        return HTMLResponse(LAYOUT.render(title=title, style=STYLE, body=body))

    def load(run_id: str):
        try:
            info, rounds, problems = load_run(runs_dir, run_id)
        except RunFolderError as exc:
            raise HTTPException(status_code=404, detail=public(str(exc))) from exc
        return info, rounds, [public(p) for p in problems]

    def panel_html(run_id: str) -> tuple[str, str]:
        info, rounds, problems = load(run_id)
        numbers = [r.round for r in rounds]
        loss = line_chart(
            "held-out loss per token",
            numbers,
            {
                "base": [r.eval_loss_base for r in rounds],
                "shared": [r.eval_loss_shared for r in rounds],
                "personal": [r.eval_loss_personal for r in rounds],
            },
        )
        norm = line_chart("shared update norm", numbers, {"norm": [r.shared_update_norm for r in rounds]})
        uplink = line_chart("uplink bytes", numbers, {"bytes": [float(r.uplink_bytes) for r in rounds]})
        rejections = [(r.round, rej) for r in rounds for rej in r.rejected]
        dp = next((r.privacy for r in reversed(rounds) if r.privacy is not None), None)
        html = PANEL.render(
            info=info,
            rounds=rounds[-TABLE_ROWS:],
            rounds_done=len(rounds),
            problems=problems,
            loss_chart=loss,
            norm_chart=norm,
            uplink_chart=uplink,
            rejections=rejections[-TABLE_ROWS:],
            rejections_total=len(rejections),
            dp=dp,
            run_id=run_id,
        )
        return html, info.status

    def summaries():
        try:
            found = list_runs(runs_dir)
        except RunFolderError as exc:
            raise HTTPException(status_code=404, detail=public(str(exc))) from exc
        for summary in found:
            summary.problems = [public(p) for p in summary.problems]
        return found

    @app.get("/", response_class=HTMLResponse)
    def runs_page():
        runs = [{**s.model_dump(), "linkable": is_run_id(s.id)} for s in summaries()]
        return page("runs", RUNS_PAGE.render(runs=runs, folder=str(runs_dir)))

    @app.get("/runs/{run_id}", response_class=HTMLResponse)
    def run_page(run_id: str):
        html, status = panel_html(run_id)
        return page(f"run {run_id}", RUN_PAGE.render(run_id=run_id, panel=html, status=status, script=POLL_SCRIPT))

    @app.get("/runs/{run_id}/panel", response_class=HTMLResponse)
    def run_panel(run_id: str):
        html, status = panel_html(run_id)
        return HTMLResponse(html, headers={"X-Run-Status": status})

    @app.get("/api/runs")
    def api_runs():
        return [s.model_dump() for s in summaries()]

    @app.get("/api/runs/{run_id}")
    def api_run(run_id: str):
        info, rounds, problems = load(run_id)
        return {"summary": summarize(run_id, info, rounds, problems).model_dump(), "run": info.model_dump()}

    @app.get("/api/runs/{run_id}/rounds")
    def api_rounds(run_id: str, after: int = -1, limit: int | None = Query(None, ge=1)):
        """Every round, or those numbered above `after`, at most `limit` of them (pages of a long run)."""
        _, rounds, problems = load(run_id)
        rounds = [r for r in rounds if r.round > after][:limit]
        return {"rounds": [r.model_dump() for r in rounds], "problems": problems}

    return app
