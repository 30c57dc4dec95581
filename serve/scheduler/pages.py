"""The page allocator: a free list over the pages of the paged KV cache (page 0 is scratch)."""

from __future__ import annotations

from jaxsys.models.kv_cache import SCRATCH_PAGE


class OutOfPages(RuntimeError):
    pass


class PageAllocator:
    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError("the KV cache needs at least 2 pages (page 0 is scratch)")
        self.num_pages = num_pages
        self._free = [p for p in range(num_pages - 1, -1, -1) if p != SCRATCH_PAGE]

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        return self.num_pages - 1

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPages(f"need {n} pages, {len(self._free)} free")
        out = [self._free.pop() for _ in range(n)]
        return out

    def free(self, pages) -> None:
        for p in pages:
            if p == SCRATCH_PAGE or not 0 < p < self.num_pages:
                raise ValueError(f"cannot free page {p}")
            self._free.append(p)
