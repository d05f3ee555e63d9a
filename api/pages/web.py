"""What every web page shares: the Jinja2 templates, the route class that turns errors into
HTML pages (a foreign or missing id is the same 404 page, no cookie is a redirect to sign in),
the security headers, and the two static files.

Pages are rendered on the server; the browser runs one small plain script (live updates only)
and loads nothing from anywhere else: no build step, no CDN, it works offline.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, PackageLoader, select_autoescape

from api.errors import ApiError, mpq_error_status
from api.pages import present
from api.routing import SessionReleasingRoute
from mpq_core.errors import MpqError

__all__ = [
    "PREFIX",
    "PageRoute",
    "SignInRequired",
    "page_router",
    "render",
    "static_router",
]

PREFIX = "/ui"
_HERE = Path(__file__).parent
_STATIC = {"style.css": "text/css", "live.js": "text/javascript"}
# Nothing but this origin: no inline script, no CDN, no framing. Images may come from the
# storage's presigned URLs (plots of an S3-backed service are a 307 away).
_CSP = (
    "default-src 'self'; img-src 'self' data: http: https:; style-src 'self'; "
    "script-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

_env = Environment(
    loader=PackageLoader("api.pages", "templates"),
    autoescape=select_autoescape(default=True),
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters.update(
    nbytes=present.format_bytes,
    count=present.format_count,
    metric=present.format_metric,
    urlpart=lambda text: quote(str(text), safe=""),
)
_templates = Jinja2Templates(env=_env)


class SignInRequired(Exception):
    """No valid session cookie: the page answers with a redirect to the sign-in page."""


def render(
    request: Request,
    template: str,
    context: Mapping[str, Any] | None = None,
    status_code: int = 200,
) -> Response:
    """``template`` rendered with ``context`` (plus ``request`` and the page's CSRF token, set
    on ``request.state`` by the tenant dependency), with the security headers."""
    ctx = {"csrf": getattr(request.state, "csrf", None), "prefix": PREFIX, **(context or {})}
    response = _templates.TemplateResponse(request, template, ctx, status_code=status_code)
    response.headers.update(SECURITY_HEADERS)
    return response


def error_page(request: Request, status: int, message: str) -> Response:
    return render(request, "error.html", {"status": status, "message": message}, status)


def _sign_in_redirect(request: Request) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"{PREFIX}/signin?next={quote(target, safe='')}", status_code=303)


class PageRoute(SessionReleasingRoute):
    """A page: errors raised while it is served (its dependencies included) are HTML pages with
    the API's status and message, never JSON; no session cookie is a redirect to sign in."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except SignInRequired:
                return _sign_in_redirect(request)
            except ApiError as exc:
                return error_page(request, exc.status, exc.message)
            except MpqError as exc:
                return error_page(request, mpq_error_status(exc), exc.message)
            except RequestValidationError:
                return error_page(request, 422, "the address or the form is not valid")

        return run


def page_router() -> APIRouter:
    """A router for pages under :data:`PREFIX`, kept out of the JSON API's OpenAPI document."""
    return APIRouter(prefix=PREFIX, route_class=PageRoute, include_in_schema=False)


static_router = APIRouter(prefix=PREFIX, include_in_schema=False)


@static_router.get("/static/{name}")
def static_file(name: str) -> Response:
    """The stylesheet and the live-update script (the only two files the pages load)."""
    if name not in _STATIC:
        return Response("not found", status_code=404, media_type="text/plain")
    return FileResponse(
        _HERE / "static" / name,
        media_type=_STATIC[name],
        headers={"Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"},
    )
