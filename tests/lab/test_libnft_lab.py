"""The kept libnftables context (agent/nft/libnft.py) in a real namespace: it sees what
another process changed, a dry run leaves nothing behind that the next command could
mistake for present, and an element removal through it really removes."""

from __future__ import annotations

import sys
import textwrap

from drawbridge_lab.topology import Lab

SCRIPT = textwrap.dedent("""
    import json, subprocess
    from agent.nft.libnft import LibNft

    nft = LibNft()
    seen = {}
    def ok(cmd, **kw):
        rc, out, err = nft.run(command=cmd, **kw)
        return rc == 0

    # the context's cache is filled, then another process changes the ruleset
    ok("add table inet probe_t")
    ok("list tables")
    subprocess.run(["nft", "add table inet other_t"], check=True)
    rc, out, err = nft.run(command="list tables")
    seen["other_visible"] = "other_t" in out
    subprocess.run(["nft", "delete table inet other_t"], check=True)
    seen["other_deleted_fails"] = not ok("delete table inet other_t")

    # a dry run would create a table: the next real command must not believe in it
    seen["dry_ok"] = ok("add table inet phantom_t", dry_run=True)
    seen["phantom_delete_fails"] = not ok("delete table inet phantom_t")
    listed = nft.run(command="list tables")[1]
    seen["phantom_listed"] = "phantom_t" in listed
    seen["output_not_repeated"] = listed.count("probe_t") == 1

    # removal of an element of a concatenated interval set, as revoke does
    ok("add set inet probe_t s { type ipv4_addr . inet_proto . inet_service; "
       "flags interval, timeout; }")
    ok("add element inet probe_t s { 192.0.2.0/24 . tcp . 443 timeout 1h, "
       "198.51.100.0/24 . tcp . 443 timeout 1h }")
    ok("delete element inet probe_t s { 192.0.2.0/24 . tcp . 443 }")
    out = subprocess.run(["nft", "list set inet probe_t s"], capture_output=True,
                         text=True, check=True).stdout
    seen["removed"] = "192.0.2.0" not in out
    seen["kept"] = "198.51.100.0" in out
    nft.close()
    print(json.dumps(seen))
""")


def test_kept_context_sees_other_writers_and_no_dry_run_phantoms(lab: Lab) -> None:
    ns = lab.gateways[0].ns
    proc = lab.run(ns, [sys.executable, "-c", SCRIPT])
    seen = proc.stdout.strip().splitlines()[-1]
    assert seen == ('{"other_visible": true, "other_deleted_fails": true, "dry_ok": true, '
                    '"phantom_delete_fails": true, "phantom_listed": false, '
                    '"output_not_repeated": true, "removed": true, "kept": true}')
    assert "probe_t" in lab.run(ns, ["nft", "list", "tables"]).stdout
