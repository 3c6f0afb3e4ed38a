"""Inventory: addresses, fingerprints, selection that never shrinks silently."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydantic import ValidationError

from controller.db import Database
from controller.errors import Conflict, InputError, NotFound
from controller.inventory import Gateway, Inventory, format_address, parse_address

FP = "SHA256:" + "x" * 43


@pytest.mark.parametrize("text,expected", [
    ("10.0.0.1", ("10.0.0.1", 22)),
    ("10.0.0.1:2222", ("10.0.0.1", 2222)),
    ("gw.example.net", ("gw.example.net", 22)),
    ("gw.example.net:22", ("gw.example.net", 22)),
    ("[fd99::65]:22", ("fd99::65", 22)),
    ("[fd99::65]", ("fd99::65", 22)),
    ("fd99::65", ("fd99::65", 22)),
    ("FD99:0::65", ("fd99::65", 22)),
])
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("bad", ["10.0.0.1:0", "10.0.0.1:x", "[fd99::1", "[fd99::1]x",
                                 "bad host!", "10.0.0.1:70000", ""])
def test_parse_address_refuses(bad: str) -> None:
    with pytest.raises(InputError):
        parse_address(bad)


def test_format_address() -> None:
    assert format_address("fd99::65", 2222) == "[fd99::65]:2222"
    assert format_address("10.0.0.1", 22) == "10.0.0.1"


@pytest.mark.parametrize("fp", ["SHA256:short", "MD5:" + "a" * 43, "sha256:" + "a" * 43])
def test_fingerprint_format(fp: str) -> None:
    with pytest.raises(ValidationError):
        Gateway(name="gw", host="10.0.0.1", key_path="/k", host_key=fp)


@pytest.fixture
def inv(db_url: str) -> Iterator[Inventory]:
    db = Database(db_url)
    db.migrate()
    inventory = Inventory(db)
    for i, groups in enumerate([("ams",), ("ams", "core"), ("rtm",)]):
        inventory.add(Gateway(name=f"gw{i}", host=f"10.99.0.{100 + i}", key_path="/k",
                              host_key=FP, groups=groups))
    yield inventory
    db.dispose()


def test_add_refuses_duplicates_and_missing_key(inv: Inventory) -> None:
    with pytest.raises(Conflict, match="already"):
        inv.add(Gateway(name="gw0", host="10.99.0.1", key_path="/k", host_key=FP))
    with pytest.raises(Conflict, match="as 'gw1'"):
        inv.add(Gateway(name="gwx", host="10.99.0.101", key_path="/k", host_key=FP))
    with pytest.raises(InputError, match="host key"):
        inv.add(Gateway(name="gwy", host="10.99.0.9", key_path="/k"))
    with pytest.raises(InputError, match="absolute"):
        inv.add(Gateway(name="gwz", host="10.99.0.8", key_path="k", host_key=FP))


def test_select(inv: Inventory) -> None:
    names = lambda gws: [g.name for g in gws]  # noqa: E731
    assert names(inv.select(all_gateways=True)) == ["gw0", "gw1", "gw2"]
    assert names(inv.select(groups=("ams",))) == ["gw0", "gw1"]
    assert names(inv.select(names=("gw2",), groups=("core",))) == ["gw1", "gw2"]
    with pytest.raises(NotFound, match="gw9"):
        inv.select(names=("gw0", "gw9"))
    with pytest.raises(NotFound, match="group 'nope'"):
        inv.select(groups=("nope",))
    with pytest.raises(InputError):
        inv.select()
    with pytest.raises(InputError):
        inv.select(names=("gw0",), all_gateways=True)


def test_trust_on_first_use_pins_once(db_url: str) -> None:
    db = Database(db_url)
    db.migrate()
    inv = Inventory(db)
    inv.add(Gateway(name="gw", host="10.0.0.1", key_path="/k", trust_on_first_use=True))
    inv.pin_host_key("gw", FP)
    inv.pin_host_key("gw", "SHA256:" + "y" * 43)  # already pinned: unchanged
    assert inv.get("gw").host_key == FP
    assert inv.remove("gw").name == "gw"
    with pytest.raises(NotFound):
        inv.get("gw")
