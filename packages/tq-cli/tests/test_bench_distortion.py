"""Tests for `tq bench distortion`: the paper's figures are reproduced through the CLI."""

import json

import pytest
from tq_cli import main
from tq_cli.bench_distortion import measure, render

OPTIMUM_128 = {1: 0.3609, 2: 0.1160, 3: 0.0340, 4: 0.0093}


def test_cli_json_d128_meets_the_issue_targets(capsys):
    assert main(["bench", "distortion", "--dims", "128", "--num-vectors", "10000", "--json"]) == 0
    out = capsys.readouterr()
    rows = json.loads(out.out)["rows"]
    assert [r["bits"] for r in rows] == [1, 2, 3, 4]
    assert "paper" in out.err and "optimum" in out.err  # the table goes to stderr with --json
    for r in rows:
        assert r["mse"] == pytest.approx(OPTIMUM_128[r["bits"]], rel=0.03)
        assert abs(r["prod_bias"]) <= 3 * r["prod_bias_stderr"]
        assert r["mse_lower_bound"] < r["mse"]
        assert r["prod_ratio_to_expected"] == pytest.approx(1.0, abs=0.1)
        # mse is biased for y = x by exactly -D (centroid condition); prod is not.
        assert r["mse_self_ip_bias"] == pytest.approx(-r["mse"], rel=0.05)


def test_out_file_and_table(tmp_path, capsys):
    out = tmp_path / "d.json"
    argv = ["bench", "distortion", "--dims", "64", "--bits", "2", "--num-vectors", "500"]
    assert main(argv + ["--json", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["rows"][0]["dim"] == 64
    assert main(argv) == 0
    assert "0.117" in capsys.readouterr().out


def test_render_flags_a_miss():
    row = measure(64, 1, 500)
    row["mse_within_3pct"] = False
    assert render([row]).splitlines()[-1].endswith("NO")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bits", "5"], "--bits must be among"),
        (["--dims", "4"], "--dims must be at least"),
        (["--num-vectors", "10"], "--num-vectors must be at least"),
    ],
)
def test_bad_arguments(argv, message):
    with pytest.raises(SystemExit, match=message):
        main(["bench", "distortion", *argv])


def test_unparsable_list(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "distortion", "--dims", "a,b"])
    assert "comma-separated integers" in capsys.readouterr().err


def test_number_list_types_name_the_problem():
    import argparse

    from tq_cli.bench_cli import float_list, int_list

    assert int_list("1, 2,3") == [1, 2, 3] and float_list("0.5,1") == [0.5, 1.0]
    for fn, text, message in [
        (int_list, "1,x", "comma-separated integers"),
        (float_list, "0.5,y", "comma-separated numbers"),
        (int_list, ",", "at least one integer"),
        (float_list, "", "at least one number"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            fn(text)
