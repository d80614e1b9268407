"""MovieLens ratings: loading, the seeded split, and the side information per id.

Two ways in, matching the CLI's data flags:

* ``load_movielens(data_dir=DIR, seed=S)``: an ml-100k folder. ``u.data`` is shuffled
  with ``numpy.random.default_rng(S)`` and cut 80/20 into train/test (``test_fraction``).
* ``load_movielens(train_file=A, test_file=B)``: two files in u.data format (tab
  separated ``user item rating timestamp``), e.g. ml-100k's own ``u1.base``/``u1.test``.
  Side information is read from ``u.user``/``u.item`` beside ``A`` when they exist.

Ids stay the raw MovieLens ids (users and items are numbered from 1); index 0 of
every lookup table is the "unknown" row, so an id never seen at fit time still has
an embedding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
AGE_EDGES = (18, 25, 35, 45, 50, 56)  # the MovieLens-1M age groups, bucket 0 = unknown
N_AGE_BUCKETS = len(AGE_EDGES) + 2
YEAR_EDGES = tuple(range(1930, 2000, 5))  # 5-year buckets, bucket 0 = unknown
N_YEAR_BUCKETS = len(YEAR_EDGES) + 2


@dataclass(frozen=True)
class Ratings:
    """Rating rows as parallel arrays."""

    user: np.ndarray  # int64 [N]
    item: np.ndarray  # int64 [N]
    rating: np.ndarray  # float32 [N]
    timestamp: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return len(self.user)

    def take(self, index: np.ndarray) -> Ratings:
        return Ratings(self.user[index], self.item[index], self.rating[index], self.timestamp[index])


@dataclass(frozen=True)
class SideInfo:
    """Per-id lookup tables from u.user and u.item; row 0 is the unknown id."""

    user_age: np.ndarray  # int64 [n_users], years, 0 unknown
    user_gender: np.ndarray  # int64 [n_users], 0 unknown, 1 M, 2 F
    user_occupation: np.ndarray  # int64 [n_users], 0 unknown, else 1 + index in occupations
    occupations: tuple[str, ...]
    item_title: tuple[str, ...]  # [n_items], "" unknown; the year stripped off
    item_year: np.ndarray  # int64 [n_items], 0 unknown
    item_genres: np.ndarray  # float32 [n_items, 19] multi-hot

    @property
    def user_age_bucket(self) -> np.ndarray:
        return np.where(self.user_age > 0, np.searchsorted(AGE_EDGES, self.user_age, side="right") + 1, 0)

    @property
    def item_year_bucket(self) -> np.ndarray:
        return np.where(self.item_year > 0, np.searchsorted(YEAR_EDGES, self.item_year, side="right") + 1, 0)


# Validation rows carved out of train by the split seed: teachers, students and baselines all hold out
# the same rows, so they fit the same ones.
VALID_FRACTION = 0.05


@dataclass(frozen=True)
class MovieLens:
    train: Ratings
    test: Ratings
    n_users: int  # max user id + 1
    n_items: int  # max item id + 1
    side: SideInfo | None
    source: str  # how the split was made, for run configs and reports

    def split_validation(self, fraction: float, seed: int) -> tuple[Ratings, Ratings]:
        """Carve a seeded validation set out of train (for early stopping; test stays unseen)."""
        order = np.random.default_rng(seed + 1_000_003).permutation(len(self.train))
        n_valid = int(round(fraction * len(order)))
        return self.train.take(np.sort(order[n_valid:])), self.train.take(np.sort(order[:n_valid]))


def read_ratings(path: str | Path) -> Ratings:
    """Read a u.data-format file: tab separated ``user item rating timestamp``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ratings file not found: {path}")
    try:
        table = np.loadtxt(path, dtype=np.int64, ndmin=2)
    except ValueError as err:
        raise ValueError(f"{path} is not in u.data format (user item rating timestamp): {err}") from None
    if table.shape[1] != 4:
        raise ValueError(f"{path} has {table.shape[1]} columns; u.data format has 4 (user item rating timestamp)")
    return Ratings(table[:, 0], table[:, 1], table[:, 2].astype(np.float32), table[:, 3])


def read_side_info(folder: str | Path, n_users: int, n_items: int) -> SideInfo | None:
    """Read u.user / u.item / u.occupation from ``folder``; None when they are absent."""
    folder = Path(folder)
    if not ((folder / "u.user").is_file() and (folder / "u.item").is_file()):
        return None
    occupation_file = folder / "u.occupation"
    users = [line.split("|") for line in (folder / "u.user").read_text("latin-1").splitlines() if line]
    if occupation_file.is_file():
        occupations = tuple(x.strip() for x in occupation_file.read_text("latin-1").splitlines() if x.strip())
    else:
        occupations = tuple(sorted({u[3] for u in users}))
    items = [line.split("|") for line in (folder / "u.item").read_text("latin-1").splitlines() if line]
    n_users = max([n_users] + [int(u[0]) + 1 for u in users])
    n_items = max([n_items] + [int(i[0]) + 1 for i in items])

    age = np.zeros(n_users, np.int64)
    gender = np.zeros(n_users, np.int64)
    occupation = np.zeros(n_users, np.int64)
    for uid, a, g, occ, *_ in users:
        u = int(uid)
        age[u] = int(a)
        gender[u] = {"M": 1, "F": 2}.get(g, 0)
        occupation[u] = occupations.index(occ) + 1 if occ in occupations else 0

    titles = [""] * n_items
    year = np.zeros(n_items, np.int64)
    genres = np.zeros((n_items, len(GENRES)), np.float32)
    for fields in items:
        i = int(fields[0])
        titles[i], year[i] = _split_title(fields[1], fields[2])
        genres[i] = np.asarray(fields[-len(GENRES):], dtype=np.float32)
    return SideInfo(age, gender, occupation, occupations, tuple(titles), year, genres)


def _split_title(title: str, release_date: str) -> tuple[str, int]:
    """'Toy Story (1995)' -> ('Toy Story', 1995); the release date fills in a missing year."""
    match = re.match(r"^(.*?)\s*\((\d{4})\)\s*$", title)
    if match:
        return match.group(1), int(match.group(2))
    year = re.search(r"(\d{4})$", release_date)
    return title.strip(), int(year.group(1)) if year else 0


def load_movielens(
    data_dir: str | Path | None = None,
    *,
    train_file: str | Path | None = None,
    test_file: str | Path | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
) -> MovieLens:
    """Load MovieLens from an ml-100k folder (seeded random split) or from train/test files."""
    if (data_dir is None) == (train_file is None or test_file is None):
        raise ValueError("give either data_dir, or both train_file and test_file")
    if data_dir is not None:
        data_dir = Path(data_dir)
        if not (data_dir / "u.data").is_file():
            raise FileNotFoundError(f"{data_dir} has no u.data: point --data at an ml-100k folder")
        ratings = read_ratings(data_dir / "u.data")
        order = np.random.default_rng(seed).permutation(len(ratings))
        n_test = int(round(test_fraction * len(ratings)))
        train, test = ratings.take(np.sort(order[n_test:])), ratings.take(np.sort(order[:n_test]))
        side_dir = data_dir
        source = f"{data_dir.name}: random {1 - test_fraction:.0%}/{test_fraction:.0%} split of u.data, seed {seed}"
    else:
        train, test = read_ratings(train_file), read_ratings(test_file)
        side_dir = Path(train_file).parent
        source = f"train {Path(train_file).name}, test {Path(test_file).name}"
    n_users = int(max(train.user.max(), test.user.max())) + 1
    n_items = int(max(train.item.max(), test.item.max())) + 1
    side = read_side_info(side_dir, n_users, n_items)
    if side is not None:
        n_users, n_items = len(side.user_age), len(side.item_year)
    return MovieLens(train, test, n_users, n_items, side, source)
