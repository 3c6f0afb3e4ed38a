"""A minimal ctypes binding to libnftables (the library behind the `nft` command).

In-process calls save a fork+exec per operation: an isolate does a dry check,
an apply and a read-back, and the process start-ups were most of the time
for small rulesets. The library acts in the network namespace of the calling
process, exactly like the `nft` binary would.
"""

from __future__ import annotations

import ctypes
import ctypes.util
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
    """One libnftables context per call: contexts keep caches we do not want to go stale
    between calls, and creating one costs microseconds."""

    def __init__(self) -> None:
        self._lib = _load()
        self._lock = threading.Lock()  # the library is not documented as thread-safe

    def run(self, *, command: str | None = None, filename: str | None = None,
            flags: int = 0, dry_run: bool = False) -> tuple[int, str, str]:
        lib = self._lib
        with self._lock:
            ctx = lib.nft_ctx_new(0)
            if not ctx:
                raise NftError("libnftables could not create a context (out of memory?)")
            try:
                lib.nft_ctx_buffer_output(ctx)
                lib.nft_ctx_buffer_error(ctx)
                lib.nft_ctx_output_set_flags(ctx, flags)
                if dry_run:
                    lib.nft_ctx_set_dry_run(ctx, True)
                if filename is not None:
                    rc = lib.nft_run_cmd_from_filename(ctx, filename.encode())
                else:
                    rc = lib.nft_run_cmd_from_buffer(ctx, (command or "").encode())
                out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode("utf-8", "replace")
                err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode("utf-8", "replace")
                return rc, out, err
            finally:
                lib.nft_ctx_free(ctx)
