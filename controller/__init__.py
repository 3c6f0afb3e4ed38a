"""Drawbridge controller: inventory, fan-out over SSH, audit log, API and CLI.

Modules: config, db (storage + migrations), audit (hash chain), auth (tokens,
roles), inventory, transport/ (ssh sessions, links, protocol), turns
(per-gateway ordering), fleet (fan-out), states, observe (state history),
plans (restore plans), service (the core), scheduler (polling), metrics,
api (HTTP), server_cli (`drawbridge-controller`), cli + client (`drawbridge`),
entry (their console scripts: without the controller extra they say what to install).
"""
