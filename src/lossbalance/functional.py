"""Pure functions behind the balancers.

Gradient-level functions take the K x P matrix ``G`` of per-term gradients (rows are
terms) and return weights ``alpha`` of shape ``(K,)`` (or, for :func:`pcgrad`, the
combined gradient); loss-level functions take the 1-D tensor of K losses. None of them
touches ``.grad`` or keeps state.
"""

from __future__ import annotations



__all__: list[str] = []
