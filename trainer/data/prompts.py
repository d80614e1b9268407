"""MovieLens rows as text for the language-model teacher.

Following Kang et al. (2023), whom the paper follows for T5, a row becomes a short
prompt with the user's profile, the movie's title, year and genres, and a few of
the user's most recent ratings. The text alone carries little of the collaborative
signal (a frozen encoder on profile + title reaches only ~1.15 MSE), so the prompt
also states the user's and the movie's average rating:

    User: 24 year old male technician. Average rating 3.61 over 271 movies.
    Recently rated: Star Wars: 5; Fargo: 4; Heat: 3. Movie: Toy Story (1995);
    Animation, Children's, Comedy. Average rating 3.88 from 452 users.

Every number in a row's prompt comes from *history* ratings made strictly *before*
the row's timestamp (ordered target statistics, as CatBoost computes them), so a
row's prompt never depends on its own rating. Leave-one-out averages, the obvious
alternative, leak it: a user's leave-one-out mean is (S - r) / (n - 1), so across one
user's rows a lower stated average means a higher own rating, and a fine-tuned
encoder learns to read that (docs/results.md, "Teachers", has the measurements).

The history is a set of ratings given by the caller: the rows the models are fitted
on (train minus the validation split), so validation rows, like test rows, never
appear in any prompt.
"""

from __future__ import annotations

import numpy as np

from .movielens import GENRES, Ratings, SideInfo

GENDER = {1: "male", 2: "female"}


class _History:
    """Ratings grouped by one key (user or item), sorted by time, with prefix sums."""

    def __init__(self, keys: np.ndarray, others: np.ndarray, ratings: np.ndarray, times: np.ndarray, n_keys: int):
        order = np.lexsort((others, times, keys))
        self.keys, self.others = keys[order], others[order]
        self.ratings, self.times = ratings[order].astype(np.float64), times[order]
        self.ptr = np.searchsorted(self.keys, np.arange(n_keys + 1))
        self.cumsum = np.concatenate([[0.0], np.cumsum(self.ratings)])

    def before(self, key: int, time: int) -> tuple[int, int]:
        """[start, end) of ``key``'s ratings strictly before ``time``; empty for a key never seen."""
        if not 0 <= key < len(self.ptr) - 1:
            return 0, 0
        start, stop = self.ptr[key], self.ptr[key + 1]
        return start, start + int(np.searchsorted(self.times[start:stop], time, side="left"))

    def mean(self, start: int, end: int) -> float:
        return (self.cumsum[end] - self.cumsum[start]) / (end - start)


class PromptRenderer:
    def __init__(self, history: Ratings, side: SideInfo | None, n_users: int, n_items: int, n_history: int = 3):
        self.side = side
        self.n_history = n_history
        self.by_user = _History(history.user, history.item, history.rating, history.timestamp, n_users)
        self.by_item = _History(history.item, history.user, history.rating, history.timestamp, n_items)

    def render(self, user: int, item: int, timestamp: int) -> str:
        parts = [f"User: {self._profile(user)}."]
        start, end = self.by_user.before(user, timestamp)
        count = end - start
        parts.append(f"Average rating {self.by_user.mean(start, end):.2f} over {count} movies." if count
                     else "No earlier ratings.")
        recent = [
            (int(i), int(r))
            for i, r in zip(self.by_user.others[start:end][::-1], self.by_user.ratings[start:end][::-1])
            if i != item
        ][: self.n_history]
        if recent:
            parts.append("Recently rated: " + "; ".join(f"{self._title(i)}: {r}" for i, r in recent) + ".")
        parts.append(f"Movie: {self._movie(item)}.")
        start, end = self.by_item.before(item, timestamp)
        count = end - start
        parts.append(f"Average rating {self.by_item.mean(start, end):.2f} from {count} users." if count
                     else "Not yet rated.")
        return " ".join(parts)

    def render_rows(self, ratings: Ratings) -> list[str]:
        return [
            self.render(u, i, t)
            for u, i, t in zip(ratings.user.tolist(), ratings.item.tolist(), ratings.timestamp.tolist())
        ]

    def _title(self, item: int) -> str:
        if self.side is None or item >= len(self.side.item_title) or not self.side.item_title[item]:
            return f"movie {item}"
        return self.side.item_title[item]

    def _profile(self, user: int) -> str:
        side = self.side
        if side is None or user >= len(side.user_age) or side.user_age[user] == 0:
            return f"user {user}"
        occupation = side.occupations[side.user_occupation[user] - 1] if side.user_occupation[user] else "person"
        gender = GENDER.get(int(side.user_gender[user]), "")
        return f"{side.user_age[user]} year old {gender} {occupation}".replace("  ", " ")

    def _movie(self, item: int) -> str:
        side = self.side
        if side is None or item >= len(side.item_year):
            return f"movie {item}"
        year = f" ({side.item_year[item]})" if side.item_year[item] else ""
        genres = [GENRES[g] for g in np.flatnonzero(side.item_genres[item]) if GENRES[g] != "unknown"]
        return f"{self._title(item)}{year}" + (f"; {', '.join(genres)}" if genres else "")
