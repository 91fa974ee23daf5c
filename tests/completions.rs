//! The shell completions in `completions/` are generated from the clap definitions; this test
//! fails when they drift. Regenerate with `XLLM_UPDATE_COMPLETIONS=1 cargo test --release --test completions`.

use clap_complete::Shell;

const FILES: [(Shell, &str); 3] = [
    (Shell::Bash, "completions/xllm.bash"),
    (Shell::Zsh, "completions/_xllm"),
    (Shell::Fish, "completions/xllm.fish"),
];

#[test]
fn completions_match_the_cli() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let update = std::env::var_os("XLLM_UPDATE_COMPLETIONS").is_some();
    let mut stale = Vec::new();
    for (shell, file) in FILES {
        let generated = xllm::cli::completions::generate(shell);
        assert!(
            generated.contains("pull") && generated.contains("revision"),
            "{shell}"
        );
        let path = root.join(file);
        if update {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &generated).unwrap();
        } else if std::fs::read_to_string(&path).ok().as_deref() != Some(generated.as_str()) {
            stale.push(file);
        }
    }
    assert!(
        stale.is_empty(),
        "{stale:?} differ from the CLI; regenerate with `XLLM_UPDATE_COMPLETIONS=1 cargo test --release --test completions` and commit them"
    );
}
