"""Building blocks of a self-contained HTML page: escaping, inlined images, tables, the shell.

Everything a page shows comes from files (names, reasons, configuration), so every string
goes through `esc`; images are inlined as data: URIs, so the page works offline from a USB
stick and never touches the network.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import json
import math
import os
import re

from PIL import Image, UnidentifiedImageError

# C0 controls (but tab, newline, carriage return) are not allowed in HTML text.
_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def esc(value) -> str:
    """Text for HTML content or a quoted attribute: <, >, &, both quotes escaped,
    control characters replaced by U+FFFD."""
    return html.escape(_CONTROLS.sub("\ufffd", str(value)), quote=True)


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fmt(x, digits: int = 2) -> str:
    """A number as the page shows it (fixed `digits` decimals); an en dash when missing."""
    if isinstance(x, bool) or not is_number(x):
        return "\u2013"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}f}"


def num_cell(x, digits: int = 2, cls: str = "") -> str:
    """A table cell holding a number: the formatted text, the exact value in data-v (sorting)."""
    v = repr(float(x)) if is_number(x) else ""
    c = f' class="{esc(cls)}"' if cls else ""
    return f'<td{c} data-v="{esc(v)}">{esc(fmt(x, digits))}</td>'


def text_cell(s, cls: str = "") -> str:
    c = f' class="{esc(cls)}"' if cls else ""
    return f'<td{c} data-v="{esc(s)}">{esc(s)}</td>'


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def thumbnail_uri(path, max_px: int) -> str | None:
    """An image file downscaled (aspect kept) to at most `max_px` a side, as a JPEG data:
    URI (a quarter of a PNG's size on noisy photographs); None when the file is missing
    or not an image."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _thumbnail(str(path), st.st_mtime_ns, st.st_size, max_px)


# A server rewrites its page after every image: thumbnails of unchanged files are reused.
@functools.lru_cache(maxsize=4096)
def _thumbnail(path: str, mtime_ns: int, size: int, max_px: int) -> str | None:
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((max_px, max_px), Image.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=85)
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    return data_uri(buf.getvalue(), "image/jpeg")


def img_tag(uri: str | None, alt: str, cls: str = "thumb") -> str:
    if uri is None:
        return f'<span class="missing" title="{esc(alt)}">no image</span>'
    return f'<img class="{esc(cls)}" src="{uri}" alt="{esc(alt)}" title="{esc(alt)}">'


def value_html(v) -> str:
    """Any JSON value, rendered generically: nested objects as definition tables."""
    if isinstance(v, dict):
        if not v:
            return "<i>empty</i>"
        rows = "".join(f"<tr><th>{esc(k)}</th><td>{value_html(x)}</td></tr>"
                       for k, x in v.items())
        return f'<table class="kv">{rows}</table>'
    if isinstance(v, list):
        if all(not isinstance(x, (dict, list)) for x in v):
            return esc(", ".join(_scalar(x) for x in v)) if v else "<i>none</i>"
        return "<ol>" + "".join(f"<li>{value_html(x)}</li>" for x in v) + "</ol>"
    return esc(_scalar(v))


def _scalar(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    if isinstance(v, (int, str)):
        return str(v)
    return json.dumps(v)


def table(head: list[str], rows: list[str], cls: str = "", caption: str = "") -> str:
    """A horizontally scrolling table; `rows` are ready `<tr>` strings, `head` plain text."""
    ths = "".join(f"<th>{esc(h)}</th>" for h in head)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return (f'<div class="scroll"><table class="{esc(cls)}">{cap}<thead><tr>{ths}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


CSS = """
:root{--fg:#1b1f24;--mute:#5b636e;--line:#d6dae0;--best:#e3f4e1;--flag:#fdeceb;--head:#f3f5f7}
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);
margin:0 auto;padding:16px;max-width:1400px}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.2em;margin:1.4em 0 .4em;border-bottom:1px solid
var(--line)}p.sub{color:var(--mute);margin:.2em 0 1em}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch;max-width:100%}
table{border-collapse:collapse;margin:.3em 0 1em;font-variant-numeric:tabular-nums}
th,td{border:1px solid var(--line);padding:3px 7px;vertical-align:middle}
thead th{background:var(--head);position:sticky;top:0;white-space:nowrap}
td[data-v]{text-align:right}td.t{text-align:left;max-width:28em;overflow-wrap:break-word}
table.sortable thead th{cursor:pointer}table.sortable thead th:hover{text-decoration:underline}
td.best{background:var(--best);font-weight:700}
tr.flag td,td.flag{background:var(--flag)}
.badge{display:inline-block;white-space:nowrap;padding:0 6px;border-radius:8px;background:#c62828;color:#fff;
font-size:.8em;font-weight:700}
.warn{background:#fff4d6;border:1px solid #e5c46b;padding:6px 10px;border-radius:4px}
img.thumb{display:block;width:96px;height:auto;image-rendering:auto}
img.big{display:block;width:112px;height:auto}
img.plot{max-width:100%;height:auto;display:block}
.plots{display:flex;flex-wrap:wrap;gap:12px}
.missing{color:var(--mute);font-size:.85em}
.legend{color:var(--mute);font-size:.9em}
table.kv th{text-align:left;background:var(--head);font-weight:600}
table.kv td{text-align:left;overflow-wrap:anywhere}
@media (max-width:900px){body{padding:8px;font-size:14px}img.thumb{width:72px}}
@media print{body{max-width:none;padding:0;font-size:10pt}.scroll{overflow:visible}
thead th{position:static}table.sortable thead th{cursor:auto;text-decoration:none}
tr,img{break-inside:avoid}h2{break-after:avoid}
td.best,tr.flag td,td.flag,.badge{-webkit-print-color-adjust:exact;print-color-adjust:exact}}
"""

# Click a header of a .sortable table: sort its rows by that column's data-v (numbers
# numerically, then text; empty cells always last), click again to reverse.
SORT_JS = """
document.querySelectorAll("table.sortable").forEach(t=>t.tHead.rows[0].querySelectorAll("th").forEach((th,i)=>th.addEventListener("click",()=>{
const b=t.tBodies[0],up=th.dataset.dir!=="up",key=r=>{const v=r.cells[i].dataset.v??r.cells[i].textContent,n=parseFloat(v);return v!==""&&!isNaN(n)?[0,n]:[1,v]};
th.dataset.dir=up?"up":"down";[...b.rows].map(r=>[key(r),r]).sort((p,q)=>{const a=p[0],c=q[0],s=a[1]<c[1]?-1:a[1]>c[1]?1:0;return a[0]-c[0]||(up?s:-s)}).forEach(x=>b.appendChild(x[1]))})));
"""


def page(title: str, body: str, sortable: bool = False) -> str:
    """The whole document: no external resource of any kind."""
    script = f"<script>{SORT_JS}</script>" if sortable else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head>"
            f"<body>{body}{script}</body></html>\n")
