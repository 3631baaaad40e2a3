"""The HTML every page of the project shares: one shell (a style and one small inline script that
sorts tables by a click on a column's head), tables, and figures as data URIs. Nothing in a page
is ever fetched: it reads the same from file:// and from an S3 static website."""
from __future__ import annotations

import base64
import html
import io


def plot_uri(fig) -> str:
    """A matplotlib figure as a PNG data URI (and closed)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def table(rows: list[tuple[str, object]]) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                               for k, v in rows) + "</table>"


def sortable(header: list[str], rows: list[list[tuple[object, object]]], css: str = "") -> str:
    """A table the page's script sorts by a click on a column's head; each cell is (text, sort value)."""
    head = "".join(f"<th title=\"click to sort\">{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td data-value=\"{html.escape(str(value))}\">{text}</td>" for text, value in row)
                   + "</tr>" for row in rows)
    return f"<table class=\"sortable {css}\"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


SORT_SCRIPT = """<script>
document.querySelectorAll("table.sortable th").forEach(function (th) {
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0], column = th.cellIndex;
    var ascending = th.getAttribute("data-order") !== "ascending";
    table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("data-order"); });
    th.setAttribute("data-order", ascending ? "ascending" : "descending");
    var key = function (row) {
      var text = row.cells[column].getAttribute("data-value"), number = parseFloat(text);
      return isNaN(number) ? text : number;
    };
    Array.prototype.slice.call(body.rows).sort(function (a, b) {
      var x = key(a), y = key(b);
      return (x > y ? 1 : x < y ? -1 : 0) * (ascending ? 1 : -1);
    }).forEach(function (row) { body.appendChild(row); });
  });
});
</script>"""

STYLE = """body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}
img.curves{max-width:100%;display:block;margin:1em 0}table{border-collapse:collapse;margin:.5em 0}
th,td{border:1px solid #ccc;padding:2px 8px;text-align:left;font-size:90%}th{background:#f4f4f4}
table.sortable th{cursor:pointer}th[data-order=ascending]::after{content:" \\25B2"}
th[data-order=descending]::after{content:" \\25BC"}.final{font-size:140%}.wrong{color:#b00}
.scroll{max-height:28em;overflow-y:auto;display:inline-block}figure{display:inline-block;margin:.3em;
vertical-align:top;width:150px;font-size:80%}figure img{display:block;max-width:100%}figure.cam{width:330px}
figure.cam img{display:inline-block;max-width:160px}"""


def page(title: str, body: str) -> str:
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head>\n<body><h1>{html.escape(title)}</h1>{body}{SORT_SCRIPT}</body></html>\n")
