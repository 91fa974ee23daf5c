//! `xllm pull` against the mock Hub: selection, verification, resume, errors, security, locking.

mod common;

use std::time::Duration;

use common::*;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn hub_with(name: &str, repo: Repo) -> MockHub {
    let hub = MockHub::start();
    hub.add_repo(name, repo);
    hub
}

#[test]
fn pull_fetches_what_running_needs_and_writes_a_manifest_last() {
    let repo = tiny_safetensors_repo(COMMIT, 64);
    let weights = repo
        .files
        .iter()
        .find(|f| f.path == "model.safetensors")
        .unwrap()
        .clone();
    let hub = hub_with("org/tiny", repo);
    let env = Env::new(&hub.url);
    let out = env.run(&["pull", "org/tiny"]).ok();
    assert!(
        out.stdout.contains("pulled org/tiny at 0123456789ab"),
        "{}",
        out.stdout
    );

    let dir = env.model_dir("org/tiny");
    assert_eq!(
        files_under(&dir),
        vec![
            ".xllm.lock",
            "config.json",
            "manifest.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    assert_eq!(
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        weights.data
    );
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["schema_version"], 1);
    assert_eq!(manifest["name"], "org/tiny");
    assert_eq!(manifest["source"]["commit"], COMMIT);
    assert_eq!(manifest["format"], "safetensors");
    assert_eq!(manifest["architecture"], "llama");
    assert_eq!(manifest["context_length"], 2048);
    assert_eq!(manifest["quantization"], "bf16");
    assert_eq!(
        manifest["kv_profiles"],
        serde_json::json!(["default", "kv_int8", "kv_fp8"])
    );
    let rows = 64 * 1024 / 128;
    assert_eq!(manifest["parameters"], rows * 64 + 64);
    let entry = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == "model.safetensors")
        .unwrap();
    assert_eq!(entry["sha256"], weights.sha256());
    assert_eq!(entry["size"], weights.data.len());

    // LFS files went through the redirect to the second origin; the skipped copy was never asked for.
    let log = hub.log();
    assert!(log
        .iter()
        .any(|l| l.origin == "cdn" && l.path == format!("/blobs/{}", weights.sha256())));
    assert!(!log
        .iter()
        .any(|l| l.path.contains("original/") || l.path.contains("README")));

    // A second pull of the same commit fetches nothing.
    hub.clear_log();
    let again = env.run(&["pull", "org/tiny"]).ok();
    assert!(again.stdout.contains("up to date"), "{}", again.stdout);
    assert!(hub.log().iter().all(|l| l.path.starts_with("/api/")));

    // Offline, a complete model counts as pulled and nothing is requested.
    hub.clear_log();
    env.run_with(&["pull", "org/tiny"], &[("HF_HUB_OFFLINE", "1")])
        .ok();
    assert!(hub.log().is_empty());
}

#[test]
fn interrupted_download_resumes_with_range() {
    let repo = tiny_safetensors_repo(COMMIT, 2048);
    let size = repo
        .files
        .iter()
        .find(|f| f.path == "model.safetensors")
        .unwrap()
        .data
        .len() as u64;
    let hub = hub_with("org/tiny", repo);
    let env = Env::new(&hub.url);
    hub.set_behaviour(Behaviour {
        cut_at: Some(size / 2),
        ..Default::default()
    });
    let first = env.run(&["pull", "org/tiny"]);
    first.fails_with(1, "run the same `xllm pull` again to resume");
    let dir = env.model_dir("org/tiny");
    assert!(!dir.join("manifest.json").exists());
    assert_eq!(
        std::fs::metadata(dir.join("model.safetensors.part"))
            .unwrap()
            .len(),
        size / 2
    );

    // The partial pull is listed as partial, with the command that resumes it.
    let list = env.run(&["list"]).ok();
    assert!(
        list.stdout.contains("org/tiny (partial)"),
        "{}",
        list.stdout
    );
    assert!(
        list.stdout.contains("resume with `xllm pull org/tiny`"),
        "{}",
        list.stdout
    );
    let json = env.run(&["list", "--json"]).ok().json();
    assert_eq!(json[0]["status"], "partial");
    // And it cannot be run or shown as if it were complete.
    env.run(&["show", "org/tiny"])
        .fails_with(4, "resume with `xllm pull org/tiny`");

    hub.set_behaviour(Behaviour::default());
    hub.clear_log();
    env.run(&["pull", "org/tiny"]).ok();
    let log = hub.log();
    let blob: Vec<_> = log.iter().filter(|l| l.origin == "cdn").collect();
    assert_eq!(blob.len(), 1, "{log:?}");
    assert_eq!(
        blob[0].range.as_deref(),
        Some(format!("bytes={}-", size / 2).as_str())
    );
    assert!(
        blob[0].body_bytes < size,
        "fetched {} of {size}",
        blob[0].body_bytes
    );
    assert_eq!(blob[0].body_bytes, size - size / 2);
    assert!(dir.join("manifest.json").exists());
    assert_eq!(
        env.run(&["list", "--json"]).ok().json()[0]["status"],
        "ready"
    );
}

#[test]
fn server_that_ignores_range_is_handled() {
    let repo = tiny_safetensors_repo(COMMIT, 512);
    let f = repo
        .files
        .iter()
        .find(|f| f.path == "model.safetensors")
        .unwrap()
        .clone();
    let hub = hub_with("org/tiny", repo);
    let env = Env::new(&hub.url);
    hub.set_behaviour(Behaviour {
        cut_at: Some(100_000),
        ..Default::default()
    });
    env.run(&["pull", "org/tiny"]).fails_with(1, "interrupted");
    hub.set_behaviour(Behaviour {
        ignore_range: true,
        ..Default::default()
    });
    let out = env.run(&["pull", "org/tiny"]).ok();
    assert!(
        out.stderr.contains("ignored the resume request"),
        "{}",
        out.stderr
    );
    assert_eq!(
        std::fs::read(env.model_dir("org/tiny").join("model.safetensors")).unwrap(),
        f.data
    );
}

#[test]
fn corrupted_download_is_rejected_and_deleted() {
    let hub = hub_with("org/tiny", tiny_safetensors_repo(COMMIT, 64));
    let env = Env::new(&hub.url);
    hub.set_behaviour(Behaviour {
        corrupt: vec!["model.safetensors".into()],
        ..Default::default()
    });
    let out = env
        .run(&["pull", "org/tiny"])
        .fails_with(1, "is corrupt: sha256");
    assert!(
        out.stderr.contains("the bad download was deleted"),
        "{}",
        out.stderr
    );
    let dir = env.model_dir("org/tiny");
    assert!(!dir.join("model.safetensors").exists());
    assert!(!dir.join("model.safetensors.part").exists());
    assert!(!dir.join("manifest.json").exists());
    hub.set_behaviour(Behaviour::default());
    env.run(&["pull", "org/tiny"]).ok();
}

#[test]
fn gated_repo_needs_a_token_that_never_leaves_the_hub() {
    let mut repo = tiny_safetensors_repo(COMMIT, 64);
    repo.gated = true;
    let hub = hub_with("org/gated", repo);
    let env = Env::new(&hub.url);
    let out = env
        .run(&["pull", "org/gated"])
        .fails_with(1, "gated repository");
    assert!(out.stderr.contains("HF_TOKEN"), "{}", out.stderr);
    assert!(!env.model_dir("org/gated").exists());

    // From the token file under HF_HOME, like huggingface_hub.
    std::fs::create_dir_all(env.hf_home()).unwrap();
    std::fs::write(env.hf_home().join("token"), format!("{GOOD_TOKEN}\n")).unwrap();
    hub.clear_log();
    env.run(&["pull", "org/gated"]).ok();
    let log = hub.log();
    assert!(log
        .iter()
        .filter(|l| l.origin == "api")
        .all(|l| l.authorization.is_some()));
    let cdn: Vec<_> = log.iter().filter(|l| l.origin == "cdn").collect();
    assert!(!cdn.is_empty());
    assert!(
        cdn.iter().all(|l| l.authorization.is_none()),
        "token leaked to the CDN: {cdn:?}"
    );

    // A wrong HF_TOKEN says the token lacks access.
    let env2 = Env::new(&hub.url);
    env2.run_with(&["pull", "org/gated"], &[("HF_TOKEN", "hf_wrong")])
        .fails_with(1, "your token has no access");
    assert!(
        !env2.model_dir("org/gated").exists(),
        "nothing to resume, so no partial folder"
    );
}

#[test]
fn hostile_file_names_are_refused_before_writing() {
    let mut repo = tiny_safetensors_repo(COMMIT, 64);
    repo.extra_listed = vec!["../../escape.safetensors".into()];
    let hub = hub_with("org/evil", repo);
    let env = Env::new(&hub.url);
    env.run(&["pull", "org/evil"])
        .fails_with(1, "escape the model folder");
    assert!(!env.model_dir("org/evil").exists());
    assert!(!env.home().join("escape.safetensors").exists());
    assert!(hub.log().iter().all(|l| l.path.starts_with("/api/")));
}

#[test]
fn errors_are_actionable() {
    let hub = hub_with("org/tiny", tiny_safetensors_repo(COMMIT, 64));
    let env = Env::new(&hub.url);
    env.run(&["pull", "org/nope"])
        .fails_with(1, "repository 'org/nope' was not found");
    env.run(&["pull", "org/tiny", "--revision", "v9"])
        .fails_with(1, "revision 'v9' does not exist");
    env.run_with(&["pull", "org/tiny"], &[("HF_HUB_OFFLINE", "1")])
        .fails_with(1, "HF_HUB_OFFLINE is set");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    env.run_with(&["pull", "org/tiny"], &[("HF_ENDPOINT", &dead)])
        .fails_with(1, "cannot reach");
    env.run(&["pull", "not a name"])
        .fails_with(1, "invalid model name");
    assert!(
        !env.home().join("models").exists() || files_under(&env.home().join("models")).is_empty()
    );
}

#[test]
fn bad_quantization_tokens_fail_before_any_download() {
    let hub = MockHub::start();
    hub.add_repo("org/tiny", tiny_safetensors_repo(COMMIT, 64));
    hub.add_repo("org/tiny-GGUF", tiny_gguf_repo(COMMIT));
    let env = Env::new(&hub.url);
    for bad in ["org/tiny:", "org/tiny:kv_int9", "org/tiny:q4km!"] {
        let out = env
            .run(&["pull", bad])
            .fails_with(3, "invalid quantization");
        assert!(
            out.stderr.contains("kv_int8") && out.stderr.contains("Q4_K_M"),
            "{}",
            out.stderr
        );
    }
    assert!(
        hub.log().is_empty(),
        "a malformed token must not reach the network"
    );
    let out = env
        .run(&["pull", "org/tiny:Q4_K_M"])
        .fails_with(3, "unsupported quantization 'Q4_K_M'");
    assert!(out.stderr.contains("kv_int8, kv_fp8"), "{}", out.stderr);
    let out = env
        .run(&["pull", "org/tiny-GGUF:kv_fp8"])
        .fails_with(3, "unsupported quantization 'kv_fp8'");
    assert!(out.stderr.contains("Q4_K_M, Q8_0"), "{}", out.stderr);
    let out = env
        .run(&["pull", "org/tiny-GGUF:Q6_K"])
        .fails_with(3, "does not ship a Q6_K file");
    assert!(
        out.stderr.contains("available: Q4_K_M, Q8_0"),
        "{}",
        out.stderr
    );
    assert!(hub.log().iter().all(|l| l.path.starts_with("/api/")));
    assert!(!env.home().join("models").exists());
}

#[test]
fn gguf_repo_tag_selects_the_file() {
    let hub = hub_with("org/tiny-GGUF", tiny_gguf_repo(COMMIT));
    let env = Env::new(&hub.url);
    env.run(&["pull", "org/tiny-GGUF"]).ok();
    let dir = env.model_dir("org/tiny-GGUF");
    assert!(dir.join("tiny-q4_k_m.gguf").exists());
    assert!(!dir.join("tiny-q8_0.gguf").exists());
    let show = env.run(&["show", "org/tiny-GGUF", "--json"]).ok().json();
    assert_eq!(show["format"], "gguf");
    assert_eq!(show["selected"]["gguf_type"], "Q4_K_M");
    assert_eq!(show["parameters"], 256);

    // A failed pull of another variant leaves the first one usable.
    hub.set_behaviour(Behaviour {
        cut_at: Some(100),
        ..Default::default()
    });
    env.run(&["pull", "org/tiny-GGUF:Q8_0"])
        .fails_with(1, "interrupted");
    env.run(&["show", "org/tiny-GGUF"]).ok();
    hub.set_behaviour(Behaviour::default());
    env.run(&["pull", "org/tiny-GGUF:q8_0"]).ok();
    assert!(dir.join("tiny-q8_0.gguf").exists());
    let show = env
        .run(&["show", "org/tiny-GGUF:Q8_0", "--json"])
        .ok()
        .json();
    assert_eq!(show["selected"]["gguf_type"], "Q8_0");
    assert_eq!(show["gguf_variants"], serde_json::json!(["Q8_0", "Q4_K_M"]));
    // Without a suffix the recorded quantization is used.
    let list = env.run(&["list", "--json"]).ok().json();
    assert_eq!(list[0]["format"], "gguf");
    env.run(&["show", "org/tiny-GGUF:kv_int8"])
        .fails_with(3, "unsupported quantization 'kv_int8'");
    env.run(&["show", "org/tiny-GGUF:Q6_K"])
        .fails_with(3, "xllm pull org/tiny-GGUF:Q6_K");
}

#[test]
fn concurrent_pulls_of_one_model_do_not_corrupt_it() {
    let repo = tiny_safetensors_repo(COMMIT, 2048);
    let f = repo
        .files
        .iter()
        .find(|f| f.path == "model.safetensors")
        .unwrap()
        .clone();
    let hub = hub_with("org/tiny", repo);
    let env = Env::new(&hub.url);
    hub.set_behaviour(Behaviour {
        chunk_delay: Some(Duration::from_millis(40)),
        ..Default::default()
    });
    let a = env
        .command(&["pull", "org/tiny"])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let b = env
        .command(&["pull", "org/tiny"])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let a = Run::from(a.wait_with_output().unwrap()).ok();
    let b = Run::from(b.wait_with_output().unwrap()).ok();
    assert!(
        b.stderr.contains("waiting for it to finish")
            || a.stderr.contains("waiting for it to finish"),
        "{a:?} {b:?}"
    );
    assert!(
        b.stdout.contains("up to date") || a.stdout.contains("up to date"),
        "{a:?} {b:?}"
    );
    assert_eq!(
        std::fs::read(env.model_dir("org/tiny").join("model.safetensors")).unwrap(),
        f.data
    );
    let cdn = hub.log().into_iter().filter(|l| l.origin == "cdn").count();
    assert_eq!(cdn, 1, "the weights were downloaded once");
}

#[test]
fn blobs_in_the_hugging_face_cache_are_reused_after_verification() {
    let repo = tiny_safetensors_repo(COMMIT, 256);
    let f = repo
        .files
        .iter()
        .find(|f| f.path == "model.safetensors")
        .unwrap()
        .clone();
    let hub = hub_with("org/tiny", repo);
    let env = Env::new(&hub.url);
    let blobs = env.hf_home().join("hub/models--org--tiny/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(blobs.join(f.sha256()), &f.data).unwrap();
    let out = env.run(&["pull", "org/tiny"]).ok();
    assert!(
        out.stdout.contains("reused from the Hugging Face cache"),
        "{}",
        out.stdout
    );
    assert!(hub.log().iter().all(|l| l.origin != "cdn"));
    assert_eq!(
        std::fs::read(env.model_dir("org/tiny").join("model.safetensors")).unwrap(),
        f.data
    );

    // A cached blob whose content does not match is not trusted.
    let env2 = Env::new(&hub.url);
    let blobs2 = env2.hf_home().join("hub/models--org--tiny/blobs");
    std::fs::create_dir_all(&blobs2).unwrap();
    let mut bad = f.data.clone();
    bad[10] ^= 1;
    std::fs::write(blobs2.join(f.sha256()), &bad).unwrap();
    hub.clear_log();
    let out = env2.run(&["pull", "org/tiny"]).ok();
    assert!(
        out.stderr.contains("does not match; downloading"),
        "{}",
        out.stderr
    );
    assert_eq!(
        std::fs::read(env2.model_dir("org/tiny").join("model.safetensors")).unwrap(),
        f.data
    );
}

#[test]
fn killed_pull_resumes_where_it_stopped() {
    let repo = tiny_safetensors_repo(COMMIT, 4096);
    let f = repo
        .files
        .iter()
        .find(|f| f.path == "model.safetensors")
        .unwrap()
        .clone();
    let size = f.data.len() as u64;
    let hub = hub_with("org/tiny", repo);
    let env = Env::new(&hub.url);
    hub.set_behaviour(Behaviour {
        chunk_delay: Some(Duration::from_millis(25)),
        ..Default::default()
    });
    let mut child = env
        .command(&["pull", "org/tiny"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let part = env.model_dir("org/tiny").join("model.safetensors.part");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0) < 512 * 1024 {
        assert!(
            std::time::Instant::now() < deadline,
            "download never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let kept = std::fs::metadata(&part).unwrap().len();
    assert!(kept > 0 && kept < size);

    hub.set_behaviour(Behaviour::default());
    hub.clear_log();
    env.run(&["pull", "org/tiny"]).ok();
    // The killed run's request may be logged late (when its server thread notices the broken
    // pipe); the resumed one is the request with a Range.
    let cdn: Vec<_> = hub
        .log()
        .into_iter()
        .filter(|l| l.origin == "cdn" && l.range.is_some())
        .collect();
    assert_eq!(cdn.len(), 1, "{cdn:?}");
    assert_eq!(
        cdn[0].range.as_deref(),
        Some(format!("bytes={kept}-").as_str())
    );
    assert!(
        cdn[0].body_bytes <= size - kept,
        "refetched {} bytes",
        cdn[0].body_bytes
    );
    assert_eq!(
        std::fs::read(env.model_dir("org/tiny").join("model.safetensors")).unwrap(),
        f.data
    );
}

#[test]
fn without_lfs_metadata_the_linked_etag_still_verifies() {
    let hub = hub_with("org/tiny", tiny_safetensors_repo(COMMIT, 64));
    let env = Env::new(&hub.url);
    hub.set_behaviour(Behaviour {
        bare_listing: true,
        corrupt: vec!["model.safetensors".into()],
        ..Default::default()
    });
    env.run(&["pull", "org/tiny"])
        .fails_with(1, "is corrupt: sha256");
    hub.set_behaviour(Behaviour {
        bare_listing: true,
        ..Default::default()
    });
    env.run(&["pull", "org/tiny"]).ok();
}

#[test]
fn new_revision_replaces_old_files_and_damaged_models_are_repaired() {
    let hub = hub_with("org/tiny", tiny_safetensors_repo(COMMIT, 64));
    let env = Env::new(&hub.url);
    env.run(&["pull", "org/tiny"]).ok();
    let dir = env.model_dir("org/tiny");

    // The repo moves on: its weights are renamed to a shard and grow.
    let mut next = tiny_safetensors_repo("fedcba9876543210fedcba9876543210fedcba98", 128);
    for f in &mut next.files {
        if f.path == "model.safetensors" {
            f.path = "model-00001-of-00001.safetensors".into();
        }
    }
    hub.add_repo("org/tiny", next);
    let out = env.run(&["pull", "org/tiny"]).ok();
    assert!(out.stdout.contains("at fedcba987654"), "{}", out.stdout);
    assert!(
        !dir.join("model.safetensors").exists(),
        "stale weights stay behind"
    );
    let show = env.run(&["show", "org/tiny", "--json"]).ok().json();
    assert_eq!(show["parameters"], 1024 * 64 + 64);
    assert_eq!(
        show["source"]["commit"],
        "fedcba9876543210fedcba9876543210fedcba98"
    );

    // A weight file deleted by hand: show/run refuse with the repair command; pull repairs.
    std::fs::remove_file(dir.join("model-00001-of-00001.safetensors")).unwrap();
    env.run(&["show", "org/tiny"])
        .fails_with(4, "repair it with `xllm pull org/tiny`");
    hub.clear_log();
    env.run(&["pull", "org/tiny"]).ok();
    let cdn = hub.log().into_iter().filter(|l| l.origin == "cdn").count();
    assert_eq!(cdn, 1, "only the missing file is fetched again");
    env.run(&["show", "org/tiny"]).ok();
}

#[test]
fn servers_without_the_revision_route_still_work_for_main() {
    let hub = hub_with("org/tiny", tiny_safetensors_repo(COMMIT, 64));
    let env = Env::new(&hub.url);
    hub.set_behaviour(Behaviour {
        no_revision_route: true,
        ..Default::default()
    });
    env.run(&["pull", "org/tiny"]).ok();
    env.run(&["pull", "org/absent"])
        .fails_with(1, "repository 'org/absent' was not found");
}
