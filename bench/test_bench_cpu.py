"""bench.cpu --dry-run: every unit at tiny shapes (compile through the eager backend), one result file."""

import json

from tritonchat.bench import cpu


def test_dry_run_writes_every_unit(tmp_path):
    result = cpu.main(["--dry-run", "--out", str(tmp_path), "--budget", "600"])
    (path,) = tmp_path.glob("cpu_*.json")
    saved = json.loads(path.read_text())
    assert saved["name"] == "cpu" and saved["env"]["commit"] and not saved["skipped"]
    (unit,) = saved["train"]
    assert set(unit["train"]) == set(unit["eval"]) == {"ours_eager", "ours_compiled", "restated_compiled"}
    assert all(v["median_s"] > 0 and v["min_s"] <= v["median_s"] <= v["max_s"] for v in unit["train"].values())
    # the restatement computes the same model: the same first loss as ours from the same weights
    assert max(unit["first_loss_rel_diff"].values()) < 1e-5
    (dec,) = saved["decode"]
    assert set(dec["decode"]) == {"engine", "contiguous"} and dec["batch"] == 2
    assert result["train"][0]["depth"] == 1


def test_budget_skips_units(tmp_path):
    result = cpu.main(["--dry-run", "--out", str(tmp_path), "--budget", "0", "--depths", "", "--decode-batches",
                       "1,2,3"])
    assert result["skipped"] == ["decode 1 2", "decode 1 3"] and len(result["decode"]) == 1  # the first one runs
