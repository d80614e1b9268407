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
    inputs = MovieLensInputs(data)
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
    """(user average, user count, item average, item count) stated in a prompt."""
    user = re.search(r"Average rating ([\d.]+) over (\d+) movies", prompt)
    item = re.search(r"Average rating ([\d.]+) from (\d+) users", prompt)
    return float(user[1]), int(user[2]), float(item[1]), int(item[2])


def test_training_prompts_leave_their_own_rating_out(synthetic_data):
    train = synthetic_data.train
    renderer = PromptRenderer(train, synthetic_data.side, synthetic_data.n_users, synthetic_data.n_items, n_history=50)
    for row in range(0, len(train), 97):
        user, item = int(train.user[row]), int(train.item[row])
        others = (train.user == user) & (train.item != item)
        raters = (train.item == item) & (train.user != user)
        prompt = renderer.render(user, item)
        u_avg, u_n, i_avg, i_n = stats_in(prompt)
        assert u_n == others.sum() and u_avg == pytest.approx(train.rating[others].mean(), abs=0.005)
        if raters.any():
            assert i_n == raters.sum() and i_avg == pytest.approx(train.rating[raters].mean(), abs=0.005)
        # The movie itself is never in the user's "recently rated" list.
        recent = prompt.split("Recently rated: ")[1].split(". Movie:")[0] if "Recently" in prompt else ""
        assert f"Café Movie {item}:" not in recent


def test_test_prompts_use_training_data_only(synthetic_data):
    inputs = MovieLensInputs(synthetic_data)
    train, test = synthetic_data.train, synthetic_data.test
    for row in range(0, len(test), 53):
        user, item = int(test.user[row]), int(test.item[row])
        u_avg, u_n, *_ = stats_in(inputs.texts(test)[row])
        mine = train.user == user
        assert u_n == mine.sum() and u_avg == pytest.approx(train.rating[mine].mean(), abs=0.005)


def test_prompt_mentions_profile_title_year_and_genres(ml100k):
    inputs = MovieLensInputs(ml100k)
    prompt = inputs.renderer.render(1, 1)
    assert prompt.startswith("User: 24 year old male technician.")
    assert "Movie: Toy Story (1995); Animation, Children's, Comedy." in prompt
    assert prompt.count("Recently rated:") == 1 and len(prompt.split("Recently rated: ")[1].split(". Movie:")[0].split("; ")) == 3


def test_inputs_by_spec_name(synthetic_data):
    inputs = MovieLensInputs(synthetic_data)
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
