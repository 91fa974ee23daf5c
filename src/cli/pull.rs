//! `xllm pull`: downloads with indicatif bars on a terminal, one line per file otherwise.

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::PullArgs;
use crate::hub::download::{FileProgress, Progress};
use crate::store::{human_bytes, pull, Store};

pub fn run(args: PullArgs) -> anyhow::Result<()> {
    let store = Store::open_default()?;
    let progress = TerminalProgress {
        tty: std::io::stderr().is_terminal(),
    };
    let started = Instant::now();
    let report = pull::pull(&store, &args.model, &args.revision, &progress)?;
    let short = &report.commit[..report.commit.len().min(12)];
    let variant = report
        .gguf_type
        .as_deref()
        .map(|t| format!(" ({t})"))
        .unwrap_or_default();
    if report.up_to_date {
        println!(
            "{}{variant} is up to date at {short} ({})",
            report.name,
            human_bytes(report.total_size)
        );
    } else {
        let reused = if report.reused > 0 {
            format!(
                ", {} reused from the Hugging Face cache",
                human_bytes(report.reused)
            )
        } else {
            String::new()
        };
        println!(
            "pulled {}{variant} at {short}: {} file{}, {} ({} downloaded{reused}) in {:.1}s",
            report.name,
            report.files,
            if report.files == 1 { "" } else { "s" },
            human_bytes(report.total_size),
            human_bytes(report.downloaded),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Bars on a terminal; a line per finished file when stderr is not one.
struct TerminalProgress {
    tty: bool,
}

impl Progress for TerminalProgress {
    fn start_file(&self, path: &str, total: Option<u64>, done: u64) -> Box<dyn FileProgress> {
        let bar = if self.tty {
            let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "pulling {msg:30!} {percent:>3}% ▕{bar:25}▏ {decimal_bytes}/{decimal_total_bytes} {decimal_bytes_per_sec:>10} {eta:>4}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("██ ");
            bar.set_style(style);
            bar.set_message(path.to_string());
            bar.set_position(done);
            bar.reset_eta();
            Some(bar)
        } else {
            None
        };
        Box::new(FileBar {
            bar,
            path: path.to_string(),
            total,
        })
    }

    fn note(&self, message: &str) {
        eprintln!("{message}");
    }
}

struct FileBar {
    bar: Option<ProgressBar>,
    path: String,
    total: Option<u64>,
}

impl FileProgress for FileBar {
    fn advance(&self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc(bytes);
        }
    }

    fn restart(&self) {
        if let Some(b) = &self.bar {
            b.set_position(0);
        }
    }

    fn finish(&self) {
        match &self.bar {
            Some(b) => b.finish(),
            None => eprintln!(
                "pulled {} ({})",
                self.path,
                self.total
                    .map(human_bytes)
                    .unwrap_or_else(|| "size unknown".into())
            ),
        }
    }
}
