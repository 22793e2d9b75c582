"""Built-in label sets: sizes, official order, spot checks, and `imdpipe labels`."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from imdpipe.cli.main import app
from imdpipe.labels import LABEL_SETS, audioset_rows, label_set


@pytest.mark.parametrize("name,size,first,last", [
    ("kinetics400", 400, "abseiling", "zumba"),
    ("ucf101", 101, "ApplyEyeMakeup", "YoYo"),
    ("hmdb51", 51, "brush_hair", "wave"),
    ("audioset", 527, "Speech", "Field recording"),
])
def test_sizes_and_ends(name, size, first, last):
    names = label_set(name)
    assert len(names) == size == len(set(names))
    assert (names[0], names[-1]) == (first, last)
    assert all(n == n.strip() and n for n in names)


def test_official_orders_and_spot_checks():
    k400 = label_set("kinetics400")
    assert list(k400) == sorted(k400)  # the official class list is alphabetical
    assert k400.index("playing guitar") == 232 and k400.index("yoga") == 398
    hmdb = label_set("hmdb51")
    assert list(hmdb) == sorted(hmdb)
    assert hmdb.index("ride_bike") == 30 and "sword_exercise" in hmdb
    ucf = label_set("ucf101")  # classInd.txt order: case-insensitive alphabetical, not plain sorted
    assert ucf.index("JumpingJack") == 46 and ucf.index("JumpRope") == 47
    assert list(ucf) != sorted(ucf) and list(ucf) == sorted(ucf, key=str.lower)
    rows = audioset_rows()
    assert [r[0] for r in rows] == list(range(527))
    assert rows[0] == (0, "/m/09x0r", "Speech")
    assert rows[137] == (137, "/m/04rlf", "Music")
    assert rows[500] == (500, "/m/028v0c", "Silence")
    assert label_set("audioset")[70] == "Hubbub, speech noise, speech babble"  # commas kept inside names
    assert len({r[1] for r in rows}) == 527


def test_unknown_set_and_cli():
    with pytest.raises(ValueError, match="built-in sets are"):
        label_set("kinetics700")
    runner = CliRunner()
    r = runner.invoke(app, ["labels", "hmdb51"])
    assert r.exit_code == 0 and r.output.splitlines() == list(label_set("hmdb51"))
    r = runner.invoke(app, ["labels", "nope"])
    assert r.exit_code != 0 and "built-in sets are" in r.output
    assert set(LABEL_SETS) == {"kinetics400", "ucf101", "hmdb51", "audioset"}
