//! A local stand-in for the Hugging Face Hub, on plain std::net threads. Two origins like the real
//! thing: the API/`resolve` origin, and a "CDN" on another port that LFS files redirect to. It
//! speaks `/api/models/{repo}/revision/{rev}?blobs=true`, `/{repo}/resolve/{rev}/{path}` (302 with
//! X-Repo-Commit / X-Linked-Etag / X-Linked-Size for LFS files), Range, and 401/404 with
//! X-Error-Code; and it can misbehave on demand (cut connections, ignore Range, corrupt bytes).

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};

pub const GOOD_TOKEN: &str = "hf_good_token";

#[derive(Clone)]
pub struct RepoFile {
    pub path: String,
    pub data: Vec<u8>,
    pub lfs: bool,
}

impl RepoFile {
    pub fn sha256(&self) -> String {
        hex::encode(Sha256::digest(&self.data))
    }
}

#[derive(Clone, Default)]
pub struct Repo {
    pub commit: String,
    pub files: Vec<RepoFile>,
    pub gated: bool,
    /// Names listed in the repo info without content (e.g. hostile paths).
    pub extra_listed: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Logged {
    /// "api" or "cdn".
    pub origin: &'static str,
    pub path: String,
    pub range: Option<String>,
    pub authorization: Option<String>,
    pub status: u16,
    pub body_bytes: u64,
}

#[derive(Default)]
pub struct Behaviour {
    /// Close file bodies once this absolute offset is reached (Content-Length still says full).
    pub cut_at: Option<u64>,
    pub ignore_range: bool,
    /// Paths whose bytes are served with one byte flipped.
    pub corrupt: Vec<String>,
    /// Sleep per 64 KiB chunk of file bodies.
    pub chunk_delay: Option<Duration>,
    /// Repo info without sizes or LFS metadata, as if `?blobs=true` were not honoured.
    pub bare_listing: bool,
    /// Only `/api/models/{repo}` exists (no `/revision/{rev}` route).
    pub no_revision_route: bool,
}

#[derive(Default)]
struct State {
    repos: HashMap<String, Repo>,
    log: Vec<Logged>,
    behaviour: Behaviour,
    /// Requests answered but not yet logged: `log`/`clear_log` wait for them, so a test never
    /// sees (or clears) a log that a finished client's last request has not reached yet.
    unlogged: usize,
}

pub struct MockHub {
    pub url: String,
    pub cdn_url: String,
    state: Arc<Mutex<State>>,
}

impl MockHub {
    pub fn start() -> MockHub {
        let api = TcpListener::bind("127.0.0.1:0").unwrap();
        let cdn = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", api.local_addr().unwrap());
        let cdn_url = format!("http://localhost:{}", cdn.local_addr().unwrap().port());
        let state = Arc::new(Mutex::new(State::default()));
        for (listener, origin) in [(api, "api"), (cdn, "cdn")] {
            let state = state.clone();
            let cdn_url = cdn_url.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    let state = state.clone();
                    let cdn_url = cdn_url.clone();
                    std::thread::spawn(move || {
                        let _ = handle(stream, origin, &state, &cdn_url);
                    });
                }
            });
        }
        MockHub {
            url,
            cdn_url,
            state,
        }
    }

    pub fn add_repo(&self, name: &str, repo: Repo) {
        self.state
            .lock()
            .unwrap()
            .repos
            .insert(name.to_string(), repo);
    }

    pub fn set_behaviour(&self, b: Behaviour) {
        self.state.lock().unwrap().behaviour = b;
    }

    pub fn log(&self) -> Vec<Logged> {
        self.settled().log.clone()
    }

    pub fn clear_log(&self) {
        self.settled().log.clear();
    }

    /// The state once every answered request is logged.
    fn settled(&self) -> std::sync::MutexGuard<'_, State> {
        loop {
            let s = self.state.lock().unwrap();
            if s.unlogged == 0 {
                return s;
            }
            drop(s);
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

struct Request {
    path: String,
    query: String,
    headers: HashMap<String, String>,
}

fn read_request(stream: &TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let _method = parts.next()?;
    let target = parts.next()?.to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (target, String::new()),
    };
    Some(Request {
        path: percent_decode(&path),
        query,
        headers,
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).to_string()
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Absolute offset of `body[0]` within the file (for cut_at).
    file_offset: Option<u64>,
    declared_len: Option<u64>,
}

impl Reply {
    fn new(status: u16) -> Reply {
        Reply {
            status,
            headers: vec![],
            body: vec![],
            file_offset: None,
            declared_len: None,
        }
    }
    fn header(mut self, k: &str, v: impl Into<String>) -> Reply {
        self.headers.push((k.to_string(), v.into()));
        self
    }
    fn error(status: u16, code: &str) -> Reply {
        Reply::new(status)
            .header("X-Error-Code", code)
            .header("X-Error-Message", format!("{code} (mock hub)"))
    }
}

fn handle(
    mut stream: TcpStream,
    origin: &'static str,
    state: &Arc<Mutex<State>>,
    cdn_url: &str,
) -> std::io::Result<()> {
    let Some(req) = read_request(&stream) else {
        return Ok(());
    };
    let reply = route(&req, origin, state, cdn_url);
    let (cut_at, delay) = {
        let mut s = state.lock().unwrap();
        s.unlogged += 1;
        (s.behaviour.cut_at, s.behaviour.chunk_delay)
    };
    let status_text = match reply.status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        _ => "Other",
    };
    let mut head = format!(
        "HTTP/1.1 {} {status_text}\r\nConnection: close\r\n",
        reply.status
    );
    for (k, v) in &reply.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    let len = reply.declared_len.unwrap_or(reply.body.len() as u64);
    head.push_str(&format!("Content-Length: {len}\r\n\r\n"));
    let mut result = stream.write_all(head.as_bytes());
    let mut sent = 0u64;
    let body = if result.is_ok() {
        &reply.body[..]
    } else {
        &[][..]
    };
    for chunk in body.chunks(64 * 1024) {
        let mut chunk = chunk;
        if let (Some(cut), Some(off)) = (cut_at, reply.file_offset) {
            let pos = off + sent;
            if pos >= cut {
                break;
            }
            let allowed = (cut - pos) as usize;
            if chunk.len() > allowed {
                chunk = &chunk[..allowed];
            }
        }
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        if let Err(e) = stream.write_all(chunk) {
            result = Err(e);
            break;
        }
        sent += chunk.len() as u64;
    }
    {
        let mut s = state.lock().unwrap();
        s.log.push(Logged {
            origin,
            path: req.path.clone(),
            range: req.headers.get("range").cloned(),
            authorization: req.headers.get("authorization").cloned(),
            status: reply.status,
            body_bytes: sent,
        });
        s.unlogged -= 1;
    }
    let _ = stream.flush();
    let _ = stream.shutdown(std::net::Shutdown::Both);
    result
}

fn authorized(req: &Request) -> bool {
    req.headers.get("authorization").map(String::as_str) == Some(&format!("Bearer {GOOD_TOKEN}"))
}

fn route(req: &Request, origin: &str, state: &Arc<Mutex<State>>, cdn_url: &str) -> Reply {
    let s = state.lock().unwrap();
    if origin == "cdn" {
        let Some(sha) = req.path.strip_prefix("/blobs/") else {
            return Reply::new(404);
        };
        for repo in s.repos.values() {
            if let Some(f) = repo.files.iter().find(|f| f.lfs && f.sha256() == sha) {
                return serve_bytes(req, f, &s.behaviour);
            }
        }
        return Reply::new(404);
    }
    if let Some(rest) = req.path.strip_prefix("/api/models/") {
        let (repo_name, rev) = match rest.split_once("/revision/") {
            Some(_) if s.behaviour.no_revision_route => return Reply::new(404),
            Some(pair) => pair,
            None if s.behaviour.no_revision_route => (rest, "main"),
            None => return Reply::new(404),
        };
        let Some(repo) = s.repos.get(repo_name) else {
            return Reply::error(401, "RepoNotFound");
        };
        // Like the Hub: a gated repo's info is public, its files are not.
        if rev != "main" && rev != repo.commit {
            return Reply::error(404, "RevisionNotFound");
        }
        let blobs = req.query.contains("blobs=true") && !s.behaviour.bare_listing;
        let mut siblings: Vec<serde_json::Value> = repo
            .files
            .iter()
            .map(|f| {
                let mut v = serde_json::json!({"rfilename": f.path});
                if blobs {
                    v["size"] = f.data.len().into();
                    v["blobId"] = format!("{:040x}", f.data.len() * 7919 + f.path.len()).into();
                    if f.lfs {
                        v["lfs"] = serde_json::json!({"sha256": f.sha256(), "size": f.data.len(), "pointerSize": 134});
                    }
                }
                v
            })
            .collect();
        for extra in &repo.extra_listed {
            siblings.push(serde_json::json!({"rfilename": extra, "size": 3}));
        }
        let body = serde_json::json!({
            "id": repo_name, "sha": repo.commit, "private": false,
            "gated": if repo.gated { serde_json::json!("manual") } else { serde_json::json!(false) },
            "siblings": siblings,
        });
        let mut r = Reply::new(200).header("Content-Type", "application/json");
        r.body = serde_json::to_vec(&body).unwrap();
        return r;
    }
    // /{org}/{name}/resolve/{rev}/{path}
    let Some((repo_name, rest)) = req.path.trim_start_matches('/').split_once("/resolve/") else {
        return Reply::new(404);
    };
    let Some(repo) = s.repos.get(repo_name) else {
        return Reply::error(401, "RepoNotFound");
    };
    if repo.gated && !authorized(req) {
        return Reply::error(401, "GatedRepo");
    }
    let Some((rev, file)) = rest.split_once('/') else {
        return Reply::new(404);
    };
    if rev != "main" && rev != repo.commit {
        return Reply::error(404, "RevisionNotFound");
    }
    let Some(f) = repo.files.iter().find(|f| f.path == file) else {
        return Reply::error(404, "EntryNotFound");
    };
    if f.lfs {
        return Reply::new(302)
            .header("Location", format!("{cdn_url}/blobs/{}", f.sha256()))
            .header("X-Repo-Commit", repo.commit.clone())
            .header("X-Linked-Etag", format!("\"{}\"", f.sha256()))
            .header("X-Linked-Size", f.data.len().to_string());
    }
    serve_bytes(req, f, &s.behaviour)
        .header("X-Repo-Commit", repo.commit.clone())
        .header("ETag", format!("\"{}\"", &f.sha256()[..40]))
}

fn serve_bytes(req: &Request, f: &RepoFile, b: &Behaviour) -> Reply {
    let mut data = f.data.clone();
    if b.corrupt.contains(&f.path) && !data.is_empty() {
        let mid = data.len() / 2;
        data[mid] ^= 0xff;
    }
    let total = data.len() as u64;
    let start = req
        .headers
        .get("range")
        .filter(|_| !b.ignore_range)
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split('-').next())
        .and_then(|s| s.parse::<u64>().ok());
    match start {
        Some(s) if s >= total => {
            Reply::new(416).header("Content-Range", format!("bytes */{total}"))
        }
        Some(s) => {
            let mut r =
                Reply::new(206).header("Content-Range", format!("bytes {s}-{}/{total}", total - 1));
            r.body = data[s as usize..].to_vec();
            r.file_offset = Some(s);
            r
        }
        None => {
            let mut r = Reply::new(200);
            r.body = data;
            r.file_offset = Some(0);
            r
        }
    }
}
