"""``OUTROOT/summary.csv`` and ``OUTROOT/summary.html``: one row per job.

The HTML page is static and self-contained (inline CSS and script, thumbnails as ``data:``
URIs; no server, no network): a header with the counts, a filter box, and a table sortable by
any column (click a header; ``summary.html#sort=job_s:desc`` opens it sorted). Failed rows are
red and list their one-line error, so a user scrolling through 200 subjects spots them by eye.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: Columns of summary.csv (and of the HTML table, after the thumbnail).
FIELDS = ("id", "kind", "status", "ran", "final_metric", "quantity", "stop_reasons",
          "registration_s", "job_s", "started", "finished", "host", "pid", "error", "output")


def _iso(t: Any) -> str:
    if t in (None, ""):
        return ""
    return _dt.datetime.fromtimestamp(float(t), _dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cell(record: Mapping[str, Any], name: str) -> str:
    value = record.get(name)
    if value is None:
        return ""
    if name in ("started", "finished"):
        return _iso(value)
    if name == "stop_reasons":
        return " ".join(value) if isinstance(value, (list, tuple)) else str(value)
    if name in ("registration_s", "job_s") and value != "":
        return f"{float(value):.3f}"
    if name == "final_metric" and value != "":
        return f"{float(value):.6g}"
    return str(value)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_csv(records: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write summary.csv (atomically): one row per job with :data:`FIELDS`."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(FIELDS)
    for record in records:
        writer.writerow([_cell(record, f) for f in FIELDS])
    path = Path(path)
    _write_atomic(path, buffer.getvalue())
    return path


_NUMERIC = {"final_metric", "registration_s", "job_s", "pid"}
_SHOWN = ("id", "kind", "status", "ran", "final_metric", "quantity", "stop_reasons",
          "registration_s", "job_s", "started", "host", "error")
_TITLES = {"final_metric": "final metric", "stop_reasons": "stop", "registration_s":
           "registration s", "job_s": "job s", "ran": "run"}

_STYLE = """
body{font:14px system-ui,sans-serif;margin:1.2em;color:#222}
h1{font-size:1.3em;margin:0 0 .3em}
.counts span{margin-right:1.2em}.counts .failed{color:#b00;font-weight:600}
table{border-collapse:collapse;margin-top:.8em}
th,td{border-bottom:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:middle}
th{cursor:pointer;background:#f3f3f3;position:sticky;top:0;white-space:nowrap}
th.asc::after{content:" \\25B2"}th.desc::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.failed{background:#fde8e8}tr.failed td.status{color:#b00;font-weight:600}
td.error{max-width:40em;font-family:monospace;font-size:12px}
img.thumb{display:block;image-rendering:pixelated;background:#000}
.nothumb{width:80px;height:80px;background:#eee;color:#888;font-size:11px;
display:flex;align-items:center;justify-content:center}
"""

_SCRIPT = """
(function(){
var table=document.getElementById('jobs'),body=table.tBodies[0];
var heads=table.tHead.rows[0].cells;
function key(row,col,numeric){var c=row.cells[col],v=c.getAttribute('data-v');
 if(v===null)v=c.textContent;if(numeric){var x=parseFloat(v);return isNaN(x)?Infinity:x;}
 return v.toLowerCase();}
function sortBy(col,dir){var numeric=heads[col].classList.contains('num');
 var rows=Array.prototype.slice.call(body.rows);
 rows.sort(function(a,b){var x=key(a,col,numeric),y=key(b,col,numeric);
  var r=x<y?-1:x>y?1:0;return dir==='desc'?-r:r;});
 rows.forEach(function(r){body.appendChild(r);});
 for(var i=0;i<heads.length;i++)heads[i].classList.remove('asc','desc');
 heads[col].classList.add(dir);
 document.body.setAttribute('data-sorted',heads[col].getAttribute('data-col')+':'+dir);}
for(var i=0;i<heads.length;i++){(function(i){if(!heads[i].getAttribute('data-col'))return;
 heads[i].addEventListener('click',function(){
  var dir=heads[i].classList.contains('asc')?'desc':'asc';sortBy(i,dir);
  history.replaceState(null,'','#sort='+heads[i].getAttribute('data-col')+':'+dir);});})(i);}
var filter=document.getElementById('filter');
filter.addEventListener('input',function(){var q=filter.value.toLowerCase();
 Array.prototype.forEach.call(body.rows,function(r){
  r.style.display=r.textContent.toLowerCase().indexOf(q)>=0?'':'none';});});
var m=/sort=([a-z_]+):(asc|desc)/.exec(location.hash);
if(m){for(var j=0;j<heads.length;j++)if(heads[j].getAttribute('data-col')===m[1])sortBy(j,m[2]);}
function countImages(){var imgs=document.querySelectorAll('img.thumb'),ok=0;
 Array.prototype.forEach.call(imgs,function(im){if(im.complete&&im.naturalWidth>0)ok++;});
 document.body.setAttribute('data-rows',String(body.rows.length));
 document.body.setAttribute('data-thumbs-loaded',String(ok));}
countImages();window.addEventListener('load',countImages);
})();
"""


def write_html(records: Sequence[Mapping[str, Any]], path: str | os.PathLike, *,
               thumbnails: Mapping[str, bytes | None] | None = None,
               title: str = "itreg batch") -> Path:
    """Write summary.html (atomically); `thumbnails` maps job ids to PNG bytes."""
    thumbnails = thumbnails or {}
    counts: dict[str, int] = {}
    for r in records:
        counts[str(r.get("status"))] = counts.get(str(r.get("status")), 0) + 1
    esc = html.escape
    heads = ['<th>checkerboard</th>'] + [
        f'<th data-col="{c}"{" class=num" if c in _NUMERIC else ""}>'
        f'{esc(_TITLES.get(c, c))}</th>' for c in _SHOWN]
    rows = []
    for r in records:
        job_id = str(r.get("id"))
        png = thumbnails.get(job_id)
        if png:
            data = base64.b64encode(png).decode("ascii")
            thumb = (f'<img class="thumb" alt="{esc(job_id)} checkerboard" '
                     f'src="data:image/png;base64,{data}">')
        else:
            thumb = '<div class="nothumb">no image</div>'
        cells = [f"<td>{thumb}</td>"]
        for c in _SHOWN:
            text = _cell(r, c)
            cls = ["num"] if c in _NUMERIC else []
            if c in ("status", "error"):
                cls.append(c)
            attr = f' class="{" ".join(cls)}"' if cls else ""
            if c == "id" and r.get("status") == "done":
                text_html = f'<a href="{esc(job_id)}/report.json">{esc(text)}</a>'
            else:
                text_html = esc(text)
            value = r.get(c) if c in ("started",) else None
            data_v = f' data-v="{esc(str(value))}"' if value is not None else ""
            cells.append(f"<td{attr}{data_v}>{text_html}</td>")
        status = esc(str(r.get("status")))
        rows.append(f'<tr class="{status}" data-id="{esc(job_id)}">{"".join(cells)}</tr>')
    count_html = "".join(f'<span class="{esc(k)}">{esc(k)}: {v}</span>'
                         for k, v in sorted(counts.items()))
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{esc(title)}</h1><div class=\"counts\"><span>jobs: {len(records)}</span>"
        f"{count_html}<span>written {now}</span></div>"
        "<p>Checkerboards alternate tiles of the fixed image and the warped moving image "
        "(group jobs: warped images 0 and 1): edges run on across tile borders where they are "
        "aligned. Click a column to sort.</p>"
        "<input id=\"filter\" type=\"search\" placeholder=\"filter rows (id, status, error)\" "
        "size=\"40\">"
        f"<table id=\"jobs\"><thead><tr>{''.join(heads)}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
        f"<script>{_SCRIPT}</script></body></html>\n")
    path = Path(path)
    _write_atomic(path, page)
    return path
