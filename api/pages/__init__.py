"""The web pages under ``/ui/``: server-rendered Jinja2 templates, one small plain script for
live updates, charts as SVG; signed in with an API key (:mod:`api.pages.session`)."""

from __future__ import annotations

from fastapi import APIRouter

from api.pages import jobs, session, submit, uploads, web

__all__ = ["pages_router"]

pages_router = APIRouter()
pages_router.include_router(web.static_router)
pages_router.include_router(session.router)
pages_router.include_router(submit.router)  # /jobs/new before /jobs/{job_id}
pages_router.include_router(jobs.live_router)  # /jobs/live before /jobs/{job_id}
pages_router.include_router(jobs.router)
pages_router.include_router(uploads.router)
