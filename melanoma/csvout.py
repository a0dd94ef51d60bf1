"""The one way the product writes CSV: every text cell neutralised against formula injection.

A spreadsheet runs a cell that starts with ``=``, ``+``, ``-`` or ``@`` (and, in some of
them, a tab or carriage return before one of those) as a formula: ``=HYPERLINK(...)`` in a
metadata field would become a live link in ``predictions.csv``. Such text cells get a
leading ``'`` (OWASP's advice), which spreadsheets show as text and hide. Numbers are written
as they are, so a negative value stays a number.
"""

from __future__ import annotations

import csv
import io
from typing import Any, Iterable

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value: Any) -> Any:
    """``value`` for a CSV cell: None -> "", text that a spreadsheet would run -> prefixed with ``'``."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def csv_bytes(rows: Iterable[dict], columns: Iterable[str]) -> bytes:
    """UTF-8 CSV with a header row, ``\\n`` line ends, the given columns only, every cell through :func:`safe_cell`."""
    columns = list(columns)
    buffer = io.StringIO()
    # The csv module quotes a cell holding a line-terminator character; with "\n" alone a bare
    # CR inside a cell would go out unquoted and split the row for readers. So each row is
    # written with "\r\n" (quoting CRs too) and its terminator then shortened to "\n".
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\r\n")
    lines = []
    for row in [dict(zip(columns, columns)), *({k: safe_cell(row.get(k)) for k in columns} for row in rows)]:
        buffer.seek(0)
        buffer.truncate()
        writer.writerow(row)
        lines.append(buffer.getvalue()[:-2] + "\n")
    return "".join(lines).encode()
