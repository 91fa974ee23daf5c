//! `xllm serve`: turns the flags into [`ServerOptions`] and runs the server (src/server).

use std::time::Duration;

use super::ServeArgs;
use crate::server::registry::{Alias, KeepAlive, RegistryOptions};
use crate::server::{serve, ServerOptions};

/// `8MB`, `512MiB`, `2G`, `1000` (bytes).
fn parse_size(text: &str, flag: &str) -> anyhow::Result<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number.parse().map_err(|_| {
        anyhow::anyhow!("{flag} '{text}' is not a size (examples: 8MB, 512MiB, 16GB)")
    })?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024f64.powi(4),
        _ => anyhow::bail!(
            "{flag} '{text}': unknown unit '{unit}' (use B, KB, MB, GB, KiB, MiB, GiB)"
        ),
    };
    Ok((value * scale) as u64)
}

fn parse_keep_alive(text: &str, flag: &str) -> anyhow::Result<KeepAlive> {
    KeepAlive::parse(&serde_json::Value::String(text.to_string()))
        .map_err(|e| anyhow::anyhow!("{flag}: {e}"))
}

/// `host`, or `host:port` / `http://host:port` as `XLLM_HOST` may give it (like `OLLAMA_HOST`).
fn host_and_port(host: &str, port: u16) -> (String, u16) {
    let h = host
        .trim()
        .trim_start_matches("http://")
        .trim_end_matches('/');
    if let Some((name, p)) = h.rsplit_once(':') {
        // Not an IPv6 literal without brackets.
        if !name.contains(':') {
            if let Ok(p) = p.parse() {
                return (name.to_string(), p);
            }
        }
    }
    (h.to_string(), port)
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let models = args
        .models
        .iter()
        .map(|m| Alias::parse(m))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut names = std::collections::HashSet::new();
    for m in &models {
        if !names.insert(m.name.clone()) {
            anyhow::bail!(
                "--model: two models are named '{}'; name them with NAME=PATH",
                m.name
            );
        }
    }
    if args.parallel == 0 {
        anyhow::bail!("--parallel must be at least 1");
    }
    if args.runtime.threads == Some(0) {
        anyhow::bail!("--threads must be at least 1");
    }
    let keep_alive = parse_keep_alive(&args.keep_alive, "--keep-alive")?;
    let shutdown_timeout = match parse_keep_alive(&args.shutdown_timeout, "--shutdown-timeout")? {
        KeepAlive::For(d) => d,
        KeepAlive::Forever => Duration::from_secs(u64::MAX / 4),
    };
    let body_limit = parse_size(&args.body_limit, "--body-limit")?;
    let memory_limit = args
        .memory_limit
        .as_deref()
        .map(|m| parse_size(m, "--memory-limit"))
        .transpose()?;
    let api_key = args.api_key.filter(|k| !k.is_empty());
    let (host, port) = host_and_port(&args.host, args.port);
    serve(ServerOptions {
        host,
        port,
        api_key,
        models,
        registry: RegistryOptions {
            device: args.runtime.device,
            ctx: args.runtime.ctx,
            threads: args.runtime.threads,
            parallel: args.parallel,
            max_waiting: args.max_queue,
            max_models: args.max_models.max(1),
            memory_limit,
            keep_alive,
        },
        cors_origins: args.cors_origins,
        body_limit: body_limit.min(usize::MAX as u64) as usize,
        preload: args.preload,
        shutdown_timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_hosts() {
        assert_eq!(parse_size("8MB", "x").unwrap(), 8_000_000);
        assert_eq!(parse_size("1MiB", "x").unwrap(), 1_048_576);
        assert_eq!(parse_size("1.5 GB", "x").unwrap(), 1_500_000_000);
        assert_eq!(parse_size("100", "x").unwrap(), 100);
        assert!(parse_size("lots", "x").is_err());
        assert!(parse_size("5 parsecs", "x").is_err());
        assert_eq!(host_and_port("127.0.0.1", 1), ("127.0.0.1".into(), 1));
        assert_eq!(host_and_port("0.0.0.0:8080", 1), ("0.0.0.0".into(), 8080));
        assert_eq!(
            host_and_port("http://localhost:9/", 1),
            ("localhost".into(), 9)
        );
        assert_eq!(host_and_port("::1", 1), ("::1".into(), 1));
    }
}
