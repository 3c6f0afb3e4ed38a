"""Drawbridge namespace lab: gateways, internal hosts, an internet stand-in and a
management network built from Linux network namespaces (see README.md)."""

from .netns import LabError
from .topology import Gateway, Lab, Stream, cleanup_stale, remove_lab

__all__ = ["Gateway", "Lab", "LabError", "Stream", "cleanup_stale", "remove_lab"]
