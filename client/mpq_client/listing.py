"""A paged list of the API as one iterator: pages fetched as the iteration reaches them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

from mpq_client.types import Page

__all__ = ["Listing"]

T = TypeVar("T")


class Listing(Iterator[T]):
    """Every item of a list, newest first, the next page fetched (following ``next_cursor``)
    when the iteration reaches it. ``total`` is the number of matching items on all pages (the
    first page is fetched to learn it; None where the server does not report it).

    Example::

        failed = mpq.jobs(status="failed")
        print(failed.total, "failed jobs")
        for job in failed:
            print(job.id, job.error.code)
    """

    def __init__(self, fetch: Callable[[str | None], Page[T]]) -> None:
        self._fetch = fetch  # the page at a cursor (None: the first page)
        self._first: Page[T] | None = None
        self._items = self._all_items()

    @property
    def total(self) -> int | None:
        return self._first_page().total

    def _first_page(self) -> Page[T]:
        if self._first is None:
            self._first = self._fetch(None)
        return self._first

    def pages(self) -> Iterator[Page[T]]:
        """The pages themselves, from the first one (each with its items and cursor)."""
        page = self._first_page()
        yield page
        while page.next_cursor is not None:
            page = self._fetch(page.next_cursor)
            yield page

    def _all_items(self) -> Iterator[T]:
        for page in self.pages():
            yield from page.items

    def __iter__(self) -> Listing[T]:
        return self

    def __next__(self) -> T:
        return next(self._items)
