"""Sex, age and view for a reading: from the file's header, or given by the user.

The fusion network takes sex, age and view. A DICOM carries them in its header; a PNG or
JPEG does not, so ``predict`` takes them from options or a metadata CSV, and the web page
from its form. Values a person gives are checked strictly (a typo is an error, never a
silently missing value); by default they only fill what the header lacks, and replace
the header's values only when asked (``override``). Each field's source is reported.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lungopacity.constants import SEXES, VIEWS
from lungopacity.errors import ConfigError

METADATA_FIELDS: tuple[str, str, str] = ("sex", "age", "view")
#: Largest accepted age in years (RSNA's few ages over 100 are recording errors).
MAX_AGE_YEARS = 120.0
#: Where a field's value came from.
SOURCE_HEADER, SOURCE_GIVEN, SOURCE_MISSING = "header", "given", "missing"


def parse_given(field: str, value: Any, source: str) -> str | float | None:
    """A user-given sex (M/F), age (years, 0-120) or view (AP/PA); empty means not given.

    Raises:
        ConfigError: naming ``source`` (the option or the CSV row) and what is accepted.
    """
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    text = str(value).strip()
    if not text:
        return None
    if field == "sex":
        sex = text.upper()
        if sex not in SEXES:
            raise ConfigError(source, f"sex must be M or F, not {text[:20]!r}")
        return sex
    if field == "view":
        view = text.upper()
        if view not in VIEWS:
            raise ConfigError(source, f"view must be AP or PA, not {text[:20]!r}")
        return view
    if field == "age":
        try:
            age = float(text)
        except ValueError:
            age = math.nan
        if not 0.0 <= age <= MAX_AGE_YEARS:  # also false for NaN
            raise ConfigError(source, f"age must be a number of years between 0 and {MAX_AGE_YEARS:.0f}, not {text[:20]!r}")
        return age
    raise ConfigError(source, f"unknown metadata field {field!r}; the fields are {', '.join(METADATA_FIELDS)}")


def parse_given_fields(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """:func:`parse_given` for each of sex, age, view present in ``values`` (others are ignored)."""
    return {key: parse_given(key, values.get(key), source) for key in METADATA_FIELDS if key in values}


def resolve_metadata(
    header: Mapping[str, Any], given: Mapping[str, Any] | None = None, *, override: bool = False
) -> tuple[dict[str, Any], dict[str, str]]:
    """The sex / age / view a reading uses, and where each came from.

    Args:
        header: the reader's header dict (None where the file has no value).
        given: already validated values (:func:`parse_given`); None entries are not given.
        override: given values replace the header's; by default they fill only what the
            header lacks.

    Returns:
        ``(values, sources)``: values keyed by field (None when missing: the fusion
        network imputes it and the reading says so), sources ``"header" | "given" | "missing"``.
    """
    given = given or {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key in METADATA_FIELDS:
        from_header, from_user = header.get(key), given.get(key)
        if from_user is not None and (override or from_header is None):
            values[key], sources[key] = from_user, SOURCE_GIVEN
        elif from_header is not None:
            values[key], sources[key] = from_header, SOURCE_HEADER
        else:
            values[key], sources[key] = None, SOURCE_MISSING
    return values, sources


__all__ = ["MAX_AGE_YEARS", "METADATA_FIELDS", "parse_given", "parse_given_fields", "resolve_metadata"]
