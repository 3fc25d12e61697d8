"""bench.leaderboard: validation of submissions, the rendered table, --submit and --check."""

import json

import pytest
from tritonchat.bench import leaderboard as lb

PEAK = 989e12
FPT = 4_775_225_616
TOTAL = 5568 * 2**20 * FPT


def submission(tok_s=100_000.0, **over) -> dict:
    """A consistent train_step result as a GPU run writes it (numbers made up for the test)."""
    r = {
        "name": "train_step",
        "env": {"device": "NVIDIA H100 80GB HBM3", "gpu": {"name": "NVIDIA H100 80GB HBM3", "sm_clock_mhz": 1980},
                "commit": "0123456789abcdef0123456789abcdef01234567", "time_utc": "2026-03-02T10:00:00Z",
                "torch": "2.11", "triton": "3.6"},
        "depth": 24, "gpus": 8, "flops_per_token": FPT, "peak_flops": PEAK, "recipe": {"total_flops": TOTAL},
        "headline": {"variant": "triton", "batch": 16},
        "tok_s_per_gpu": tok_s, "mfu": FPT * tok_s / PEAK, "projected_hours": TOTAL / (FPT * tok_s * 8) / 3600,
        "val_bpb": None, "core": None,
    }
    for k, v in over.items():
        if k.startswith("env_"):
            r["env"][k[4:]] = v
        else:
            r[k] = v
    return r


def write(path, result):
    path.write_text(json.dumps(result))
    return path


def test_a_consistent_submission_is_valid():
    assert lb.validate(submission()) == []
    assert lb.validate(submission(val_bpb=0.81, core=0.2601, env_commit="0123abc-dirty")) == []


@pytest.mark.parametrize("over,needle", [
    (dict(name="infer"), "name must be 'train_step'"),
    (dict(env_device="cpu"), "GPU runs"),
    (dict(env_device=""), "env.device"),
    (dict(env_gpu={}), "env.gpu"),
    (dict(env_commit="unknown"), "env.commit"),
    (dict(env_commit="xyz1234"), "env.commit"),
    (dict(env_time_utc="yesterday"), "env.time_utc"),
    (dict(depth=0), "depth"),
    (dict(depth=True), "depth"),
    (dict(tok_s_per_gpu=-5.0), "tok_s_per_gpu"),
    (dict(tok_s_per_gpu=float("inf")), "tok_s_per_gpu"),
    (dict(mfu=1.3), "mfu must be a number in (0, 1]"),
    (dict(mfu=0.0), "mfu must be a number in (0, 1]"),
    (dict(mfu=None), "no bf16 peak"),
    (dict(projected_hours="fast"), "projected_hours"),
    (dict(val_bpb=-0.1), "val_bpb"),
    (dict(core=3.0), "core"),
    (dict(mfu=0.7), "does not match flops_per_token"),  # in range, but not what the raw numbers give
    (dict(projected_hours=1.0), "does not match recipe.total_flops"),
])
def test_malformed_submissions_are_rejected_with_the_reason(over, needle):
    problems = lb.validate(submission(**over))
    assert problems and any(needle in p for p in problems), problems


def test_missing_env_is_rejected():
    r = submission()
    del r["env"]
    assert any("env" in p for p in lb.validate(r))


def test_render_keeps_the_text_around_the_markers():
    text = lb.render_file(None, "T1")
    assert lb.START in text and lb.END in text and "T1" in text
    edited = "intro I wrote\n" + text.replace("T1", "old") + "\nfooter I wrote\n"
    again = lb.render_file(edited, "T2")
    assert "T2" in again and "old" not in again
    assert again.startswith("intro I wrote\n") and again.endswith("footer I wrote\n")
    with pytest.raises(ValueError, match="marker"):
        lb.render_file("no markers here", "T")


def test_rows_render_sorted_by_projected_time(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    write(results / "train_step_a.json", submission(tok_s=60_000.0))
    write(results / "train_step_b.json", submission(tok_s=120_000.0, core=0.2601, env_commit="abcdef0-dirty"))
    write(results / "mlp_x.json", {"name": "mlp"})  # other results are not submissions
    out = tmp_path / "LEADERBOARD.md"
    assert lb.main(["--results", str(results), "--output", str(out)]) == 0
    lines = [ln for ln in out.read_text().splitlines() if ln.startswith("| 2026")]
    assert len(lines) == 2
    assert "120.0K" in lines[0] and "60.0K" in lines[1]  # the faster run first
    fast = lines[0].split(" | ")
    assert "NVIDIA H100 80GB HBM3" in fast[1] and "triton, B=16" in fast[3] and "0.2601" in lines[0]
    hours = TOTAL / (FPT * 120_000.0 * 8) / 3600
    assert f"{hours:.2f} h" in lines[0] and f"{100 * FPT * 120_000 / PEAK:.1f}%" in lines[0]
    assert "`abcdef0-dirty`" in lines[0]


def test_an_invalid_committed_result_is_skipped_with_a_warning(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    write(results / "train_step_good.json", submission())
    write(results / "train_step_bad.json", submission(mfu=2.0))
    out = tmp_path / "LEADERBOARD.md"
    assert lb.main(["--results", str(results), "--output", str(out)]) == 1
    assert "train_step_bad.json: skipped" in capsys.readouterr().err
    assert sum(ln.startswith("| 2026") for ln in out.read_text().splitlines()) == 1


def test_submit_rejects_a_malformed_file_and_adds_nothing(tmp_path, capsys):
    bad = write(tmp_path / "train_step_new.json", submission(env_commit="unknown", mfu=None))
    results, out = tmp_path / "results", tmp_path / "LEADERBOARD.md"
    assert lb.main(["--submit", str(bad), "--results", str(results), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not a valid submission" in err and "env.commit" in err and "mfu" in err
    assert not out.exists() and not results.exists()


def test_submit_adds_a_valid_file_and_renders_it(tmp_path):
    good = write(tmp_path / "train_step_new.json", submission())
    results, out = tmp_path / "results", tmp_path / "LEADERBOARD.md"
    assert lb.main(["--submit", str(good), "--results", str(results), "--output", str(out)]) == 0
    assert (results / "train_step_new.json").read_text() == good.read_text()
    assert sum(ln.startswith("| 2026") for ln in out.read_text().splitlines()) == 1
    (tmp_path / "x").mkdir()
    other = write(tmp_path / "x" / "train_step_new.json", submission(tok_s=90_000.0))  # same name, other run
    with pytest.raises(ValueError, match="already exists"):
        lb.submit(other, results)


def test_check_reports_each_file(tmp_path, capsys):
    good = write(tmp_path / "a.json", submission())
    bad = write(tmp_path / "b.json", submission(depth=-1))
    assert lb.main(["--check", str(good)]) == 0
    assert lb.main(["--check", str(good), str(bad)]) == 2
    out = capsys.readouterr().out
    assert f"{good}: ok" in out and f"{bad}: invalid" in out and "depth" in out
    (tmp_path / "c.json").write_text("[1, 2]")
    assert lb.main(["--check", str(tmp_path / "c.json")]) == 2


def test_empty_leaderboard_says_there_is_nothing_yet(tmp_path):
    out = tmp_path / "LEADERBOARD.md"
    assert lb.main(["--results", str(tmp_path / "none"), "--output", str(out)]) == 0
    text = out.read_text()
    assert "No submissions yet" in text and "1.65 h" in text


def test_a_core_result_fills_the_core_column(tmp_path, capsys):
    good = write(tmp_path / "train_step_core.json", submission())
    core = write(tmp_path / "core_000100.json", {"core_metric": 0.2125, "max_per_task": -1})
    quick = write(tmp_path / "core_000100_max50.json", {"core_metric": 0.3, "max_per_task": 50})
    results, out = tmp_path / "results", tmp_path / "LEADERBOARD.md"
    assert lb.main(["--submit", str(good), "--core", str(core), "--results", str(results), "--output", str(out)]) == 0
    saved = json.loads((results / "train_step_core.json").read_text())
    assert saved["core"] == 0.2125 and saved["core_source"] == str(core)
    assert "0.2125" in out.read_text()
    with pytest.raises(ValueError, match="max-per-task"):
        lb.submit(good, tmp_path / "other", quick)
    assert lb.main(["--core", str(core), "--results", str(results), "--output", str(out)]) == 2
    assert "--core goes with --submit" in capsys.readouterr().err
