"""Kubernetes-style byte quantities: ``"2Mi"``, ``"40Gi"``, ``"1.5G"``, ``"4096"``.

Memory sizes in the CRs are strings in the form Kubernetes users already
write; the core turns them into integer bytes once, here.
"""

from __future__ import annotations

import re

_SUFFIX: dict[str, int] = {
    "": 1,
    "k": 10**3,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
}

#: the pattern the CRD schemas use for byte quantities
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(k|K|M|G|T|P|Ki|Mi|Gi|Ti|Pi)?$"
_RE = re.compile(QUANTITY_PATTERN)


class QuantityError(ValueError):
    pass


def parse_bytes(value: str | int) -> int:
    """Bytes in a quantity; a clear error naming the accepted forms otherwise."""
    if isinstance(value, bool):
        raise QuantityError(f"{value!r} is not a byte quantity")
    if isinstance(value, int):
        if value < 0:
            raise QuantityError(f"byte quantity must not be negative, got {value}")
        return value
    text = str(value).strip()
    m = _RE.match(text)
    if not m:
        raise QuantityError(
            f"{value!r} is not a byte quantity; use a number with an optional suffix "
            "Ki, Mi, Gi, Ti (powers of 1024) or k, M, G, T (powers of 1000), e.g. '2Mi' or '40Gi'"
        )
    suffix = m.group(2) or ""
    number = text[: len(text) - len(suffix)]
    if "." in number:
        whole, frac = number.split(".")
        scale: int = 10 ** len(frac)
        unit: int = _SUFFIX[suffix]
        return (int(whole) * scale + int(frac)) * unit // scale
    return int(number) * _SUFFIX[suffix]


def format_bytes(n: int) -> str:
    """The shortest exact binary-suffixed form, e.g. ``2097152 -> '2Mi'``."""
    for suffix in ("Pi", "Ti", "Gi", "Mi", "Ki"):
        unit = _SUFFIX[suffix]
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


_HUMAN = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kKMGTP]i?)?[bB]?\s*$")


def parse_size(value: str | int) -> int:
    """Bytes in a size a person writes: ``"10GiB"``, ``"512MB"``, ``"2Mi"``, ``4096``.

    Accepts everything ``parse_bytes`` does plus a trailing ``B``/``b``
    (``GiB`` = ``Gi``, ``GB`` = ``G``).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return parse_bytes(value)
    m = _HUMAN.match(str(value)) if isinstance(value, str) else None
    if not m:
        raise QuantityError(
            f"{value!r} is not a size; write e.g. '10GiB', '512MiB', '1.5GB' or a number of bytes"
        )
    suffix = m.group(2) or ""
    if suffix == "k" or suffix == "K":
        suffix = "k"
    elif suffix == "Ki" or suffix == "ki":
        suffix = "Ki"
    return parse_bytes(m.group(1) + suffix)
