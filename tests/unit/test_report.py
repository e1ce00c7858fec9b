"""The report from hand-made artifacts: every number checked against a computation done here."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from helpers.report_runs import scores

from fedseg.app.artifacts import RunArtifactsError, load_run
from fedseg.app.report import pooled, write_report


def test_summary_contract_and_case_weighted_overall(run_folder, tmp_path):
    index = write_report(load_run(str(run_folder)), str(tmp_path / "report"))
    with open(tmp_path / "report" / "summary.json") as f:
        summary = json.load(f)
    final = summary["final"]
    assert summary["algorithm"] == "fedref" and summary["rounds"] == 2
    assert final["sites"]["site-1"]["dice_wt"] == pytest.approx(0.9)
    assert final["overall"]["dice_wt"] == pytest.approx((0.9 * 3 + 0.7 * 1) / 4)
    assert final["overall"]["n_cases"] == 4
    assert summary["cross_site"]["site-1"] == {
        "site-1": pytest.approx(0.7 - 0.0667),
        "site-2": pytest.approx(0.4 - 0.0667),
    }
    page = open(index, encoding="utf-8").read()
    assert "0.850" in page  # overall WT, three decimals
    assert "weakest region is the enhancing tumour" in page


def test_metrics_csv_has_rounds_sites_and_final(run_folder, tmp_path):
    write_report(load_run(str(run_folder)), str(tmp_path / "report"))
    with open(tmp_path / "report" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    keyed = {(r["round"], r["site"]): r for r in rows}
    assert set(keyed) == {(str(r), s) for r in range(3) for s in ("site-1", "site-2", "overall")}
    assert float(keyed[("1", "overall")]["dice_tc"]) == pytest.approx((0.4 * 3 + 0.5 * 1) / 4)
    assert keyed[("2", "site-2")]["source"] == "cross_site_eval"


def test_without_cross_site_eval_the_last_round_is_used_and_said(run_folder, tmp_path):
    os.remove(run_folder / "server" / "simulate_job" / "cross_site_val" / "cross_val_results.json")
    index = write_report(load_run(str(run_folder)), str(tmp_path / "report"))
    summary = json.load(open(tmp_path / "report" / "summary.json"))
    assert summary["final"]["source"] == "last_round_validation"
    assert summary["final"]["sites"]["site-2"]["dice_mean"] == pytest.approx(0.6 - 0.0667)
    assert "no cross-site evaluation" in open(index, encoding="utf-8").read()


def test_truncated_last_line_is_skipped_but_corruption_inside_is_an_error(run_folder):
    path = run_folder / "server" / "simulate_job" / "round_metrics.jsonl"
    text = path.read_text()
    path.write_text(text + '{"round": 2, "sit')
    assert len(load_run(str(run_folder)).rounds) == 2
    path.write_text('{"round": 0, "sit\n' + text)
    with pytest.raises(RunArtifactsError, match=r"round_metrics.jsonl:1: not a JSON record"):
        load_run(str(run_folder))


def test_a_folder_without_rounds_is_a_clear_error(tmp_path):
    with pytest.raises(RunArtifactsError, match="no round_metrics.jsonl"):
        load_run(str(tmp_path))


def test_overall_sd_equals_the_sd_over_all_cases_and_communication_adds_up(tmp_path):
    rng = np.random.default_rng(0)
    cases = {"site-1": rng.uniform(0.5, 0.9, 7), "site-2": rng.uniform(0.1, 0.6, 3)}

    def site(values):
        out = {}
        for key in ("dice_tc", "dice_wt", "dice_et", "dice_mean", "hd95_tc", "hd95_wt", "hd95_et"):
            out[key], out[f"{key}_sd"] = float(values.mean()), float(values.std())
        return {**out, "n_cases": len(values), "bytes_received_by_site": 2_000_000, "bytes_sent_by_site": 1_000_000}

    server = tmp_path / "run" / "server"
    os.makedirs(server)
    records = [
        {"round": 0, "algorithm": "fedavg", "sites": {s: site(v) for s, v in cases.items()}},
        {
            "round": 1,
            "algorithm": "fedavg",
            "sites": {"site-1": site(cases["site-1"])},
            "missing": ["site-2"],
            "rejected": {},
            "global_updated": True,
        },
    ]
    (server / "round_metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    write_report(load_run(str(tmp_path / "run")), str(tmp_path / "report"))
    summary = json.load(open(tmp_path / "report" / "summary.json"))
    everything = np.concatenate([cases["site-1"], cases["site-2"]])
    round0 = summary["curves"][0]
    assert round0["dice_wt"] == pytest.approx(everything.mean())
    assert round0["dice_wt_sd"] == pytest.approx(everything.std())
    assert summary["communication"]["mb_per_round"] == pytest.approx([6.0, 3.0])
    assert summary["communication"]["mb_total"] == pytest.approx(9.0)
    assert summary["events"] == [{"round": 1, "site": "site-2", "what": "no result (site missing)"}]
    page = open(tmp_path / "report" / "index.html", encoding="utf-8").read()
    assert "9.0 MB moved in total" in page and "round 1: site-2: no result" in page


def test_report_says_which_numbers_come_from_the_per_round_subset_and_which_from_every_case(run_folder, tmp_path):
    path = run_folder / "server" / "simulate_job" / "round_metrics.jsonl"
    records = [json.loads(line) for line in open(path)]
    for record in records:  # site-1 holds 40 validation cases and validates 8 of them each round
        record["sites"]["site-1"].update(n_cases=8, n_val_cases_site=40)
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in records) + "\n")
    index = write_report(load_run(str(run_folder)), str(tmp_path / "report"))
    summary = json.load(open(tmp_path / "report" / "summary.json"))
    assert summary["validation"] == {"site-1": {"per_round": 8, "of": 40}, "site-2": {"per_round": 1, "of": 1}}
    page = open(index, encoding="utf-8").read()
    assert "subset of its validation cases (site-1: 8 of 40)" in page
    assert "final table: every validation case of every site (cross-site evaluation)" in page
    os.remove(run_folder / "server" / "simulate_job" / "cross_site_val" / "cross_val_results.json")
    index = write_report(load_run(str(run_folder)), str(tmp_path / "report2"))
    assert "final table: the last round&#x27;s validation, on that subset." in open(index, encoding="utf-8").read()


@pytest.mark.parametrize(
    "info, sentence",
    [
        (
            {
                "status": "FINISHED:EXECUTION_EXCEPTION",
                "completed": False,
                "completed_rounds": 2,
                "planned_rounds": 5,
                "reason": "Alive clients 1 < required min 2",
                "settings": {"num_rounds": 5},
            },
            "Job status FINISHED:EXECUTION_EXCEPTION: NOT completed, 2 of 5 rounds; reason: Alive clients 1 &lt; required min 2.",
        ),
        (
            {
                "status": "FINISHED:COMPLETED",
                "completed": True,
                "completed_rounds": 2,
                "planned_rounds": 2,
                "reason": None,
            },
            "Job status FINISHED:COMPLETED: completed, 2 of 2 rounds.",
        ),
        (
            {"settings": {"num_rounds": 4}},
            "Job status not recorded: NOT completed, 2 of 4 rounds.",
        ),  # an older run.json
    ],
)
def test_the_report_says_first_how_the_job_ended(run_folder, tmp_path, info, sentence):
    (run_folder / "run.json").write_text(json.dumps(info))
    index = write_report(load_run(str(run_folder)), str(tmp_path / "report"))
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["job"]["completed"] is (sentence.count("NOT") == 0)
    assert summary["job"]["rounds_done"] == 2
    assert sentence in open(index, encoding="utf-8").read()


def test_pooled_sd_only_when_every_pooled_site_has_one():
    with_sd = {"dice_wt": 0.8, "dice_wt_sd": 0.1, "n_cases": 2}
    without_sd = {"dice_wt": 0.4, "n_cases": 2}  # e.g. cross-site scores, which carry no sd
    both = pooled({"site-1": with_sd, "site-2": without_sd})
    assert both["dice_wt"] == pytest.approx(0.6) and both["dice_wt_sd"] is None
    alone = pooled({"site-1": with_sd})
    assert alone["dice_wt"] == pytest.approx(0.8) and alone["dice_wt_sd"] == pytest.approx(0.1)
    nobody = pooled({"site-2": without_sd})
    assert nobody["dice_wt"] == pytest.approx(0.4) and nobody["dice_wt_sd"] is None


def test_pooled_leaves_out_sites_without_cases_or_without_the_score():
    sites = {
        "a": {"dice_tc": 0.2, "dice_tc_sd": 0.0, "hd95_tc": 5.0, "hd95_tc_sd": 1.0, "n_cases": 3},
        "b": {"dice_tc": 0.9, "n_cases": 0},  # no cases: no weight, and its missing sd does not count
        "c": {"dice_tc": float("nan"), "hd95_tc": 9.0, "hd95_tc_sd": 3.0, "n_cases": 1},  # NaN: not a score
        "d": {"dice_tc": None, "n_cases": "2"},
    }
    overall = pooled(sites)
    assert overall["dice_tc"] == pytest.approx(0.2) and overall["dice_tc_sd"] == pytest.approx(0.0)
    assert overall["hd95_tc"] == pytest.approx((5.0 * 3 + 9.0) / 4)
    # sd over the 4 cases from (n, mean, sd): E[x^2] - mean^2
    second_moment = (3 * (1.0 + 25.0) + 1 * (9.0 + 81.0)) / 4
    assert overall["hd95_tc_sd"] == pytest.approx(np.sqrt(second_moment - overall["hd95_tc"] ** 2))
    assert overall["dice_et"] is None and overall["dice_et_sd"] is None  # no site has it
    assert overall["n_cases"] == 6


def test_final_scores_without_cross_site_sd_show_none_in_the_report(run_folder, tmp_path):
    # the cross-site results of run_folder carry no sd: no "±" may appear for them or for the overall row
    index = write_report(load_run(str(run_folder)), str(tmp_path / "report"))
    summary = json.load(open(tmp_path / "report" / "summary.json"))
    assert summary["final"]["overall"]["dice_wt_sd"] is None
    assert all(s["dice_wt_sd"] is None for s in summary["final"]["sites"].values())
    assert "&plusmn;" not in open(index, encoding="utf-8").read()


def test_a_site_score_without_a_case_count_weighs_nothing(run_folder, tmp_path):
    path = run_folder / "server" / "simulate_job" / "cross_site_val" / "cross_val_results.json"
    cross = json.loads(path.read_text())
    del cross["site-2"]["SRV_FL_global_model.pt"]["n_cases"]
    path.write_text(json.dumps(cross))
    write_report(load_run(str(run_folder)), str(tmp_path / "report"))
    final = json.load(open(tmp_path / "report" / "summary.json"))["final"]
    assert final["sites"]["site-2"]["n_cases"] == 0
    assert final["overall"]["n_cases"] == 3 and final["overall"]["dice_wt"] == pytest.approx(0.9)


def test_a_run_whose_sites_shared_no_local_model_reports_the_global_model_only(run_folder, tmp_path):
    # today's runs: cross-site evaluation without submit_model, and round records without cache_mb or sd
    path = run_folder / "server" / "simulate_job" / "cross_site_val" / "cross_val_results.json"
    cross = json.loads(path.read_text())
    path.write_text(
        json.dumps({site: {"SRV_FL_global_model.pt": m["SRV_FL_global_model.pt"]} for site, m in cross.items()})
    )
    index = write_report(load_run(str(run_folder)), str(tmp_path / "report"))
    summary = json.load(open(tmp_path / "report" / "summary.json"))
    assert list(summary["cross_site"]) == ["SRV_FL_global_model.pt"]
    assert summary["final"]["overall"]["dice_wt"] == pytest.approx((0.9 * 3 + 0.7 * 1) / 4)  # unchanged
    assert "local models: not shared" in open(index, encoding="utf-8").read()
    with_local = write_report(load_run(str(run_folder)), str(tmp_path / "again"))
    assert "not shared" in open(with_local, encoding="utf-8").read()
    path.write_text(json.dumps(cross))
    assert "not shared" not in open(write_report(load_run(str(run_folder)), str(tmp_path / "shared"))).read()


def write_rounds(path, rounds, dice: float) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in rounds:
            f.write(json.dumps({"round": r, "algorithm": "fedref", "sites": {"site-1": scores(dice + 0.01 * r, 3)}}))
            f.write("\n")


def test_a_continued_run_is_reported_with_the_rounds_of_the_runs_it_continued(tmp_path):
    """A provisioned download of a job that continued job-b, which had continued job-a: the server copied each
    part's records below resumed_from/; a round both parts hold is the nearer part's."""
    server = tmp_path / "download" / "job-c" / "workspace"
    write_rounds(server / "round_metrics.jsonl", [5, 6], 0.7)
    write_rounds(server / "resumed_from" / "job-b" / "round_metrics.jsonl", [2, 3, 4], 0.5)
    write_rounds(server / "resumed_from" / "job-b" / "resumed_from" / "job-a" / "round_metrics.jsonl", [0, 1, 2], 0.3)
    # FLARE's MetricsArtifactWriter leaves a file of the same name in another format: not a part
    os.makedirs(server / "resumed_from" / "job-b" / "metrics")
    (server / "resumed_from" / "job-b" / "metrics" / "round_metrics.jsonl").write_text('{"round": 0}\n')
    for folder in (server, server / "resumed_from" / "job-b"):
        os.makedirs(folder / "app_server")
        (folder / "app_server" / "FL_global_model.pt").write_bytes(b"")

    run = load_run(str(tmp_path / "download" / "job-c"))
    assert run.server_dir == str(server)  # the run's own records: the shortest path outside resumed_from/
    assert run.global_model == str(server / "app_server" / "FL_global_model.pt")
    assert [(r["round"], r.get("resumed_from")) for r in run.rounds] == [
        (0, "job-a"),
        (1, "job-a"),
        (2, "job-b"),
        (3, "job-b"),
        (4, "job-b"),
        (5, None),
        (6, None),
    ]
    assert run.rounds[2]["sites"]["site-1"]["dice_tc"] == pytest.approx(0.5 + 0.02 - 0.1)  # job-b's round 2

    index = write_report(run, str(tmp_path / "report"))
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["rounds"] == 7 and [c["round"] for c in summary["curves"]] == list(range(7))
    assert summary["parts"] == [
        {"job": "job-a", "first_round": 0, "last_round": 1},
        {"job": "job-b", "first_round": 2, "last_round": 4},
        {"job": None, "first_round": 5, "last_round": 6},
    ]
    note = "Rounds 0-1 from job job-a, rounds 2-4 from job job-b, continued as this job from round 5."
    assert note in open(index, encoding="utf-8").read()


def test_a_run_in_one_part_says_nothing_of_parts(run_folder, tmp_path):
    index = write_report(load_run(str(run_folder)), str(tmp_path / "report"))
    assert "continued as this job" not in open(index, encoding="utf-8").read()
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["parts"] == [
        {"job": None, "first_round": 0, "last_round": 1}
    ]


def test_only_copies_of_earlier_runs_are_not_the_runs_own_records(tmp_path):
    write_rounds(tmp_path / "run" / "resumed_from" / "job-b" / "round_metrics.jsonl", [0, 1], 0.5)
    with pytest.raises(RunArtifactsError, match="no round_metrics.jsonl below it"):
        load_run(str(tmp_path / "run"))
    assert [r["round"] for r in load_run(str(tmp_path / "run" / "resumed_from" / "job-b")).rounds] == [0, 1]


def test_an_overlay_is_copied_beside_the_page_and_shown_just_before_the_settings(run_folder, tmp_path):
    import base64

    picture = tmp_path / "FeTS2022_00002_overlay.png"
    picture.write_bytes(b"\x89PNG not really")
    index = write_report(load_run(str(run_folder)), str(tmp_path / "report"), overlay=str(picture))
    assert (tmp_path / "report" / picture.name).read_bytes() == picture.read_bytes()
    page = open(index, encoding="utf-8").read()
    section = (
        "<h2>A validation case segmented by the final model</h2><p>FeTS2022_00002_overlay.png: "
        "red necrotic core, green oedema, yellow enhancing tumour.</p>"
        f'<img alt="segmentation overlay" src="data:image/png;base64,{base64.b64encode(picture.read_bytes()).decode()}">'
    )
    assert page.count(section + "<h2>Settings</h2>") == 1
    without = open(write_report(load_run(str(run_folder)), str(tmp_path / "plain")), encoding="utf-8").read()
    assert "segmented by the final model" not in without and "\n<h2>Settings</h2>" in without
