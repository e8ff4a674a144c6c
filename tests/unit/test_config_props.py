"""Settings on any text: the value, in the format a read shows, or EINVAL and the
old value kept (no root needed)."""
from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memfs.config import SETTINGS, Config

NAMES = sorted(SETTINGS)
texts = st.one_of(st.text(max_size=24), st.integers(-10, 2**66).map(str),
                  st.sampled_from(["max", "0", "1", "inherit", "lz4", "4K", "1T", "0.5", " 7 ", "1_0"]))


@given(st.sampled_from(NAMES), texts)
@settings(max_examples=600, deadline=None)
def test_a_setting_takes_its_format_or_einval_and_keeps_its_value(name, text):
    c = Config()
    before = c.render(name)
    try:
        c.set(name, text)
    except OSError as e:
        assert e.errno == errno.EINVAL, (name, text, e)
        assert c.render(name) == before, "a refused value was stored"
        return
    shown = c.render(name)
    again = Config()
    again.set(name, shown)  # writes use the read format
    assert again.render(name) == shown


@pytest.mark.parametrize("name", [n for n, s in SETTINGS.items() if s.native])
def test_native_settings_fit_the_core(name):
    c = Config()
    for text in ("max", "18446744073709551615", "9223372036854775807", "4294967296"):
        try:
            c.set(name, text)
        except OSError as e:
            assert e.errno == errno.EINVAL
