"""Domains the trainer knows (``ddistill train --domain NAME``)."""

from __future__ import annotations

from .base import Batch, Domain
from .cifar10 import CIFAR10Domain
from .movielens import MovieLensDomain

DOMAINS: dict[str, type[Domain]] = {d.name: d for d in (MovieLensDomain, CIFAR10Domain)}

__all__ = ["DOMAINS", "Batch", "CIFAR10Domain", "Domain", "MovieLensDomain"]
