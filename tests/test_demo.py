"""The demo teaches: an early column beside the last one, and sentences computed from the
table's own numbers (never fixed text)."""

from __future__ import annotations

from lossbalance.experiments.demo import DEFAULT_METHODS, EARLY_EPOCH, lessons
from lossbalance.experiments.mnist import accuracy_at


def table(**means: float) -> dict[str, dict[str, float]]:
    return {row.replace("_", "-"): {"mean": value, "n": 3} for row, value in means.items()}


def test_the_default_rows_hold_a_loss_level_and_a_gradient_level_balancer():
    import lossbalance

    needs = {
        lossbalance.get_method(m).needs
        for m in DEFAULT_METHODS
        if m in lossbalance.available_methods()
    }
    assert {"losses", "gramian"} <= needs and "mtadam" in DEFAULT_METHODS


def test_lessons_follow_the_numbers():
    final = table(
        Balanced_Adam=96.0, Unbalanced_Adam=90.0, Unbalanced_MTAdam=93.0,
        Unbalanced_Uncertainty=89.0, Unbalanced_IMTL_G=94.5,
    )  # fmt: skip
    early = table(Unbalanced_MTAdam=88.0, Unbalanced_Adam=60.0)
    said = lessons(final, early, epochs=40)
    assert (
        said[0].startswith("Weighting the ten per-class terms")
        and "costs Adam 6.0 points" in said[0]
    )
    assert f"ahead of unbalanced Adam after {EARLY_EPOCH} epochs (88.0% against 60.0%)" in said[1]
    assert "ends at 93.0%, 3.0 points below balanced Adam" in said[1]
    assert "IMTL-G wins back 75% of the points the weights cost" in said[2]

    final["Unbalanced-IMTL-G"]["mean"] = 80.0
    early["Unbalanced-MTAdam"]["mean"] = 50.0
    said = lessons(final, early, epochs=40)
    assert "behind unbalanced Adam" in said[1]
    assert "none of them does better than unbalanced Adam here" in said[2]


def test_lessons_leave_out_rows_that_were_not_run():
    assert lessons(table(Unbalanced_Adam=90.0), {}, epochs=3) == []


def test_accuracy_at_takes_the_last_evaluation_up_to_the_epoch():
    run = {"history": [{"epoch": e, "test_accuracy": 10.0 * e} for e in (0.0, 0.5, 1.0, 1.5)]}
    assert accuracy_at(run, 1) == 10.0
    assert accuracy_at(run, 5) == 15.0


def test_the_bundled_digits_are_scikit_learns_copy_with_a_stratified_split():
    import numpy as np

    from lossbalance.experiments.data import DIGITS_FILE, load_digits_data, stratified_split

    assert DIGITS_FILE.with_name("DIGITS_LICENSE.txt").is_file()
    with np.load(DIGITS_FILE) as blob:
        x, y = blob["images"], blob["labels"]
    assert x.shape == (1797, 64) and x.max() == 16 and np.bincount(y).min() >= 174
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        pass
    else:  # the very same images, in the same order
        ref_x, ref_y = load_digits(return_X_y=True)
        assert np.array_equal(ref_x, x) and np.array_equal(ref_y, y)
    train, test = stratified_split(y, 0.25, seed=0)
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == 1797
    for c in range(10):  # every class split in the same proportion
        assert abs((y[test] == c).sum() - 0.25 * (y == c).sum()) <= 0.5
    again, _ = stratified_split(y, 0.25, seed=0)
    other, _ = stratified_split(y, 0.25, seed=1)
    assert np.array_equal(train, again) and not np.array_equal(train, other)
    data = load_digits_data()
    assert tuple(data.train_x.shape) == (1347, 64) and tuple(data.test_x.shape) == (450, 64)
