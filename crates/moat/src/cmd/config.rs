//! `moat config show`: every setting's effective value and where it came from.

use clap::CommandFactory;

use crate::cli::Cli;
use crate::config::{key, loaded, source, Source, SETTINGS};

pub fn show(json: bool) -> anyhow::Result<i32> {
    if json {
        println!("{}", settings_json());
        return Ok(0);
    }
    let rows = rows();
    let file = loaded().file.as_ref().map(|p| p.display().to_string());
    println!("config file: {}", file.as_deref().unwrap_or("none ($MOAT_HOME/config.toml, /etc/moat/config.toml)"));
    println!("{:<24} {:<32} {:<12} ABOUT", "KEY", "VALUE", "SOURCE");
    for (k, _, value, from, about) in rows {
        println!("{k:<24} {value:<32} {from:<12} {about}");
    }
    Ok(0)
}

/// What `moat config show --json` prints: the file and every setting (a support bundle holds it).
pub fn settings_json() -> serde_json::Value {
    let file = loaded().file.as_ref().map(|p| p.display().to_string());
    let settings: Vec<_> = rows()
        .iter()
        .map(|(k, env, value, from, about)| {
            serde_json::json!({"key": k, "env": env, "value": value, "source": from, "about": about})
        })
        .collect();
    serde_json::json!({ "file": file, "settings": settings })
}

/// Each setting: key, variable, effective value, where it came from, what it does.
fn rows() -> Vec<(String, &'static str, String, &'static str, &'static str)> {
    let cli = Cli::command();
    SETTINGS
        .iter()
        .map(|s| {
            let set = std::env::var(s.env).ok().filter(|v| !v.is_empty());
            let (value, from) = match (set, source(s.env)) {
                (Some(v), Source::File) => (v, "file"),
                (Some(v), _) => (v, "environment"),
                (None, _) => (default_of(&cli, s.env).unwrap_or_else(|| "-".into()), "default"),
            };
            (key(s.env), s.env, value, from, s.about)
        })
        .collect()
}

/// The default clap shows for the flag that reads `env`, anywhere in the command tree.
fn default_of(cmd: &clap::Command, env: &str) -> Option<String> {
    for arg in cmd.get_arguments() {
        if arg.get_env().is_some_and(|e| e == env) {
            let defaults: Vec<String> =
                arg.get_default_values().iter().map(|v| v.to_string_lossy().into_owned()).collect();
            return (!defaults.is_empty()).then(|| defaults.join(","));
        }
    }
    cmd.get_subcommands().find_map(|sub| default_of(sub, env))
}
