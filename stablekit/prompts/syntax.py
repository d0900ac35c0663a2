"""AUTOMATIC1111's attention syntax: a prompt -> fragments of text, each with its weight.

``(text)`` multiplies the weight of ``text`` by 1.1, ``[text]`` divides it by 1.1, ``(text:1.3)`` multiplies it by
1.3; brackets nest by multiplying. ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are the literal characters. A
bracket left open is closed at the end of the prompt, a closing bracket with nothing open is text, and a lone
backslash is dropped: all as A1111 does. ``BREAK`` (upper case, a word of its own) becomes the marker
:data:`BREAK`, which ends a 75-token chunk early (see :mod:`stablekit.prompts.weighting`).

Two departures from A1111, both where its result is an accident: a ``BREAK`` inside brackets stays a break (A1111
multiplies its marker's weight and then reads it as the word "break" at weight -1.1), and a weight that is not a
number, like ``(a:.)``, leaves the ``:`` as text instead of raising.
"""

from __future__ import annotations

import re

BREAK = ("BREAK", -1.0)

ROUND = 1.1
SQUARE = 1 / 1.1  # multiplied, not divided by 1.1, so the floats are A1111's to the last bit

_ESCAPED = "()[]\\"
_SPECIAL = "()[]\\:"
_WEIGHT = re.compile(r":\s*([+-]?[.\d]+)\s*\)")  # the ":1.3)" that closes "(text:1.3)"
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Fragments of ``text`` with their weights; adjacent fragments of equal weight are merged, and a prompt with
    no text is ``[("", 1.0)]``. ``BREAK`` gives the marker ``("BREAK", -1.0)``."""
    parts: list[list] = []  # [text, weight, is_break]: weights change while brackets close
    round_open: list[int] = []  # index into parts where each open bracket began
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for part in parts[start:]:
            if not part[2]:
                part[1] *= factor

    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            # A1111 drops a backslash that escapes nothing ("C:\path" loses it).
            escaped = text[i + 1 : i + 2]
            if escaped and escaped in _ESCAPED:
                parts.append([escaped, 1.0, False])
                i += 1
            i += 1
        elif c == "(":
            round_open.append(len(parts))
            i += 1
        elif c == "[":
            square_open.append(len(parts))
            i += 1
        elif c == ")" and round_open:
            scale(round_open.pop(), ROUND)
            i += 1
        elif c == "]" and square_open:
            scale(square_open.pop(), SQUARE)
            i += 1
        elif c == ":" and round_open and (m := _WEIGHT.match(text, i)) and (weight := _number(m[1])) is not None:
            scale(round_open.pop(), weight)
            i = m.end()
        elif c in _SPECIAL:
            parts.append([c, 1.0, False])  # an unmatched ")" or "]", or a ":" not closing a weight
            i += 1
        else:
            end = i + 1
            while end < len(text) and text[end] not in _SPECIAL:
                end += 1
            for n, piece in enumerate(_BREAK.split(text[i:end])):
                if n:
                    parts.append([*BREAK, True])
                parts.append([piece, 1.0, False])
            i = end

    # Brackets left open close at the end, round ones first, in the order they opened (A1111's float order).
    for start in round_open:
        scale(start, ROUND)
    for start in square_open:
        scale(start, SQUARE)

    merged: list[list] = []
    for part in parts:
        if part[0] == "" and not part[2]:
            continue  # an empty piece (a dropped backslash, text around BREAK) must not keep neighbours apart
        if merged and not part[2] and not merged[-1][2] and merged[-1][1] == part[1]:
            merged[-1][0] += part[0]
        else:
            merged.append(part)
    return [(t, w) for t, w, _ in merged] or [("", 1.0)]


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # "." or "1.2.3": the characters stay text
        return None
