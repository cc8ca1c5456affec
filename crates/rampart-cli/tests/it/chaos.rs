//! The CI fault campaign: `rampart chaos` with every fault type, judged by the checkers.
//! RAMPART_CHAOS_SECONDS sets its length (300 by default, as CI runs it); RAMPART_CHAOS_SEED
//! picks the schedule (11 by default; `random` for a new one each run).

use std::process::Command;

use crate::harness::RAMPART;

#[test]
fn chaos_campaign_with_every_fault_finds_no_anomaly() {
    let seconds = std::env::var("RAMPART_CHAOS_SECONDS").unwrap_or_else(|_| "300".into());
    // CI replays one known schedule so a red build means a regression; RAMPART_CHAOS_SEED=random
    // (or any number) explores others, as longer campaigns do.
    let seed = match std::env::var("RAMPART_CHAOS_SEED").as_deref() {
        Ok("random") => (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() % 100_000).to_string(),
        Ok(s) => s.to_string(),
        Err(_) => "11".to_string(),
    };
    eprintln!("chaos campaign: {seconds} s, seed {seed} (replay with RAMPART_CHAOS_SEED={seed})");
    let history = tempfile::NamedTempFile::new().unwrap();
    let out = Command::new(RAMPART)
        .args(["chaos", "--duration", &seconds, "--faults", "all", "--seed", &seed])
        .arg("--history-out")
        .arg(history.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    let last = stdout.lines().last().unwrap_or_default();
    let report: serde_json::Value = serde_json::from_str(last).unwrap_or_else(|e| panic!("no JSON report ({e}):\n{stdout}\n{stderr}"));
    assert_eq!(report["anomalies"], 0, "{stdout}\n{stderr}");
    assert_eq!(report["lost_acked_writes"], 0, "{stdout}");
    assert_eq!(report["inconclusive"], false, "the checker could not decide: {stdout}");
    // Every fault type ran at least once (there are 11).
    assert!(report["faults"].as_u64().unwrap() >= 11, "{stdout}");
    for kind in [
        "kill-leader", "kill-follower", "kill-all", "pause-leader", "pause-follower", "partition-leader",
        "split-minority-leader", "one-way-leader-out", "restart-leader", "disk-full-follower", "replace-follower",
    ] {
        assert!(stdout.contains(kind), "fault {kind} never ran:\n{stdout}");
    }
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(report["operations"].as_u64().unwrap() > 100, "{stdout}");
}
