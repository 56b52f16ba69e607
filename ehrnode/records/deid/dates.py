"""Date shifting: moving a FHIR date by a patient's offset, keeping its form and precision."""

from __future__ import annotations

import re
from datetime import date, timedelta

DATE_FORM = re.compile(
    r"(\d{4})(?:-(\d{2})(?:-(\d{2})(T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:\d{2})?)?)?)?")


def shift_date(value: str, days: int) -> str:
    """``value`` (FHIR date, dateTime or instant) moved by ``days``, in the same form.

    The time of day and the zone offset are kept as written, so every interval within
    one patient's record is exactly preserved. A year or a year-month names a period;
    its middle is shifted and the result cut back to the same precision.
    """
    m = DATE_FORM.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        raise ValueError("not a FHIR date")  # the value itself is never shown: it is patient data
    year, month, day, time = m.groups()
    try:
        if day:
            return (date(int(year), int(month), int(day)) + timedelta(days=days)).isoformat() + (time or "")
        middle = date(int(year), int(month or 7), 15 if month else 2) + timedelta(days=days)
    except OverflowError as exc:
        raise ValueError(f"a date that, shifted by {days} days, falls outside the years 1-9999") from exc
    return f"{middle.year:04d}-{middle.month:02d}" if month else f"{middle.year:04d}"


