"""Recommendation models sized and filled from a MovieLens dataset.

The teachers (MLP-M, MLP-L) and the student (MLP-S) are the same family, differing
in tower width (paper Table 1) and in how they are regularised.
"""

from __future__ import annotations

from services.teacher_server.zoo.recsys_mlp import RecsysMLP, RecsysMLPConfig

from .data.movielens import GENRES, N_AGE_BUCKETS, N_YEAR_BUCKETS, MovieLens, Ratings

TOWERS = {"mlp-s": (128, 64), "mlp-m": (512, 256), "mlp-l": (1024, 512)}


def build_recsys_mlp(
    data: MovieLens,
    train: Ratings,
    hidden: tuple[int, ...],
    *,
    embed_dim: int = 32,
    dropout: float = 0.0,
    history: bool = False,
) -> RecsysMLP:
    """A RecsysMLP with vocabularies from ``data`` and lookup tables from ``train``."""
    side = data.side
    config = RecsysMLPConfig(
        n_users=data.n_users,
        n_items=data.n_items,
        hidden=hidden,
        embed_dim=embed_dim,
        dropout=dropout,
        side_features=side is not None,
        history=history,
        global_mean=float(train.rating.mean()),
        n_age_buckets=N_AGE_BUCKETS,
        n_occupations=len(side.occupations) if side else 0,
        n_year_buckets=N_YEAR_BUCKETS,
        n_genres=len(GENRES),
    )
    model = RecsysMLP(config)
    model.set_tables(side, train.user, train.item, train.rating)
    return model
