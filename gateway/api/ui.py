"""The live compare page: plain HTML/JS, no build step, served from the package (``gateway/ui/``)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

router = APIRouter()
PAGE = Path(__file__).resolve().parent.parent / "ui" / "index.html"


@router.get("/ui", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(PAGE, media_type="text/html; charset=utf-8", headers={"cache-control": "no-cache"})


@router.get("/", include_in_schema=False)
async def root() -> RedirectResponse:
    return RedirectResponse("/ui")
