//! docs/cli.md is generated from the real `--help` output of every command; this test keeps it
//! true. Regenerate with: UPDATE_DOCS=1 cargo test -p moat --test e2e cli_reference

use std::path::Path;
use std::process::Command;

fn help(args: &[String]) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_moat"));
    // Help shows the values of these variables; the reference must not depend on them.
    for var in [
        "MOAT_HOME",
        "MOAT_ACCEL",
        "MOAT_KERNEL",
        "MOAT_LOG",
        "MOAT_MAX_SANDBOXES",
        "MOAT_IMAGE",
        "MOAT_MCP_ALL_SANDBOXES",
        "MOAT_MCP_MAX_SANDBOXES",
        "MOAT_MCP_EXEC_RATE",
        "MOAT_MCP_HOST_DIR",
        "MOAT_MCP_IMAGE",
        "MOAT_MCP_ALLOW_PUBLIC_PORTS",
        "MOAT_MCP_MAX_CPUS",
        "MOAT_MCP_MAX_MEMORY",
        "MOAT_MCP_MAX_DISK",
        "MOAT_HOST",
        "MOAT_TLS_CA",
        "MOAT_LOG_MAX_SIZE",
    ] {
        cmd.env_remove(var);
    }
    let out = cmd.args(args).arg("--help").output().expect("moat runs");
    assert!(out.status.success(), "moat {args:?} --help succeeds");
    String::from_utf8(out.stdout).expect("help is UTF-8")
}

/// The subcommands a help text lists under "Commands:".
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "help")
        .collect()
}

fn document(cmd: Vec<String>, doc: &mut String) {
    let text = help(&cmd);
    let title = if cmd.is_empty() { "moat".to_string() } else { format!("moat {}", cmd.join(" ")) };
    doc.push_str(&format!("\n## `{title}`\n\n```text\n{text}```\n"));
    for sub in subcommands(&text) {
        let mut next = cmd.clone();
        next.push(sub);
        document(next, doc);
    }
}

#[test]
fn cli_reference_matches_help_output() {
    let mut doc = String::from("# CLI reference\n\nGenerated from `moat --help`; do not edit by hand.\n");
    document(vec![], &mut doc);
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/cli.md");
    if std::env::var_os("UPDATE_DOCS").is_some() {
        std::fs::write(&path, &doc).expect("docs/cli.md writable");
    }
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        current == doc,
        "docs/cli.md is stale; regenerate with: UPDATE_DOCS=1 cargo test -p moat --test e2e cli_reference"
    );
}
