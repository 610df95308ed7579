//! The configuration file (`$MOAT_HOME/config.toml`) and `moat config show`: flags over the
//! environment over the file over the defaults; a bad file stops moat with the remedy.

use std::path::Path;
use std::process::{Command, Output};

/// `moat ARGS` with `home` as MOAT_HOME, `env` set, and no other `MOAT_*` variable of ours.
fn moat(home: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_moat"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("MOAT_")) {
        cmd.env_remove(k);
    }
    cmd.env("MOAT_HOME", home).envs(env.iter().copied()).args(args).output().expect("moat runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn the_config_file_sits_between_the_environment_and_the_defaults() {
    let home = tempfile::tempdir().expect("a temp dir");
    let file = home.path().join("config.toml");
    std::fs::write(
        &file,
        "accel = \"tcg\"\nmax_sandboxes = 3\nhost_addresses = [\"203.0.113.5\", \"203.0.113.6\"]\nmcp_max_cpus = 2\n",
    )
    .expect("the home is writable");
    let out = moat(home.path(), &[("MOAT_MAX_SANDBOXES", "5")], &["config", "show", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).expect("config show --json prints JSON");
    assert_eq!(shown["file"], file.display().to_string());
    let setting = |key: &str| {
        let s = shown["settings"].as_array().expect("a list").iter().find(|s| s["key"] == key).cloned();
        let s = s.unwrap_or_else(|| panic!("no setting {key} in {shown}"));
        (s["value"].as_str().unwrap_or_default().to_string(), s["source"].as_str().unwrap_or_default().to_string())
    };
    assert_eq!(setting("accel"), ("tcg".into(), "file".into()));
    assert_eq!(setting("max_sandboxes"), ("5".into(), "environment".into()), "the environment wins over the file");
    assert_eq!(setting("host_addresses"), ("203.0.113.5,203.0.113.6".into(), "file".into()));
    assert_eq!(setting("mcp_max_cpus"), ("2".into(), "file".into()));
    assert_eq!(setting("mcp_max_sandboxes"), ("8".into(), "default".into()));
    assert!(shown["settings"][0]["about"].as_str().is_some_and(|a| !a.is_empty()), "{shown}");
    let human = text(&moat(home.path(), &[], &["config", "show"]).stdout);
    assert!(human.contains(&file.display().to_string()) && human.lines().any(|l| l.starts_with("accel ")), "{human}");

    // A value from the file reaches the flag it stands for, which checks it.
    std::fs::write(&file, "accel = \"warp\"\n").expect("the home is writable");
    let bad = moat(home.path(), &[], &["ps"]);
    assert!(!bad.status.success() && text(&bad.stderr).contains("warp"), "{}", text(&bad.stderr));
    // A key moat does not know stops it, naming the file and the keys it knows.
    std::fs::write(&file, "acel = \"tcg\"\n").expect("the home is writable");
    let unknown = moat(home.path(), &[], &["config", "show"]);
    let err = text(&unknown.stderr);
    assert_eq!(unknown.status.code(), Some(2), "{err}");
    assert!(
        err.contains("\"acel\" is not a setting") && err.contains(&file.display().to_string()) && err.contains("accel"),
        "{err}"
    );
}
