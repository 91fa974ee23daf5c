//! A few seconds of every fuzz target (issue 18), so a regression in a parser of untrusted data
//! surfaces in CI. The long campaigns are run with `examples/fuzz.rs` (docs/robustness.md).

use std::time::Duration;

use xllm::fuzz::{campaign, seeds, Settings, TARGETS};

#[test]
fn every_target_survives_a_short_campaign() {
    let out = tempfile::tempdir().unwrap();
    // XLLM_FUZZ_SECONDS lengthens the run per target (default 2 s).
    let seconds: f64 = std::env::var("XLLM_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let settings = Settings {
        iterations: u64::MAX,
        time_limit: Some(Duration::from_secs_f64(seconds)),
        seed: 7,
        max_len: 1 << 20,
        out_dir: out.path().to_path_buf(),
        hang_after: Duration::from_secs(60),
    };
    let mut problems = Vec::new();
    for t in TARGETS {
        let seeds = seeds(t.name);
        // Every seed must be accepted: a target that rejects its seeds fuzzes nothing.
        for (i, s) in seeds.iter().enumerate() {
            assert!((t.run)(s), "target {} rejects its seed {i}", t.name);
        }
        let report = campaign(t, seeds, &settings).unwrap();
        eprintln!(
            "{}: {} executions, {} accepted, {} crashes",
            t.name,
            report.executions,
            report.accepted,
            report.crashes.len()
        );
        assert!(report.executions > 0);
        for (path, message) in report.crashes {
            let input = std::fs::read(&path).unwrap();
            problems.push(format!(
                "{}: {message}; input ({} bytes): {:?}",
                t.name,
                input.len(),
                String::from_utf8_lossy(&input[..input.len().min(400)])
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
