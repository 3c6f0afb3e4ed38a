"""The controller's exceptions: what an engineer is told when something goes wrong.

Every failure that crosses a boundary (SSH, the database, the HTTP API, the
CLI) is one of these, with a stable `code` for scripts and a message written
for a network engineer, not a Python stack.
"""

from __future__ import annotations


class ControllerError(Exception):
    """Base class; `code` is stable, `http_status` is what the API answers with."""

    code = "error"
    http_status = 500

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class ConfigError(ControllerError):
    code = "config_error"
    http_status = 500


class InputError(ControllerError):
    """A request that is wrong as given (unknown profile, bad address, hostile string)."""

    code = "bad_request"
    http_status = 422


class NotFound(ControllerError):
    code = "not_found"
    http_status = 404


class Conflict(ControllerError):
    code = "conflict"
    http_status = 409


class Unauthorized(ControllerError):
    code = "unauthorized"
    http_status = 401


class Forbidden(ControllerError):
    code = "forbidden"
    http_status = 403


class StorageError(ControllerError):
    code = "storage_error"
    http_status = 503


class TransportError(ControllerError):
    """The gateway could not be reached or spoken to (network, sshd, key, protocol).

    `retryable` says whether trying again later may help (host down: yes;
    the gateway presenting the wrong host key: not until someone looks at it).
    """

    code = "unreachable"
    http_status = 502
    retryable = True


class HostKeyMismatch(TransportError):
    code = "host_key_mismatch"
    retryable = False

    def __init__(self, message: str, *, expected: str | None, presented: str) -> None:
        super().__init__(message)
        self.expected = expected
        self.presented = presented


class HostKeyUnknown(HostKeyMismatch):
    code = "host_key_unknown"


class AgentError(ControllerError):
    """The agent answered and refused or failed the request (its own error code)."""

    code = "agent_error"
    http_status = 502


class AuditTampered(StorageError):
    """The audit chain no longer holds the head the controller wrote (cut, replaced, or
    the head file lost): writes are refused until an admin acknowledges the alarm."""

    code = "audit_tamper_alarm"
    http_status = 503


class LeaseLost(ControllerError):
    """Another controller took over what this one held: the plan it was driving, or (a
    replica) a gateway, whose command was then not sent here; the replica holding the
    gateway now carries it out, under the same command id."""

    code = "lease_lost"
    http_status = 409
