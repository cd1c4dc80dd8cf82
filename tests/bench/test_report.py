"""The report's ratios and target verdicts."""
from bench.parts import Result
from bench import report


def test_ratio_says_how_many_times_better_imd_is():
    assert report.ratio(500, 1000, "lower") == 2.0
    assert report.ratio(300, 100, "higher") == 3.0
    assert report.ratio(None, 100, "higher") is None


def test_table_matches_peers_with_the_same_protocol():
    rs = [Result("idle", "server RSS per idle connection", "imd tcp", 900, "B", "lower"),
          Result("idle", "server RSS per idle connection", "imd sse", 800, "B", "lower"),
          Result("idle", "server RSS per idle connection", "nchan sse", 8000, "B", "lower"),
          Result("idle", "server RSS per idle connection", "mosquitto", 900, "B", "lower")]
    rows = {r[2]: r[4] for r in report.table_rows(rs)}
    assert rows["nchan sse"] == "10.00x vs imd sse"
    assert rows["mosquitto"] == "1.00x vs imd tcp"


def test_target_verdicts():
    rs = [Result("fanout", "deliveries per server CPU-second (10 subs)", "imd sse", 150_000, "/CPU-s", "higher"),
          Result("fanout", "deliveries per server CPU-second (10 subs)", "nchan sse", 100_000, "/CPU-s", "higher"),
          Result("logins", "logins per second (wall)", "imd tcp", 5000, "/s", "higher")]
    verdicts = {t: v for t, m, v in report.target_rows(rs)}
    assert verdicts["imd sse deliveries per server CPU-second >= 2x nchan sse"] == "missed by 1.33x"
    assert verdicts["imd tcp deliveries per server CPU-second >= 2x nchan sse"] == "not measured"
    assert verdicts["imd tcp logins per second (wall) >= 10,000/s"] == "missed by 2.00x"


def test_results_json_roundtrip(tmp_path):
    rs = [Result("idle", "server RSS per idle connection", "imd tcp", 900.5, "B", "lower",
                 note="n", series=[(0, 0.0), (100, 1.5)])]
    runs = [report.run_record("python bench/run.py idle", ["idle"], "a", "b", ["/usr/bin/python3"])]
    path = tmp_path / "b.json"
    report.save_json(path, runs, rs)
    got_runs, got = report.load_json(path)
    assert got == rs and got_runs[0]["parts"] == ["idle"]


def test_postgresql_chat_targets_of_issue_5():
    rs = [Result("chat-pg", "acked messages per second (closed loop)", "imd tcp postgresql", 15_000,
                 "/s", "higher"),
          Result("chat-pg", "ack latency p99 at half that rate", "imd tcp postgresql", 40.0, "ms",
                 "lower")]
    verdicts = {t: v for t, m, v in report.target_rows(rs)}
    assert verdicts["imd tcp postgresql acked messages per second >= 30,000/s"] == "missed by 2.00x"
    assert verdicts["imd tcp postgresql ack latency p99 <= 50.0 ms"] == "met"
