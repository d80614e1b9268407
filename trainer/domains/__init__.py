"""Domains the trainer knows (``ddistill train --domain NAME``)."""

from __future__ import annotations

from .base import Batch, Domain
from .movielens import MovieLensDomain

DOMAINS: dict[str, type[Domain]] = {d.name: d for d in (MovieLensDomain,)}

__all__ = ["DOMAINS", "Batch", "Domain", "MovieLensDomain"]
