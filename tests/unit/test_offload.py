from __future__ import annotations

from agent.nft.offload import bypasses


def test_flowtables_offloads_and_redirects_of_other_tables_are_found() -> None:
    ruleset = {"nftables": [
        {"metainfo": {"version": "1.0.6"}},
        {"flowtable": {"family": "inet", "table": "fw4", "name": "ft", "hook": "ingress",
                       "prio": 0, "dev": ["lan0", "wan0"]}},
        {"rule": {"family": "inet", "table": "fw4", "chain": "forward", "handle": 3,
                  "expr": [{"match": {"op": "in", "left": {"ct": {"key": "state"}},
                                      "right": "established"}},
                           {"flow": {"op": "add", "flowtable": "@ft"}}]}},
        {"rule": {"family": "netdev", "table": "shortcut", "chain": "in", "handle": 2,
                  "expr": [{"fwd": {"dev": "wan0", "family": "ip", "addr": "192.0.2.1"}}]}},
        {"rule": {"family": "ip", "table": "mirror", "chain": "pre", "handle": 2,
                  "expr": [{"dup": {"addr": "192.0.2.9", "dev": "wan0"}}]}},
        # ordinary rules of other tables and our own table are not bypasses
        {"rule": {"family": "inet", "table": "admin", "chain": "input", "handle": 4,
                  "expr": [{"accept": None}]}},
        {"rule": {"family": "inet", "table": "drawbridge", "chain": "forward", "handle": 9,
                  "expr": [{"drop": None}]}},
    ]}
    assert bypasses(ruleset) == [
        "flowtable ft in table inet fw4 (devices: lan0, wan0)",
        "table inet fw4 chain forward offloads connections to @ft",
        "table netdev shortcut chain in redirects packets (fwd)",
        "table ip mirror chain pre redirects packets (dup)",
    ]
    assert bypasses({"nftables": []}) == []
