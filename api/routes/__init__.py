"""The ``/v1`` API: one router per resource, gathered here."""

from __future__ import annotations

from fastapi import APIRouter

from api.routes import artifacts, datasets, events, jobs, models

__all__ = ["api_router"]

api_router = APIRouter(prefix="/v1")
api_router.include_router(models.router)
api_router.include_router(datasets.router)
api_router.include_router(jobs.router)
api_router.include_router(events.router)
api_router.include_router(artifacts.router)
