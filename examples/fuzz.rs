//! Fuzz campaigns on stable Rust (see `xllm::fuzz` and docs/robustness.md).
//!
//!     cargo run --release --example fuzz -- list
//!     cargo run --release --example fuzz -- run gguf --iterations 1000000 [--seconds S] [--seed N]
//!     cargo run --release --example fuzz -- all --iterations 1000000
//!     cargo run --release --example fuzz -- replay gguf fuzz-out/gguf-crash-0123abcd
//!
//! Crashing inputs and each target's current input (`<target>.current`, left behind by an abort
//! or a hang) go to `fuzz-out/` (or `--out DIR`).

use std::path::PathBuf;
use std::time::Duration;

use xllm::fuzz::{campaign, read_current, seeds, target, Settings, TARGETS};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| -> Option<&str> {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(String::as_str)
    };
    let settings = Settings {
        iterations: flag("--iterations").map_or(Ok(u64::MAX), str::parse)?,
        time_limit: flag("--seconds")
            .map(str::parse::<f64>)
            .transpose()?
            .map(Duration::from_secs_f64),
        seed: flag("--seed").map_or(Ok(1), str::parse)?,
        max_len: flag("--max-len").map_or(Ok(1 << 20), str::parse)?,
        out_dir: PathBuf::from(flag("--out").unwrap_or("fuzz-out")),
        hang_after: Duration::from_secs(flag("--hang-secs").map_or(Ok(60), str::parse)?),
    };
    let names: Vec<&str> = match args.first().map(String::as_str) {
        Some("list") | None => {
            for t in TARGETS {
                println!("{}", t.name);
            }
            return Ok(());
        }
        Some("replay") => {
            let t = target(args.get(1).map_or("", String::as_str))
                .ok_or_else(|| anyhow::anyhow!("unknown target"))?;
            let path = PathBuf::from(
                args.get(2)
                    .ok_or_else(|| anyhow::anyhow!("no input file"))?,
            );
            let input = if path.extension().is_some_and(|e| e == "current") {
                read_current(&path)?
            } else {
                std::fs::read(&path)?
            };
            println!("accepted: {}", (t.run)(&input));
            return Ok(());
        }
        Some("all") => TARGETS.iter().map(|t| t.name).collect(),
        Some("run") => vec![args.get(1).map_or("", String::as_str)],
        Some(other) => anyhow::bail!("unknown command '{other}' (list, run, all, replay)"),
    };
    let mut failed = false;
    for name in names {
        let t = target(name).ok_or_else(|| anyhow::anyhow!("unknown target '{name}'"))?;
        let report = campaign(t, seeds(name), &settings)?;
        println!(
            "{name}: {} executions ({} accepted) in {:.1} s, {:.0}/s, {} crashes",
            report.executions,
            report.accepted,
            report.seconds,
            report.executions as f64 / report.seconds.max(1e-9),
            report.crashes.len()
        );
        for (path, message) in &report.crashes {
            println!("  crash: {} ({message})", path.display());
            failed = true;
        }
    }
    if failed {
        std::process::exit(1);
    }
    Ok(())
}
