"""A single self-contained HTML page of a report: settings, tables, figures (embedded), provenance.

Nothing is referenced from outside the page: figures are PNG ``data:`` URIs or
inline SVG, styles are inline, there are no scripts, so the file can be
attached to a CI run and opened anywhere.
"""
from __future__ import annotations

import base64
import html
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import unit_settings
from .tables import Table, to_html

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1200px;color:#222;
padding:0 1em;line-height:1.4}
h1{font-size:1.6em}h2{font-size:1.3em;border-bottom:1px solid #ccc;margin-top:2em}h3{font-size:1.05em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.82em;font-variant-numeric:tabular-nums}
caption{text-align:left;font-weight:600;padding:.3em 0}
th,td{border:1px solid #ddd;padding:.15em .5em;text-align:right}th{background:#f2f4f7}
td:first-child,th:first-child{text-align:left}
.settings{background:#f7f7f2;border-left:3px solid #999;padding:.3em .6em;font-size:.9em}
.warn{color:#8a4b00}.note{font-size:.85em;color:#444;margin:.2em 0}
figure{margin:1em 0}figure img,figure svg{max-width:100%;height:auto}
figcaption{font-size:.85em;color:#555}
details{margin:.5em 0}code{font-size:.85em;word-break:break-all}
"""


@dataclass
class Group:
    settings: str
    tables: list[Table] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)


@dataclass
class Section:
    analysis: str
    groups: list[Group] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def figure_html(path: Path) -> str:
    """A figure file as an embedded ``<figure>`` (PNG as a data URI, SVG inline)."""
    cap = f"<figcaption>{html.escape(path.name)}</figcaption>"
    if path.suffix == ".svg":
        svg = path.read_text(encoding="utf-8")
        svg = re.sub(r"<\?xml[^>]*\?>", "", svg)
        svg = re.sub(r"<!DOCTYPE[^>]*>", "", svg)
        return f"<figure>{svg}{cap}</figure>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">{cap}</figure>'


def _kv_table(title: str, rows: list[list[Any]], cols: list[str]) -> str:
    return to_html(Table(title, cols, rows))


def provenance(results: list[dict[str, Any]]) -> str:
    """Versions, hosts, command lines and checkpoints (sha256) of every unit shown."""
    import json

    versions: dict[tuple, int] = {}
    hosts: dict[str, int] = {}
    commands: dict[str, int] = {}
    checkpoints: dict[str, str] = {}
    created = []
    for r in results:
        m = unit_settings.meta(r)
        key = (m.get("analysis"), m.get("analysis_version"), m.get("sam_probe_version"), m.get("torch_version"))
        versions[key] = versions.get(key, 0) + 1
        hosts[str(m.get("host"))] = hosts.get(str(m.get("host")), 0) + 1
        cmd = m.get("command")
        cmd = " ".join(map(str, cmd)) if isinstance(cmd, list) else str(cmd)
        commands[cmd] = commands.get(cmd, 0) + 1
        paths, shas = m.get("checkpoint"), m.get("sha256")
        if isinstance(paths, str) and paths.startswith("["):
            try:
                paths, shas = json.loads(paths), json.loads(shas)
            except (ValueError, TypeError):
                paths, shas = [paths], [shas]
        paths = paths if isinstance(paths, list) else [paths]
        shas = shas if isinstance(shas, list) else [shas]
        for p, s in zip(paths, shas):
            if p is not None:
                checkpoints[str(p)] = str(s)
        if m.get("created"):
            created.append(str(m["created"]))
    out = [_kv_table("versions", [[a, v, sp, t, n] for (a, v, sp, t), n in sorted(versions.items(), key=str)],
                     ["analysis", "analysis version", "sam-probe", "torch", "units"])]
    out.append(_kv_table("hosts", [[h, n] for h, n in sorted(hosts.items())], ["host", "units"]))
    if created:
        out.append(f'<p class="note">units computed {html.escape(min(created))} … {html.escape(max(created))}</p>')
    out.append("<details><summary>command lines ({})</summary>{}</details>".format(
        len(commands), "".join(f"<p><code>{html.escape(c)}</code> ({n} unit{'s' if n != 1 else ''})</p>" for c, n in commands.items())))
    out.append("<details><summary>checkpoints and sha256 ({})</summary>{}</details>".format(
        len(checkpoints), _kv_table("checkpoints", [[p, s] for p, s in sorted(checkpoints.items())],
                                    ["checkpoint", "sha256"])))
    return "\n".join(out)


def page(source: str, sections: list[Section], results: list[dict[str, Any]], extra_tables: list[Table],
         skipped: list[tuple[str, str]], summary: str) -> str:
    """The whole report as one HTML document."""
    from .. import __version__

    head = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>sam-probe report: {html.escape(source)}</title><style>{STYLE}</style></head><body>")
    body = [f"<h1>sam-probe report</h1><p>results: <code>{html.escape(source)}</code> · {html.escape(summary)}</p>",
            f"<p class='note'>written {time.strftime('%Y-%m-%d %H:%M:%S %z')} by sam-probe {html.escape(__version__)}"
            f" (Python {platform.python_version()}) on {html.escape(platform.node())}</p>"]
    if sections:
        body.append("<p>" + " · ".join(f"<a href='#{html.escape(s.analysis)}'>{html.escape(s.analysis)}</a>"
                                       for s in sections) + "</p>")
    if skipped:
        body.append("<h2>skipped files</h2><ul>" + "".join(
            f"<li class='warn'><code>{html.escape(n)}</code>: {html.escape(w)}</li>" for n, w in skipped) + "</ul>")
    for s in sections:
        body.append(f"<h2 id='{html.escape(s.analysis)}'>{html.escape(s.analysis)}</h2>")
        body += [f"<p class='warn'>warning: {html.escape(w)}</p>" for w in s.warnings]
        for i, g in enumerate(s.groups):
            if len(s.groups) > 1:
                body.append(f"<h3>settings group {i + 1} of {len(s.groups)}</h3>")
            body.append(f"<p class='settings'>{html.escape(g.settings)}</p>")
            body += [to_html(t) for t in g.tables]
            body += [figure_html(p) for p in g.figures]
    if extra_tables:
        body.append("<h2>checkpoints</h2>" + "".join(to_html(t) for t in extra_tables))
    body.append("<h2>provenance</h2>" + provenance(results))
    return head + "\n".join(body) + "</body></html>\n"
