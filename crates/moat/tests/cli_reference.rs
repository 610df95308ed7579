//! docs/cli.md is generated from the real `--help` output; this test keeps it true.
//! Regenerate with: UPDATE_DOCS=1 cargo test -p moat --test cli_reference

use std::path::Path;
use std::process::Command;

fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_moat")).args(args).arg("--help").output().expect("moat runs");
    assert!(out.status.success(), "moat {args:?} --help succeeds");
    String::from_utf8(out.stdout).expect("help is UTF-8")
}

#[test]
fn cli_reference_matches_help_output() {
    let mut doc = String::from("# CLI reference\n\nGenerated from `moat --help`; do not edit by hand.\n");
    for cmd in [vec![], vec!["run"], vec!["doctor"], vec!["setup"]] {
        let title = if cmd.is_empty() { "moat".to_string() } else { format!("moat {}", cmd.join(" ")) };
        doc.push_str(&format!("\n## `{title}`\n\n```text\n{}```\n", help(&cmd)));
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/cli.md");
    if std::env::var_os("UPDATE_DOCS").is_some() {
        std::fs::write(&path, &doc).expect("docs/cli.md writable");
    }
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        current == doc,
        "docs/cli.md is stale; regenerate with: UPDATE_DOCS=1 cargo test -p moat --test cli_reference"
    );
}
