//! Starts the real `xllm serve` binary on a free port (it logs the address it bound) against a
//! temporary store, and talks to it over HTTP.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

pub fn smollm2_gguf() -> Option<PathBuf> {
    std::fs::read_dir(root().join("models/smollm2"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "gguf"))
}

pub struct Server {
    child: Option<Child>,
    pub base: String,
    pub logs: Arc<Mutex<Vec<String>>>,
    pub home: tempfile::TempDir,
    pub client: reqwest::blocking::Client,
    pub api_key: Option<String>,
}

pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("not JSON ({e}), status {}: {}", self.status, self.text))
    }
}

impl Server {
    /// `xllm serve --host 127.0.0.1 --port 0 ARGS…` with a fresh XLLM_HOME.
    pub fn start(args: &[&str]) -> Server {
        Self::start_with(args, &[], None)
    }

    pub fn start_with(
        args: &[&str],
        env: &[(&str, &str)],
        home: Option<tempfile::TempDir>,
    ) -> Server {
        let home = home.unwrap_or_else(|| tempfile::tempdir().unwrap());
        let bin =
            std::env::var_os("XLLM_TEST_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_xllm").into());
        let mut cmd = Command::new(bin);
        cmd.args(["serve", "--host", "127.0.0.1", "--port", "0"])
            .args(args)
            .env("XLLM_HOME", home.path().join("xllm"))
            .env("HF_HOME", home.path().join("hf"))
            .env("RAYON_NUM_THREADS", "2")
            .env_remove("XLLM_API_KEY")
            .env_remove("XLLM_HOST")
            .env_remove("XLLM_PORT")
            .env_remove("HF_TOKEN")
            .env_remove("HF_HUB_OFFLINE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("xllm serve starts");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        if v["msg"] == "listening" {
                            let _ = tx.send(v["address"].as_str().unwrap_or_default().to_string());
                        }
                    }
                    logs.lock().unwrap().push(line);
                }
            });
        }
        let base = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => a,
            Err(_) => {
                let status = child.try_wait().ok().flatten();
                let _ = child.kill();
                panic!(
                    "xllm serve did not start (exit {status:?}): {}",
                    logs.lock().unwrap().join("\n")
                );
            }
        };
        let api_key = args
            .iter()
            .position(|a| *a == "--api-key")
            .map(|i| args[i + 1].to_string());
        let server = Server {
            child: Some(child),
            base,
            logs,
            home,
            client: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(300))
                .build()
                .unwrap(),
            api_key,
        };
        let t0 = Instant::now();
        loop {
            if let Ok(r) = server.client.get(server.url("/health")).send() {
                if r.status().as_u16() == 200 {
                    break;
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "never became ready: {}",
                server.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn log_text(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    fn auth(&self, rb: reqwest::blocking::RequestBuilder) -> reqwest::blocking::RequestBuilder {
        match &self.api_key {
            Some(k) => rb.bearer_auth(k),
            None => rb,
        }
    }

    fn reply(r: reqwest::blocking::Response) -> Reply {
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().unwrap_or_default();
        Reply {
            status,
            headers,
            text,
        }
    }

    pub fn get(&self, path: &str) -> Reply {
        Self::reply(self.auth(self.client.get(self.url(path))).send().unwrap())
    }

    pub fn post(&self, path: &str, body: &Value) -> Reply {
        Self::reply(
            self.auth(self.client.post(self.url(path)))
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .unwrap(),
        )
    }

    pub fn post_raw(&self, path: &str, body: Vec<u8>) -> Reply {
        Self::reply(
            self.auth(self.client.post(self.url(path)))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .unwrap(),
        )
    }

    /// POSTs and returns the raw streamed lines (SSE `data:` payloads or NDJSON lines).
    pub fn stream_lines(&self, path: &str, body: &Value) -> (u16, Vec<String>) {
        let r = self
            .auth(self.client.post(self.url(path)))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .unwrap();
        let status = r.status().as_u16();
        let mut lines = Vec::new();
        for line in BufReader::new(r).lines() {
            let line = line.unwrap();
            if !line.is_empty() {
                lines.push(line);
            }
        }
        (status, lines)
    }

    /// The SSE payloads of a streamed OpenAI request (comments skipped), `[DONE]` included.
    pub fn sse(&self, path: &str, body: &Value) -> Vec<String> {
        let (status, lines) = self.stream_lines(path, body);
        assert_eq!(status, 200, "{lines:?}");
        lines
            .into_iter()
            .filter(|l| !l.starts_with(':'))
            .map(|l| {
                l.strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("not an SSE data line: {l:?}"))
                    .to_string()
            })
            .collect()
    }

    /// A metric's value for `model_name`, from /metrics.
    pub fn metric(&self, name: &str, model: &str) -> Option<f64> {
        let text = self.get("/metrics").text;
        let prefix = format!("{name}{{model_name=\"{model}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
    }

    pub fn metric_plain(&self, name: &str) -> Option<f64> {
        let text = self.get("/metrics").text;
        let prefix = format!("{name} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let t0 = Instant::now();
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                panic!("xllm serve did not exit after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Reads a streamed reply for at most `n` lines, then drops the connection.
pub fn read_then_drop(r: reqwest::blocking::Response, n: usize) -> usize {
    let mut reader = BufReader::new(r);
    let mut seen = 0;
    let mut line = String::new();
    while seen < n {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                if !line.trim().is_empty() {
                    seen += 1;
                }
            }
        }
    }
    drop(reader);
    seen
}

/// Drains a reader to the end.
pub fn drain(mut r: impl Read) -> String {
    let mut s = String::new();
    let _ = r.read_to_string(&mut s);
    s
}

pub fn path_str(p: &Path) -> String {
    p.display().to_string()
}
