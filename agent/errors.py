"""The agent's own exceptions: what a network engineer is told when something goes wrong."""

from __future__ import annotations


class DrawbridgeError(Exception):
    """Base class; `code` is stable for scripts and RPC callers, the message is for people."""

    code = "error"
    exit_code = 1


class ConfigError(DrawbridgeError):
    code = "config_error"
    exit_code = 2


class InputError(DrawbridgeError):
    """A request that is wrong as given (bad CIDR, unknown profile, hostile string)."""

    code = "bad_request"
    exit_code = 2


class NftError(DrawbridgeError):
    """nft refused or failed; nothing was changed (transactions are atomic)."""

    code = "nft_error"
    exit_code = 3


class StateError(DrawbridgeError):
    code = "state_error"
    exit_code = 4


class BusyError(DrawbridgeError):
    code = "busy"
    exit_code = 5


class ConflictError(DrawbridgeError):
    """A request id used again for a different request."""

    code = "conflict"
    exit_code = 2


def error_for_code(code: str, message: str) -> DrawbridgeError:
    """An error of the class that carries `code` (a stored answer, replayed)."""
    for cls in (ConfigError, InputError, NftError, StateError, BusyError, ConflictError):
        if cls.code == code:
            return cls(message)
    err = DrawbridgeError(message)
    err.code = code
    return err
