"""Signing in to the pages with an API key, and the checks every page makes.

The session cookie holds the API key itself (HttpOnly, SameSite=Strict, Secure over https):
every page resolves it to a tenant exactly as the bearer auth does
(:func:`api.deps.tenant_for_key`), so a revoked key signs the browser out at its next request.
Every state-changing form carries a CSRF token, an HMAC of the cookie under the server's pepper:
another site can neither read it nor compute it.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, Request, Response
from fastapi.responses import RedirectResponse
from starlette.concurrency import run_in_threadpool

from api.deps import tenant_for_key
from api.errors import ApiError, Unauthorized
from api.pages.web import PREFIX, SignInRequired, page_router, render
from mpq_service.settings import Settings
from mpq_service.tables import Tenant

__all__ = [
    "COOKIE",
    "CSRF_FIELD",
    "CheckedTenant",
    "CookieTenant",
    "PageTenant",
    "check_csrf",
    "csrf_token",
    "router",
]

COOKIE = "mpq_session"
CSRF_FIELD = "csrf"
_MAX_KEY_CHARS = 256

router = page_router()


def csrf_token(request: Request, cookie: str) -> str:
    """The CSRF token of the session ``cookie``: HMAC-SHA256 under the server's pepper."""
    settings: Settings = request.app.state.settings
    secret = b"mpq-ui-csrf:" + settings.api_key_pepper.get_secret_value().encode()
    return hmac.new(secret, cookie.encode(), hashlib.sha256).hexdigest()


def _session_tenant(request: Request) -> Tenant | None:
    cookie = request.cookies.get(COOKIE, "")
    if not cookie or len(cookie) > _MAX_KEY_CHARS:
        return None
    tenant = tenant_for_key(request, cookie)
    if tenant is not None:
        request.state.csrf = csrf_token(request, cookie)
    return tenant


def page_tenant(request: Request) -> Tenant:
    """The signed-in tenant of a page; no valid cookie is a redirect to the sign-in page."""
    tenant = _session_tenant(request)
    if tenant is None:
        raise SignInRequired()
    return tenant


def cookie_tenant(request: Request) -> Tenant:
    """The signed-in tenant of a JSON endpoint of the pages; 401 without a valid cookie."""
    tenant = _session_tenant(request)
    if tenant is None:
        raise Unauthorized("sign in at /ui/signin")
    return tenant


def check_csrf(request: Request, token: str | None) -> None:
    """403 ``csrf_failed`` unless ``token`` is the CSRF token of the request's cookie."""
    expected = csrf_token(request, request.cookies.get(COOKIE, ""))
    if not token or not hmac.compare_digest(token, expected):
        raise ApiError(403, "csrf_failed", "the form is stale or was not sent from this site")


async def checked_tenant(request: Request) -> Tenant:
    """The tenant of a url-encoded form post whose CSRF token is right (else a 403 page)."""
    tenant = await run_in_threadpool(page_tenant, request)
    form = await request.form()
    token = form.get(CSRF_FIELD)
    check_csrf(request, token if isinstance(token, str) else None)
    return tenant


PageTenant = Annotated[Tenant, Depends(page_tenant)]
CookieTenant = Annotated[Tenant, Depends(cookie_tenant)]
CheckedTenant = Annotated[Tenant, Depends(checked_tenant)]


def _safe_next(target: str | None) -> str:
    """Where to go after signing in: a path under the pages, never another site."""
    parts = urlsplit(target or "")
    if parts.scheme or parts.netloc or not parts.path.startswith(PREFIX + "/"):
        return f"{PREFIX}/jobs"
    return parts.path + (f"?{parts.query}" if parts.query else "")


@router.get("/signin")
def signin_page(request: Request, next: str | None = None) -> Response:
    return render(request, "signin.html", {"next": _safe_next(next)})


@router.post("/signin")
async def signin(request: Request) -> Response:
    """Check the pasted API key; set the session cookie and go on, or show the form again.

    A post from another site (``Sec-Fetch-Site: cross-site``) is refused: it would sign the
    browser in as someone else."""
    if request.headers.get("sec-fetch-site") == "cross-site":
        raise ApiError(403, "csrf_failed", "sign in from this site's own form")
    form = await request.form()
    key = str(form.get("api_key") or "").strip()
    target = _safe_next(str(form.get("next") or ""))
    known = bool(key) and len(key) <= _MAX_KEY_CHARS
    if not known or await run_in_threadpool(tenant_for_key, request, key) is None:
        context = {"next": target, "error": "unknown or revoked API key"}
        return render(request, "signin.html", context, status_code=401)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        COOKIE,
        key,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path=PREFIX,
    )
    return response


@router.post("/signout")
def signout(request: Request, _tenant: CheckedTenant) -> Response:
    response = RedirectResponse(f"{PREFIX}/signin", status_code=303)
    response.delete_cookie(COOKIE, path=PREFIX, httponly=True, samesite="strict")
    return response
