"""The page's session: the API token in a cookie, and CSRF tokens bound to it.

The token a person pastes at login goes into an HttpOnly, SameSite=Strict cookie
scoped to /ui (Secure over TLS), so page scripts cannot read it, other sites'
requests do not carry it and the JSON API (Bearer only) never accepts it.
Every form also carries a synchronizer token: HMAC(server secret, cookie value),
so a forged form post fails even where SameSite is not enforced. Before login,
the cookie bound to is a random nonce set with the login form (login CSRF).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from starlette.requests import Request
from starlette.responses import Response

SESSION_COOKIE = "drawbridge_session"
LOGIN_COOKIE = "drawbridge_login"
COOKIE_PATH = "/ui"
SESSION_SECONDS = 12 * 3600


def new_secret() -> bytes:
    """Per app instance: CSRF tokens of a previous controller process are void."""
    return secrets.token_bytes(32)


def new_nonce() -> str:
    return secrets.token_urlsafe(24)


def csrf_for(secret: bytes, bound: str) -> str:
    return hmac.new(secret, b"csrf\0" + bound.encode("utf-8"), hashlib.sha256).hexdigest()


def csrf_ok(secret: bytes, bound: str | None, given: str | None) -> bool:
    if not bound or not given:
        return False
    return hmac.compare_digest(csrf_for(secret, bound), given)


def is_tls(request: Request) -> bool:
    return request.url.scheme == "https"


def _set(response: Response, name: str, value: str, *, secure: bool, max_age: int) -> None:
    response.set_cookie(name, value, max_age=max_age, path=COOKIE_PATH, secure=secure,
                        httponly=True, samesite="strict")


def set_session(response: Response, token: str, *, secure: bool) -> None:
    _set(response, SESSION_COOKIE, token, secure=secure, max_age=SESSION_SECONDS)
    response.delete_cookie(LOGIN_COOKIE, path=COOKIE_PATH, secure=secure, httponly=True,
                           samesite="strict")


def set_login_nonce(response: Response, nonce: str, *, secure: bool) -> None:
    _set(response, LOGIN_COOKIE, nonce, secure=secure, max_age=3600)


def clear_session(response: Response, *, secure: bool) -> None:
    response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH, secure=secure, httponly=True,
                           samesite="strict")
