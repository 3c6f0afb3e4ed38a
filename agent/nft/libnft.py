"""A minimal ctypes binding to libnftables (the library behind the `nft` command).

In-process calls save a fork+exec per operation: an isolate does a dry check,
an apply and a read-back, and the process start-ups were most of the time
for small rulesets. The library acts in the network namespace of the calling
process, exactly like the `nft` binary would.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import threading

from agent.errors import NftError

OUTPUT_JSON = 1 << 4
OUTPUT_TERSE = 1 << 11
_SONAMES = ("libnftables.so.1", "libnftables.so")


def _load() -> ctypes.CDLL:
    names = [*_SONAMES]
    found = ctypes.util.find_library("nftables")
    if found:
        names.append(found)
    for name in names:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_set_dry_run.argtypes = [ctypes.c_void_p, ctypes.c_bool]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_filename.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        return lib
    raise NftError("libnftables not found; install the nftables package (libnftables1)")


class LibNft:
    """libnftables contexts, one per network namespace, kept for the process's life.

    Why kept: closing a context's netlink socket waits for the kernel's deferred
    clean-up of the last transaction that removed something (a revoked exception's
    element, a replaced table): about 10-15 ms, longer than the whole element change.
    A kept context closes nothing on the hot path; the clean-up runs in the background.
    Its cache stays correct because libnftables compares the ruleset generation before
    every command and refetches when another process changed the ruleset (firewalld
    has used one long-lived context this way for years); tests/lab/test_libnft_lab.py
    checks that, and that a dry run leaves nothing in it that looks present.
    """

    def __init__(self) -> None:
        self._lib = _load()
        self._lock = threading.Lock()  # the library is not documented as thread-safe
        self._kept: dict[int, int] = {}  # network namespace inode -> context

    def run(self, *, command: str | None = None, filename: str | None = None,
            flags: int = 0, dry_run: bool = False) -> tuple[int, str, str]:
        lib = self._lib
        with self._lock:
            ctx = self._context()
            lib.nft_ctx_output_set_flags(ctx, flags)
            lib.nft_ctx_set_dry_run(ctx, dry_run)
            if filename is not None:
                rc = lib.nft_run_cmd_from_filename(ctx, filename.encode())
            else:
                rc = lib.nft_run_cmd_from_buffer(ctx, (command or "").encode())
            # reading a buffer also empties it for the next command
            out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode("utf-8", "replace")
            err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode("utf-8", "replace")
            return rc, out, err

    def _new(self) -> int:
        ctx: int | None = self._lib.nft_ctx_new(0)
        if not ctx:
            raise NftError("libnftables could not create a context (out of memory?)")
        self._lib.nft_ctx_buffer_output(ctx)
        self._lib.nft_ctx_buffer_error(ctx)
        return ctx

    def _context(self) -> int:
        # setns(2) is per thread: a context belongs to the namespace it was opened in.
        # (An agent lives in one namespace; a process hopping between namespaces that
        # are deleted and re-created could meet a reused inode: call close() between.)
        netns = os.stat("/proc/thread-self/ns/net").st_ino
        ctx = self._kept.get(netns)
        if ctx is None:
            ctx = self._kept[netns] = self._new()
        return ctx

    def close(self) -> None:
        with self._lock:
            kept, self._kept = self._kept, {}
        for ctx in kept.values():
            self._lib.nft_ctx_free(ctx)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
