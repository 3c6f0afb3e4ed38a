"""Signed checkpoints of the audit chain: the key, the signature, the exported file.

A checkpoint says "the chain's record #seq had hash H at time T", signed with an
Ed25519 key that lives in a file in the state dir (0600, made on first start) and
never in the database. Whoever rewrites the database, even with the chain key, and
the head file with it, cannot make the chain agree with a checkpoint kept
elsewhere (in every gateway's journal, in an exported file), nor sign a new one
without this key.

The signed message is fixed text, so that anyone can check a checkpoint with any
Ed25519 implementation and the public key:

    drawbridge-audit-checkpoint/1\\n<seq>\\n<head_hash>\\n<time in microseconds>\\n

(the time as an integer, round(time * 1e6), so that no float formatting is signed;
a checkpoint's time is always a whole number of microseconds).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from controller.audit_verify import CheckpointClaim
from controller.errors import ConfigError, InputError

FILE_FORMAT = "drawbridge-audit-checkpoints/1"
MESSAGE_PREFIX = "drawbridge-audit-checkpoint/1"
HEX64 = r"^[0-9a-f]{64}$"


def checkpoint_message(seq: int, head_hash: str, time: float) -> bytes:
    return f"{MESSAGE_PREFIX}\n{seq}\n{head_hash}\n{round(time * 1e6)}\n".encode("ascii")


def key_id_of(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


class SignedCheckpoint(BaseModel):
    """One checkpoint as signed, sent to the gateways and exported."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    seq: int = Field(ge=1)
    head_hash: str = Field(pattern=HEX64)
    time: float
    signature: str = Field(min_length=1, max_length=200)  # base64 (or hex)
    key_id: str = Field(min_length=1, max_length=32)

    def message(self) -> bytes:
        return checkpoint_message(self.seq, self.head_hash, self.time)

    def rpc_args(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def decode_signature(text: str) -> bytes | None:
    """Base64 or hex; None if it is neither (or not 64 bytes)."""
    for hex_first in (True, False):
        try:
            raw = bytes.fromhex(text) if hex_first else base64.b64decode(text, validate=True)
        except (ValueError, binascii.Error):
            continue
        if len(raw) == 64:
            return raw
    return None


def signature_valid(cp: SignedCheckpoint, public_raw: bytes) -> bool:
    raw = decode_signature(cp.signature)
    if raw is None:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_raw).verify(raw, cp.message())
    except (InvalidSignature, ValueError):
        return False
    return True


class CheckpointKey:
    """The signing key: PKCS#8 PEM in a 0600 file, created on first use."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public_raw = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.key_id = key_id_of(self.public_raw)

    @property
    def public_b64(self) -> str:
        return base64.b64encode(self.public_raw).decode("ascii")

    def sign(self, seq: int, head_hash: str, time: float) -> SignedCheckpoint:
        time = round(time * 1e6) / 1e6  # what is stored (microseconds) is what is signed
        signature = self._private.sign(checkpoint_message(seq, head_hash, time))
        return SignedCheckpoint(seq=seq, head_hash=head_hash, time=time,
                                signature=base64.b64encode(signature).decode("ascii"),
                                key_id=self.key_id)

    @classmethod
    def load_or_create(cls, path: Path) -> CheckpointKey:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            pem = Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption())
            try:
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # created concurrently: use theirs
                return cls.load_or_create(path)
            except OSError as exc:
                raise ConfigError(f"cannot create checkpoint key {path}: "
                                  f"{exc.strerror}") from None
            with os.fdopen(fd, "wb") as fh:
                fh.write(pem)
                fh.flush()
                os.fsync(fh.fileno())
            data = pem
        except OSError as exc:
            raise ConfigError(f"cannot read checkpoint key {path}: {exc.strerror}") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise ConfigError(f"checkpoint key {path} is not a PEM private key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"checkpoint key {path} is not an Ed25519 key")
        return cls(key)


class CheckpointFile(BaseModel):
    """What `drawbridge audit checkpoint export` writes (and `audit verify --checkpoint`
    reads): the checkpoints and the public key that checks them."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    format: str = FILE_FORMAT
    algorithm: str = "ed25519"
    public_key: str  # base64 of the raw 32-byte Ed25519 public key
    key_id: str
    checkpoints: list[SignedCheckpoint]


def parse_checkpoint_file(data: Any, source: str) -> tuple[bytes | None, list[SignedCheckpoint]]:
    """The public key in the file (if any) and its checkpoints. Takes the exported
    file, or one checkpoint object (with or without `public_key`)."""
    if not isinstance(data, dict):
        raise InputError(f"{source}: not a checkpoint file (a JSON object is expected)")
    items = data.get("checkpoints", [data])
    try:
        checkpoints = [SignedCheckpoint.model_validate(x) for x in items]
    except (ValidationError, TypeError) as exc:
        raise InputError(f"{source}: not a checkpoint file: {exc}") from None
    public: bytes | None = None
    if data.get("public_key"):
        try:
            public = base64.b64decode(str(data["public_key"]), validate=True)
        except (ValueError, binascii.Error):
            raise InputError(f"{source}: public_key is not base64") from None
        if len(public) != 32:
            raise InputError(f"{source}: public_key is not a 32-byte Ed25519 key")
    return public, checkpoints


def claims_from(checkpoints: Sequence[SignedCheckpoint], *, source: str,
                controller_public: bytes, file_public: bytes | None = None
                ) -> list[CheckpointClaim]:
    """Each checkpoint as a claim on the chain, its signature checked with the key it
    names: the controller's, or the one in its file (said so: a key from the file
    proves only what that file's author signed)."""
    ours = key_id_of(controller_public)
    keys: dict[str, tuple[bytes, str]] = {ours: (controller_public, f"controller key {ours}")}
    if file_public is not None:
        theirs = key_id_of(file_public)
        keys.setdefault(theirs, (file_public, f"key {theirs} from {source} (not the "
                                              "controller's current key)"))
    out: list[CheckpointClaim] = []
    for cp in checkpoints:
        found = keys.get(cp.key_id)
        if found is None:
            out.append(CheckpointClaim(cp.seq, cp.head_hash, source, f"key {cp.key_id}",
                                       problem=f"signed with key {cp.key_id}, which is "
                                       "neither the controller's nor in the file"))
            continue
        public, label = found
        problem = None if signature_valid(cp, public) else \
            "its signature does not verify: the checkpoint was altered or forged"
        out.append(CheckpointClaim(cp.seq, cp.head_hash, source, label, problem=problem))
    return out
