"""Selectors and sizes on any text: a Selector or EINVAL, ASCII digits only (no root needed)."""
from __future__ import annotations

import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memfs import selection


@given(st.text(max_size=40))
def test_any_text_is_a_selector_or_einval(text):
    try:
        sel = selection.parse(text)
    except OSError as e:
        assert e.errno == errno.EINVAL
        return
    assert sel.kind in ("all", "cold", "pages", "addr", "bytes")


@given(st.integers(0, 2**40), st.integers(0, 2**40))
def test_pages_ranges_read_back(a, b):
    text = f"pages={a}-{b}"
    if b < a:
        with pytest.raises(OSError):
            selection.parse(text)
    else:
        assert selection.parse(text) == selection.Selector("pages", a, b)


@given(st.characters(categories=["Nd"]).filter(lambda c: not "0" <= c <= "9"))
def test_digits_of_other_scripts_are_refused(digit):
    for text in (f"pages={digit}", f"pages=1-{digit}", f"bytes={digit}K", f"addr={digit}-0x1000"):
        with pytest.raises(OSError) as e:
            selection.parse(text)
        assert e.value.errno == errno.EINVAL


@given(st.integers(0, 2**70), st.sampled_from(["", "K", "M", "G", "T", "k", "g"]))
def test_sizes_are_exact_and_bounded(n, unit):
    text = f"{n}{unit}"
    value = n * selection.UNITS[unit.upper()]
    if value <= selection.MAX_SIZE:
        assert selection.parse_size(text) == value
    else:
        with pytest.raises(OSError):
            selection.parse_size(text)
