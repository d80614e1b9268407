"""MovieLens rows as text for the language-model teacher.

Following Kang et al. (2023), whom the paper follows for T5, a row becomes a short
prompt with the user's profile, the movie's title, year and genres, and a few of
the user's other ratings. The text alone carries little of the collaborative signal
(a frozen encoder on profile + title reaches only ~1.15 MSE), so the prompt also
states the user's and the movie's average training ratings.

Everything comes from the training set, and always without the row's own rating
(leave-one-out), so a training prompt never contains its label and a test prompt
never contains anything from the test set:

    User: 24 year old male technician. Average rating 3.61 over 271 movies.
    Recently rated: Star Wars: 5; Fargo: 4; Heat: 3. Movie: Toy Story (1995);
    Animation, Children's, Comedy. Average rating 3.88 from 452 users.
"""

from __future__ import annotations

import numpy as np

from .movielens import GENRES, Ratings, SideInfo

GENDER = {1: "male", 2: "female"}


class PromptRenderer:
    def __init__(self, train: Ratings, side: SideInfo | None, n_users: int, n_items: int, n_history: int = 3):
        self.side = side
        self.n_items = n_items
        self.n_history = n_history
        users, items, ratings = train.user, train.item, train.rating.astype(np.float64)
        self.user_sum = np.bincount(users, ratings, minlength=n_users)
        self.user_count = np.bincount(users, minlength=n_users)
        self.item_sum = np.bincount(items, ratings, minlength=n_items)
        self.item_count = np.bincount(items, minlength=n_items)
        self.own_rating = dict(zip((users * n_items + items).tolist(), ratings.tolist()))
        # Each user's training ratings, most recent first (ties broken by item id).
        order = np.lexsort((items, -train.timestamp, users))
        starts = np.searchsorted(users[order], np.arange(n_users + 1))
        self._history = [
            list(zip(items[order][a:b].tolist(), ratings[order][a:b].astype(int).tolist()))
            for a, b in zip(starts[:-1], starts[1:])
        ]

    def _title(self, item: int) -> str:
        if self.side is None or not self.side.item_title[item]:
            return f"movie {item}"
        return self.side.item_title[item]

    def render(self, user: int, item: int) -> str:
        own = self.own_rating.get(user * self.n_items + item)
        u_sum, u_count = self.user_sum[user], self.user_count[user]
        i_sum, i_count = self.item_sum[item], self.item_count[item]
        if own is not None:  # leave the row's own rating out
            u_sum, u_count, i_sum, i_count = u_sum - own, u_count - 1, i_sum - own, i_count - 1
        parts = [f"User: {self._profile(user)}."]
        parts.append(
            f"Average rating {u_sum / u_count:.2f} over {u_count} movies." if u_count else "No other ratings."
        )
        recent = [(i, r) for i, r in self._history[user] if i != item][: self.n_history]
        if recent:
            parts.append("Recently rated: " + "; ".join(f"{self._title(i)}: {r}" for i, r in recent) + ".")
        parts.append(f"Movie: {self._movie(item)}.")
        parts.append(f"Average rating {i_sum / i_count:.2f} from {i_count} users." if i_count else "Not yet rated.")
        return " ".join(parts)

    def render_rows(self, ratings: Ratings) -> list[str]:
        return [self.render(u, i) for u, i in zip(ratings.user.tolist(), ratings.item.tolist())]

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
