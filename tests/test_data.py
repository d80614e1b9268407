"""MovieLens loading, the seeded split, and prompts that never leak a label."""

import re

import numpy as np
import pytest

from services.teacher_server.spec import InputSpec, TeacherSpec
from trainer.data.inputs import MovieLensInputs
from trainer.data.movielens import load_movielens, read_ratings
from trainer.data.prompts import PromptRenderer


def test_ml100k_split_is_80_20_disjoint_and_seeded(ml100k):
    from conftest import ML100K

    assert (len(ml100k.train), len(ml100k.test)) == (80_000, 20_000)
    assert (ml100k.n_users, ml100k.n_items) == (944, 1683)
    pairs = lambda r: set(zip(r.user.tolist(), r.item.tolist()))  # noqa: E731
    assert not pairs(ml100k.train) & pairs(ml100k.test)
    again = load_movielens(ML100K, seed=0)
    assert np.array_equal(again.test.user, ml100k.test.user) and np.array_equal(again.test.item, ml100k.test.item)
    other = load_movielens(ML100K, seed=1)
    assert not np.array_equal(other.test.user, ml100k.test.user)
    assert "seed 0" in ml100k.source


def test_ml100k_side_information(ml100k):
    side = ml100k.side
    assert side.user_age[1] == 24 and side.user_gender[1] == 1 and side.occupations[side.user_occupation[1] - 1] == "technician"
    assert side.item_title[1] == "Toy Story" and side.item_year[1] == 1995
    assert side.item_genres[1].sum() == 3  # Animation, Children's, Comedy
    assert side.user_age_bucket.min() >= 0 and side.user_age_bucket[1:].min() >= 1


def test_train_test_files_with_side_info_beside_them(synthetic_dir):
    data = load_movielens(train_file=synthetic_dir / "ua.base", test_file=synthetic_dir / "ua.test")
    assert (len(data.train), len(data.test)) == (2400, 600)
    assert data.side is not None and data.side.item_title[3] == "Café Movie 3"  # latin-1 decoded
    assert "ua.base" in data.source


def test_train_test_files_without_side_info(tmp_path, synthetic_dir):
    for name in ("ua.base", "ua.test"):
        (tmp_path / name).write_bytes((synthetic_dir / name).read_bytes())
    data = load_movielens(train_file=tmp_path / "ua.base", test_file=tmp_path / "ua.test")
    assert data.side is None
    inputs = MovieLensInputs(data, data.train)
    assert inputs.texts(data.test)[0].startswith("User: user ")


def test_bad_data_paths_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no u.data"):
        load_movielens(tmp_path)
    with pytest.raises(ValueError, match="either data_dir"):
        load_movielens()
    (tmp_path / "bad.data").write_text("1\t2\n3\t4\n")
    with pytest.raises(ValueError, match="4 \\(user item rating timestamp\\)"):
        read_ratings(tmp_path / "bad.data")
    (tmp_path / "words.data").write_text("a b c d\n")
    with pytest.raises(ValueError, match="not in u.data format"):
        read_ratings(tmp_path / "words.data")


def test_validation_split_is_carved_from_train_only(synthetic_data):
    fit, valid = synthetic_data.split_validation(0.1, seed=0)
    assert len(fit) + len(valid) == len(synthetic_data.train) and len(valid) == 240
    assert set(zip(valid.user, valid.item)) <= set(zip(synthetic_data.train.user, synthetic_data.train.item))


def stats_in(prompt):
    """(user average, user count) and (item average, item count) stated in a prompt; None when absent."""
    user = re.search(r"Average rating ([\d.]+) over (\d+) movies", prompt)
    item = re.search(r"Average rating ([\d.]+) from (\d+) users", prompt)
    return (float(user[1]), int(user[2])) if user else None, (float(item[1]), int(item[2])) if item else None


def test_prompts_use_only_history_ratings_made_before_the_row(synthetic_data):
    train, test = synthetic_data.train, synthetic_data.test
    renderer = PromptRenderer(train, synthetic_data.side, synthetic_data.n_users, synthetic_data.n_items)
    for split, step in ((train, 97), (test, 53)):
        for row in range(0, len(split), step):
            user, item, time = int(split.user[row]), int(split.item[row]), int(split.timestamp[row])
            prompt = renderer.render(user, item, time)
            user_stats, item_stats = stats_in(prompt)
            earlier_by_user = (train.user == user) & (train.timestamp < time)
            earlier_for_item = (train.item == item) & (train.timestamp < time)
            if earlier_by_user.any():
                assert user_stats == (pytest.approx(train.rating[earlier_by_user].mean(), abs=0.0051),
                                      earlier_by_user.sum())
            else:
                assert user_stats is None and "No earlier ratings." in prompt
            if earlier_for_item.any():
                assert item_stats == (pytest.approx(train.rating[earlier_for_item].mean(), abs=0.0051),
                                      earlier_for_item.sum())
            recent = prompt.split("Recently rated: ")[1].split(". Movie:")[0].split("; ") if "Recently" in prompt else []
            assert not any(entry.startswith(f"Café Movie {item}:") for entry in recent)
            earlier = np.flatnonzero(earlier_by_user)
            latest = earlier[np.lexsort((train.item[earlier], train.timestamp[earlier]))][::-1][:3]
            assert recent == [f"Café Movie {train.item[j]}: {int(train.rating[j])}" for j in latest
                              if train.item[j] != item][: len(recent)]


def test_a_rows_prompt_does_not_depend_on_its_own_rating(synthetic_data):
    """The leak leave-one-out averages have: flip every training row's rating in turn, re-render, compare."""
    train = synthetic_data.train
    args = (synthetic_data.side, synthetic_data.n_users, synthetic_data.n_items)
    renderer = PromptRenderer(train, *args)
    for row in range(0, len(train), 211):
        changed = np.array(train.rating, copy=True)
        changed[row] = 1.0 if changed[row] > 3 else 5.0
        flipped = type(train)(train.user, train.item, changed, train.timestamp)
        user, item, time = int(train.user[row]), int(train.item[row]), int(train.timestamp[row])
        assert PromptRenderer(flipped, *args).render(user, item, time) == renderer.render(user, item, time)


def test_prompt_mentions_profile_title_year_and_genres(ml100k):
    inputs = MovieLensInputs(ml100k, ml100k.train)
    prompt = inputs.renderer.render(1, 1, 10**10)  # after every rating
    assert prompt.startswith("User: 24 year old male technician.")
    assert "Movie: Toy Story (1995); Animation, Children's, Comedy." in prompt
    assert prompt.count("Recently rated:") == 1
    assert len(prompt.split("Recently rated: ")[1].split(". Movie:")[0].split("; ")) == 3


def test_inputs_by_spec_name(synthetic_data):
    inputs = MovieLensInputs(synthetic_data, synthetic_data.train)
    spec = TeacherSpec("t", "f", "x", (4,), 2, (), "regression", "rating", inputs=(
        InputSpec("text", "text"), InputSpec("ids", "tensor", "int64", (2,), needed_for_answer=False),
    ))
    rows = np.array([3, 1])
    answer = inputs.for_spec(spec, synthetic_data.test, rows, for_answer=True)
    assert list(answer) == ["text"] and answer["text"] == [inputs.texts(synthetic_data.test)[i] for i in rows]
    predict = inputs.for_spec(spec, synthetic_data.test, rows, for_answer=False)
    assert predict["ids"].tolist() == [[synthetic_data.test.user[i], synthetic_data.test.item[i]] for i in rows]
    with pytest.raises(KeyError, match="image"):
        inputs.get("image", synthetic_data.test)
