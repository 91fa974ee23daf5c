//! `xllm list`: a table for people, `--json` for scripts. Partial pulls are listed as such, with
//! the command that resumes them, never as ready.

use std::time::SystemTime;

use comfy_table::{presets::NOTHING, Table};
use serde::Serialize;

use super::output::print_stdout;
use super::ListArgs;
use crate::store::resolve::format_name;
use crate::store::{human_bytes, EntryState, Store, StoreEntry};

/// One row of `xllm list --json`; a stable interface for scripts.
#[derive(Debug, Serialize)]
pub struct ListItem {
    pub name: String,
    /// `ready` or `partial`.
    pub status: &'static str,
    pub format: Option<String>,
    pub architecture: Option<String>,
    pub parameters: Option<u64>,
    pub quantization: Option<String>,
    pub kv_profiles: Vec<String>,
    /// Bytes on disk (downloaded so far for partial pulls).
    pub size: u64,
    /// RFC 3339.
    pub modified: String,
    pub path: String,
    pub commit: Option<String>,
    /// How to finish a partial pull.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume: Option<String>,
}

pub fn run(args: ListArgs) -> anyhow::Result<()> {
    let store = Store::open_default()?;
    let entries = store.entries()?;
    let items: Vec<ListItem> = entries.iter().map(item).collect();
    if args.json {
        return print_stdout(&format!("{}\n", serde_json::to_string_pretty(&items)?));
    }
    if items.is_empty() {
        return print_stdout(&format!(
            "No models in {} yet. Download one with `xllm pull <org/name>`, e.g. `xllm pull HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:Q4_K_M`.\n",
            store.root().display()
        ));
    }
    let mut table = Table::new();
    table.load_preset(NOTHING);
    table.set_header([
        "NAME",
        "FORMAT",
        "ARCH",
        "PARAMS",
        "QUANT",
        "KV PROFILES",
        "SIZE",
        "MODIFIED",
    ]);
    let now = SystemTime::now();
    for (it, entry) in items.iter().zip(&entries) {
        let dash = || "-".to_string();
        let name = if it.status == "ready" {
            it.name.clone()
        } else {
            format!("{} (partial)", it.name)
        };
        table.add_row([
            name,
            it.format.clone().unwrap_or_else(dash),
            it.architecture.clone().unwrap_or_else(dash),
            it.parameters.map(human_params).unwrap_or_else(dash),
            it.quantization.clone().unwrap_or_else(dash),
            if it.kv_profiles.is_empty() {
                dash()
            } else {
                it.kv_profiles.join(",")
            },
            human_bytes(it.size),
            relative_time(now, entry.modified),
        ]);
    }
    let mut text = String::new();
    let rendered = table.to_string();
    // The preset has no borders but keeps cell padding: drop the indent all lines share.
    let indent = rendered
        .lines()
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    for line in rendered.lines() {
        text.push_str(line[indent..].trim_end());
        text.push('\n');
    }
    for it in items.iter().filter(|i| i.status == "partial") {
        text.push_str(&format!(
            "\n{} is not complete; resume with `{}`\n",
            it.name,
            it.resume.as_deref().unwrap_or("")
        ));
    }
    print_stdout(&text)
}

fn item(entry: &StoreEntry) -> ListItem {
    let modified = chrono::DateTime::<chrono::Utc>::from(entry.modified)
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let path = entry.dir.display().to_string();
    match &entry.state {
        EntryState::Ready(m) => ListItem {
            name: entry.name.clone(),
            status: "ready",
            format: Some(format_name(m.format).to_string()),
            architecture: m.metadata.architecture.clone(),
            parameters: m.metadata.parameters,
            quantization: Some(if m.gguf_variants.len() > 1 {
                m.gguf_variants
                    .iter()
                    .map(|v| v.quantization.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            } else {
                m.metadata.quantization.clone()
            }),
            kv_profiles: m
                .metadata
                .kv_profiles
                .iter()
                .map(|p| p.token().to_string())
                .collect(),
            size: m.total_size(),
            modified,
            path,
            commit: Some(m.source.commit.clone()),
            resume: None,
        },
        EntryState::Partial {
            revision,
            downloaded_bytes,
        } => {
            let rev = revision.as_deref().filter(|r| *r != "main");
            let resume = match rev {
                Some(r) => format!("xllm pull {} --revision {r}", entry.name),
                None => format!("xllm pull {}", entry.name),
            };
            ListItem {
                name: entry.name.clone(),
                status: "partial",
                format: None,
                architecture: None,
                parameters: None,
                quantization: None,
                kv_profiles: Vec::new(),
                size: *downloaded_bytes,
                modified,
                path,
                commit: None,
                resume: Some(resume),
            }
        }
    }
}

/// Parameter counts the way model cards write them: `20.9B`, `135M`.
pub fn human_params(n: u64) -> String {
    let v = n as f64;
    let (scaled, unit) = if v >= 1e9 {
        (v / 1e9, "B")
    } else if v >= 1e6 {
        (v / 1e6, "M")
    } else if v >= 1e3 {
        (v / 1e3, "K")
    } else {
        return n.to_string();
    };
    if unit == "B" || scaled < 10.0 {
        format!("{scaled:.1}{unit}")
    } else {
        format!("{scaled:.0}{unit}")
    }
}

/// `just now`, `5 minutes ago`, `2 weeks ago`...
pub fn relative_time(now: SystemTime, then: SystemTime) -> String {
    let secs = now.duration_since(then).map(|d| d.as_secs()).unwrap_or(0);
    let (n, unit) = match secs {
        0..=59 => return "just now".to_string(),
        60..=3599 => (secs / 60, "minute"),
        3600..=86_399 => (secs / 3600, "hour"),
        86_400..=604_799 => (secs / 86_400, "day"),
        604_800..=2_629_799 => (secs / 604_800, "week"),
        2_629_800..=31_557_599 => (secs / 2_629_800, "month"),
        _ => (secs / 31_557_600, "year"),
    };
    format!("{n} {unit}{} ago", if n == 1 { "" } else { "s" })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_params_and_times() {
        assert_eq!(human_params(20_914_757_184), "20.9B");
        assert_eq!(human_params(134_515_008), "135M");
        assert_eq!(human_params(1_500_064), "1.5M");
        assert_eq!(human_params(32_832), "33K");
        let now = SystemTime::now();
        assert_eq!(relative_time(now, now), "just now");
        assert_eq!(
            relative_time(now, now - Duration::from_secs(120)),
            "2 minutes ago"
        );
        assert_eq!(
            relative_time(now, now - Duration::from_secs(3600)),
            "1 hour ago"
        );
        assert_eq!(
            relative_time(now, now - Duration::from_secs(15 * 86_400)),
            "2 weeks ago"
        );
    }
}
