"""Embedding-table + MLP-tower recommenders (paper Table 1: MLP-S/M/L).

The model is split where DiverseDistill injects its question: ``embed`` turns
(user, item) ids into the post-embedding vector (the concatenation of one
``embed_dim`` vector per field), and ``from_question`` runs the MLP tower and the
rating head on such a vector. A teacher answers a question by calling
``from_question`` on it; its natural forward is ``from_question(embed(...))``.

Fields: user id, item id, and, when the data has side information, the user's age
group, gender and occupation and the movie's release-year bucket and genres. With
``history=True`` two more fields summarise the training interactions: the mean of
(item, rating) embeddings over the items the user rated, and of (user, rating)
embeddings over the users who rated the item (a one-layer graph convolution, as
GC-MC does). The training set those come from is stored in buffers, so a checkpoint
carries its own knowledge. During fitting the row's own rating is left out of both
means (``exclude_own``): otherwise the model learns to read the label off its input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

N_RATING_LEVELS = 5


@dataclass
class RecsysMLPConfig:
    n_users: int
    n_items: int
    hidden: tuple[int, ...] = (1024, 512)
    embed_dim: int = 32
    dropout: float = 0.0
    side_features: bool = True
    history: bool = False
    global_mean: float = 3.5
    # Sizes of the side-information vocabularies (set from the data at fit time).
    n_age_buckets: int = 0
    n_occupations: int = 0
    n_year_buckets: int = 0
    n_genres: int = 0
    history_sizes: tuple[int, int] = field(default=(0, 0))  # nnz of the user / item history

    def __post_init__(self) -> None:
        self.hidden = tuple(int(h) for h in self.hidden)
        self.history_sizes = tuple(int(n) for n in self.history_sizes)

    @property
    def n_fields(self) -> int:
        return 2 + (5 if self.side_features else 0) + (2 if self.history else 0)

    @property
    def question_dim(self) -> int:
        return self.n_fields * self.embed_dim


class RecsysMLP(nn.Module):
    def __init__(self, config: RecsysMLPConfig) -> None:
        super().__init__()
        self.config = c = config
        d = c.embed_dim
        self.user = nn.Embedding(c.n_users, d)
        self.item = nn.Embedding(c.n_items, d)
        if c.side_features:
            self.age = nn.Embedding(c.n_age_buckets, d)
            self.gender = nn.Embedding(3, d)
            self.occupation = nn.Embedding(c.n_occupations + 1, d)
            self.year = nn.Embedding(c.n_year_buckets, d)
            self.genre = nn.Linear(c.n_genres, d, bias=False)  # mean of genre embeddings
            self.register_buffer("user_age", torch.zeros(c.n_users, dtype=torch.long))
            self.register_buffer("user_gender", torch.zeros(c.n_users, dtype=torch.long))
            self.register_buffer("user_occupation", torch.zeros(c.n_users, dtype=torch.long))
            self.register_buffer("item_year", torch.zeros(c.n_items, dtype=torch.long))
            self.register_buffer("item_genres", torch.zeros(c.n_items, c.n_genres))
        if c.history:
            self.user_history = nn.Embedding(c.n_items * N_RATING_LEVELS, d)  # (item, rating) pairs
            self.item_history = nn.Embedding(c.n_users * N_RATING_LEVELS, d)  # (user, rating) pairs
            n_user_hist, n_item_hist = c.history_sizes
            self.register_buffer("user_hist_ptr", torch.zeros(c.n_users + 1, dtype=torch.long))
            self.register_buffer("user_hist_idx", torch.zeros(n_user_hist, dtype=torch.long))
            self.register_buffer("item_hist_ptr", torch.zeros(c.n_items + 1, dtype=torch.long))
            self.register_buffer("item_hist_idx", torch.zeros(n_item_hist, dtype=torch.long))
        layers: list[nn.Module] = []
        width = c.question_dim
        for h in c.hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(c.dropout)]
            width = h
        self.tower = nn.Sequential(*layers)
        self.head = nn.Linear(width, 1)
        for emb in self.modules():
            if isinstance(emb, nn.Embedding):
                nn.init.normal_(emb.weight, std=0.05)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden[-1]

    def set_tables(self, side=None, train_user=None, train_item=None, train_rating=None) -> None:
        """Fill the lookup buffers from the data: side information and the training history."""
        c = self.config
        if c.side_features:
            self.user_age.copy_(torch.as_tensor(side.user_age_bucket))
            self.user_gender.copy_(torch.as_tensor(side.user_gender))
            self.user_occupation.copy_(torch.as_tensor(side.user_occupation))
            self.item_year.copy_(torch.as_tensor(side.item_year_bucket))
            self.item_genres.copy_(torch.as_tensor(side.item_genres))
        if c.history:
            level = np.asarray(train_rating, np.int64) - 1
            ptr, idx = _csr(train_user, np.asarray(train_item) * N_RATING_LEVELS + level, c.n_users)
            self.user_hist_ptr.copy_(ptr)
            self.user_hist_idx = idx
            ptr, idx = _csr(train_item, np.asarray(train_user) * N_RATING_LEVELS + level, c.n_items)
            self.item_hist_ptr.copy_(ptr)
            self.item_hist_idx = idx
            c.history_sizes = (len(self.user_hist_idx), len(self.item_hist_idx))

    def embed(self, user: torch.Tensor, item: torch.Tensor, exclude_rating: torch.Tensor | None = None) -> torch.Tensor:
        """Post-embedding vector [B, question_dim] for (user, item) ids.

        ``exclude_rating`` (fitting only): the row's own rating, left out of the history means.
        """
        c = self.config
        fields = [self.user(user), self.item(item)]
        if c.side_features:
            genres = self.item_genres[item]
            genre_vec = self.genre(genres) / genres.sum(-1, keepdim=True).clamp(min=1.0)
            fields += [
                self.age(self.user_age[user]),
                self.gender(self.user_gender[user]),
                self.occupation(self.user_occupation[user]),
                self.year(self.item_year[item]),
                genre_vec,
            ]
        if c.history:
            own_user_pair = own_item_pair = None
            if exclude_rating is not None:
                level = exclude_rating.long() - 1
                own_user_pair = item * N_RATING_LEVELS + level
                own_item_pair = user * N_RATING_LEVELS + level
            fields.append(_bag_mean(self.user_history, self.user_hist_ptr, self.user_hist_idx, user, own_user_pair))
            fields.append(_bag_mean(self.item_history, self.item_hist_ptr, self.item_hist_idx, item, own_item_pair))
        return torch.cat(fields, dim=-1)

    def from_question(self, question: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the tower from an injected post-embedding vector: (hidden [B, H], rating [B])."""
        hidden = self.tower(question)
        return hidden, self.head(hidden).squeeze(-1) + self.config.global_mean

    def forward(self, user, item, exclude_rating=None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.from_question(self.embed(user, item, exclude_rating))


def _csr(rows, values, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group ``values`` by ``rows`` into (ptr [n_rows+1], idx) so row r owns idx[ptr[r]:ptr[r+1]]."""
    rows = np.asarray(rows, np.int64)
    order = np.argsort(rows, kind="stable")
    counts = np.bincount(rows, minlength=n_rows)
    ptr = np.concatenate([[0], np.cumsum(counts)])
    return torch.as_tensor(ptr), torch.as_tensor(np.asarray(values, np.int64)[order])


def _bag_mean(table: nn.Embedding, ptr, idx, rows, own_pair=None) -> torch.Tensor:
    """Mean of ``table`` over each row's history, optionally without the row's own pair."""
    starts, counts = ptr[rows], ptr[rows + 1] - ptr[rows]
    offsets = torch.cumsum(counts, 0) - counts
    positions = torch.repeat_interleave(starts - offsets, counts) + torch.arange(int(counts.sum()), device=rows.device)
    sums = F.embedding_bag(idx[positions], table.weight, offsets, mode="sum")
    counts = counts.to(sums.dtype)
    if own_pair is not None:
        sums = sums - table(own_pair)
        counts = counts - 1
    return sums / counts.clamp(min=1.0).unsqueeze(-1)
