"""The relay and the boot path read only the config's top-level keys, cheaply: the same
answer as a whole parse, whatever the text holds (a big profile, tricky multi-line values)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.relay import state_dir_of, top_level_keys
from agent.wire import DEFAULT_STATE_DIR


def plain(data: dict[str, object]) -> dict[str, object]:
    """The keys that are not tables or arrays of tables (what the relay may ask for)."""
    return {k: v for k, v in data.items() if not isinstance(v, dict) and not (
        isinstance(v, list) and v and all(isinstance(x, dict) for x in v))}


def top_level(text: str) -> dict[str, object]:
    return plain(tomllib.loads(text))


CASES = [
    'state_dir = "/srv/db"\n[metrics]\nlisten = "1.2.3.4:9630"\n',
    # a multi-line array whose lines start with "[": the cut is inside it
    'gateway = "g"\nnested = [\n[1, 2],\n[3]\n]\nstate_dir = "/srv/db"\n[metrics]\nx = 1\n',
    # a multi-line string with a header-looking line
    'note = """\n[not a table]\n"""\nstate_dir = "/srv/db"\n[profiles.a]\nbase = "full"\n',
    # no table at all; and an array of tables first
    'state_dir = "/srv/db"\n',
    '[[management]]\ncidr = "10.0.0.0/8"\n',
    # state_dir as a key of a table is not the top-level one
    '[metrics]\nstate_dir = "/not/this"\n',
]


@pytest.mark.parametrize("text", CASES)
def test_same_as_a_whole_parse(text: str) -> None:
    assert plain(top_level_keys(text)) == top_level(text)


@given(st.dictionaries(st.from_regex(r"[a-z_]{1,8}", fullmatch=True),
                       st.one_of(st.text(max_size=20), st.integers(),
                                 st.lists(st.text(max_size=5), max_size=3)), max_size=5))
def test_same_as_a_whole_parse_for_generated_keys(values: dict[str, object]) -> None:
    def dump(v: object) -> str:
        if isinstance(v, str):
            return '"""' + v.replace("\\", "\\\\").replace('"', '\\"') + '"""'
        if isinstance(v, list):
            return "[\n" + ",\n".join(dump(x) for x in v) + "\n]"
        return str(v)
    text = "".join(f"{k} = {dump(v)}\n" for k, v in values.items())
    text += '[profiles.big]\nallow = [{ cidr = "10.0.0.0/8", proto = "tcp", ports = [443] }]\n'
    try:
        expected = top_level(text)
    except tomllib.TOMLDecodeError:
        return  # not a valid document: not this test's business
    assert plain(top_level_keys(text)) == expected


def test_state_dir_of(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('state_dir = "/srv/db"\n[profiles.big]\nallow = [' +
                   ", ".join(f'{{ cidr = "10.{i // 256}.{i % 256}.0/24", proto = "tcp", '
                             'ports = [443] }' for i in range(20000)) + "]\n")
    assert state_dir_of(cfg) == Path("/srv/db")
    cfg.write_text("state_dir = [broken\n")
    assert state_dir_of(cfg) == DEFAULT_STATE_DIR  # the direct path reports the error
    assert state_dir_of(tmp_path / "missing.toml") == DEFAULT_STATE_DIR
