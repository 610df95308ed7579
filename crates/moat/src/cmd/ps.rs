//! `moat ps`: the sandboxes, filtered and formatted the way Docker users expect.
//!
//! By default only sandboxes that are not over (neither stopped, failed nor expired) are shown;
//! `-a` shows every one, and so does a `phase=` filter, which asks for ended ones by name.

use anyhow::bail;
use moat_api::{Phase, SandboxInfo};
use serde_json::Value;

use crate::cli::{HostArgs, PsArgs};
use crate::cmd::daemon::connect;
use crate::cmd::sandbox::ago_or_in;
use crate::error::Hinted;

/// The keys `--filter` takes.
const FILTER_KEYS: &str = "phase, name, id, image, label";

/// `--filter KEY=VALUE`s: values of one key are alternatives, different keys must all match
/// (Docker's rule).
#[derive(Debug, Default)]
struct Filters {
    phases: Vec<Phase>,
    names: Vec<String>,
    ids: Vec<String>,
    images: Vec<String>,
    labels: Vec<moat_api::LabelSelector>,
}

impl Filters {
    fn parse(given: &[String]) -> anyhow::Result<Filters> {
        let mut f = Filters::default();
        for g in given {
            let Some((key, value)) = g.split_once('=') else {
                return Err(Hinted::new(
                    format!("{g:?} is not a filter"),
                    format!("write KEY=VALUE; keys: {FILTER_KEYS}"),
                )
                .into());
            };
            match key {
                "phase" | "status" => match Phase::ALL.into_iter().find(|p| p.as_str() == value) {
                    Some(p) => f.phases.push(p),
                    None => {
                        let phases: Vec<&str> = Phase::ALL.iter().map(|p| p.as_str()).collect();
                        return Err(Hinted::new(
                            format!("{value:?} is not a phase"),
                            format!("phases: {}", phases.join(", ")),
                        )
                        .into());
                    }
                },
                "name" => f.names.push(value.to_string()),
                "id" => f.ids.push(value.to_string()),
                "image" => f.images.push(value.to_string()),
                "label" => f
                    .labels
                    .push(value.parse().map_err(|e: String| Hinted::new(e, "write label=KEY or label=KEY=VALUE"))?),
                _ => {
                    return Err(
                        Hinted::new(format!("{key:?} is not a filter key"), format!("keys: {FILTER_KEYS}")).into()
                    )
                }
            }
        }
        Ok(f)
    }

    fn matches(&self, s: &SandboxInfo) -> bool {
        fn any<T>(wanted: &[T], hit: impl Fn(&T) -> bool) -> bool {
            wanted.is_empty() || wanted.iter().any(hit)
        }
        any(&self.phases, |p| *p == s.phase)
            && any(&self.names, |n| s.name.contains(n.as_str()))
            && any(&self.ids, |i| s.id.starts_with(i.as_str()))
            && any(&self.images, |i| s.image == *i)
    }
}

fn is_over(phase: Phase) -> bool {
    matches!(phase, Phase::Stopped | Phase::Failed | Phase::Expired)
}

pub async fn ps(args: PsArgs, host: &HostArgs) -> anyhow::Result<i32> {
    let filters = Filters::parse(&args.filters)?;
    let mut selectors = args.labels.clone();
    selectors.extend(filters.labels.iter().cloned());
    let format = args.format.as_deref().map(Format::parse).transpose()?;
    let list = connect(host).await?.list_selected(&selectors).await?;
    let all = args.all || !filters.phases.is_empty();
    let (shown, hidden): (Vec<SandboxInfo>, Vec<SandboxInfo>) =
        list.into_iter().filter(|s| filters.matches(s)).partition(|s| all || !is_over(s.phase));
    if args.quiet {
        for s in &shown {
            println!("{}", s.id);
        }
        return Ok(0);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&shown)?);
        return Ok(0);
    }
    match format {
        Some(format) => format.print(&shown)?,
        None => table(&shown),
    }
    if !hidden.is_empty() {
        eprintln!("moat: {} ended sandboxes not shown (`moat ps -a` shows them)", hidden.len());
    }
    Ok(0)
}

fn table(list: &[SandboxInfo]) {
    println!(
        "{:<12}  {:<20}  {:<9}  {:<10}  {:>4}  {:>7}  {:<5}  {:<10}  EXPIRES",
        "ID", "NAME", "PHASE", "IMAGE", "CPUS", "MEMORY", "ACCEL", "CREATED"
    );
    for s in list {
        println!(
            "{:<12}  {:<20}  {:<9}  {:<10}  {:>4}  {:>6}M  {:<5}  {:<10}  {}",
            s.id,
            s.name,
            s.phase,
            s.image,
            s.vcpus,
            s.memory_mib,
            s.accel,
            ago_or_in(s.created_at),
            s.expires_at.map(ago_or_in).unwrap_or_else(|| "-".into())
        );
    }
}

/// `--format`: `json` (a line per sandbox), a Go-template-like line (`{{.Name}}\t{{.Phase}}`,
/// `{{.Labels.team}}`), or a list of fields (`name,phase,image`) printed as a table.
#[derive(Debug)]
enum Format {
    JsonLines,
    Template(Vec<Piece>),
    Fields(Vec<String>),
}

#[derive(Debug, PartialEq)]
enum Piece {
    Text(String),
    /// A path into the sandbox's JSON: `["labels", "team"]`.
    Field(Vec<String>),
}

impl Format {
    fn parse(s: &str) -> anyhow::Result<Format> {
        if s == "json" {
            return Ok(Format::JsonLines);
        }
        if !s.contains("{{") {
            let fields: Vec<String> = s.split(',').map(|f| f.trim().to_ascii_lowercase()).collect();
            if fields.iter().any(|f| f.is_empty() || !f.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')) {
                return Err(Hinted::new(
                    format!("{s:?} is not a list of fields"),
                    "write e.g. --format name,phase,image, or a template: --format '{{.Name}}\\t{{.Phase}}'",
                )
                .into());
            }
            return Ok(Format::Fields(fields));
        }
        let mut pieces = Vec::new();
        let mut rest = s;
        while let Some(open) = rest.find("{{") {
            pieces.push(Piece::Text(unescape(&rest[..open])));
            let Some(close) = rest[open..].find("}}") else { bail!("{s:?}: a {{{{ is not closed by }}}}") };
            let inner = rest[open + 2..open + close].trim();
            let Some(path) = inner.strip_prefix('.') else {
                return Err(Hinted::new(
                    format!("{{{{{inner}}}}} is not a field"),
                    "fields start with a dot: {{.Name}}, {{.Labels.KEY}}",
                )
                .into());
            };
            pieces.push(Piece::Field(path.split('.').map(str::to_string).collect()));
            rest = &rest[open + close + 2..];
        }
        pieces.push(Piece::Text(unescape(rest)));
        pieces.retain(|p| *p != Piece::Text(String::new()));
        Ok(Format::Template(pieces))
    }

    fn print(&self, list: &[SandboxInfo]) -> anyhow::Result<()> {
        let values: Vec<Value> = list.iter().map(serde_json::to_value).collect::<Result<_, _>>()?;
        match self {
            Format::JsonLines => {
                for v in &values {
                    println!("{v}");
                }
            }
            Format::Template(pieces) => {
                for v in &values {
                    let line: String = pieces
                        .iter()
                        .map(|p| match p {
                            Piece::Text(t) => Ok(t.clone()),
                            Piece::Field(path) => field(v, path),
                        })
                        .collect::<anyhow::Result<_>>()?;
                    println!("{line}");
                }
            }
            Format::Fields(fields) => {
                let paths: Vec<Vec<String>> = fields.iter().map(|f| vec![f.clone()]).collect();
                let mut rows = vec![fields.iter().map(|f| f.to_ascii_uppercase()).collect::<Vec<_>>()];
                for v in &values {
                    rows.push(paths.iter().map(|p| field(v, p)).collect::<anyhow::Result<_>>()?);
                }
                let widths: Vec<usize> =
                    (0..fields.len()).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
                for row in rows {
                    let cells: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
                    println!("{}", cells.join("  ").trim_end());
                }
            }
        }
        Ok(())
    }
}

/// Docker's names for the fields its users type, and ours.
fn alias(key: &str) -> &str {
    match key {
        "cpus" => "vcpus",
        "memory" => "memory_mib",
        "disk" => "disk_mib",
        "created" => "created_at",
        "expires" => "expires_at",
        "status" | "state" => "phase",
        other => other,
    }
}

/// The value at `path` in a sandbox's JSON (keys compared without case), as text.
fn field(v: &Value, path: &[String]) -> anyhow::Result<String> {
    let mut at = v;
    for (i, key) in path.iter().enumerate() {
        let lower = key.to_ascii_lowercase();
        // Label keys are the user's own and keep their case.
        let want = if i == 0 { alias(&lower).to_string() } else { key.clone() };
        at = match at {
            Value::Object(map) => match map.get(&want).or_else(|| map.get(&lower)) {
                Some(next) => next,
                None if i > 0 => return Ok(String::new()),
                None => {
                    let keys: Vec<&str> = map.keys().map(String::as_str).collect();
                    return Err(Hinted::new(
                        format!("{key:?} is not a field of a sandbox"),
                        format!("fields: {}", keys.join(", ")),
                    )
                    .into());
                }
            },
            _ => return Ok(String::new()),
        };
    }
    let text = match at {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    // Values can come from the guest's side (labels set by an agent): shown, not obeyed.
    Ok(moat_api::escape_controls(&text).into_owned())
}

/// `\t` and `\n` in a template mean a tab and a newline, as in Docker's.
fn unescape(s: &str) -> String {
    s.replace("\\t", "\t").replace("\\n", "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox() -> Value {
        serde_json::json!({"id": "abc123", "name": "box", "phase": "running", "vcpus": 2,
                           "labels": {"Team": "x"}, "expires_at": null})
    }

    fn render(format: &str) -> anyhow::Result<String> {
        let Format::Template(pieces) = Format::parse(format)? else { panic!("a template") };
        let v = sandbox();
        pieces
            .iter()
            .map(|p| match p {
                Piece::Text(t) => Ok(t.clone()),
                Piece::Field(path) => field(&v, path),
            })
            .collect()
    }

    #[test]
    fn templates_fill_fields_by_any_case_and_docker_names() {
        assert_eq!(render("{{.Name}}\\t{{.Status}} {{ .CPUs }}").unwrap(), "box\trunning 2");
        assert_eq!(render("{{.Labels.Team}}/{{.Labels.none}}/{{.expires}}").unwrap(), "x//");
        assert!(render("{{.Nope}}").unwrap_err().to_string().contains("not a field"));
        assert!(Format::parse("{{Name}}").is_err());
        assert!(Format::parse("{{.Name").is_err());
    }

    #[test]
    fn field_lists_and_filters_are_checked() {
        assert!(matches!(Format::parse("name, phase").unwrap(), Format::Fields(f) if f == ["name", "phase"]));
        assert!(Format::parse("name;phase").is_err());
        assert!(Filters::parse(&["phase=stopped".into(), "name=web".into()]).is_ok());
        assert!(Filters::parse(&["phase=asleep".into()]).is_err());
        assert!(Filters::parse(&["colour=red".into()]).is_err());
        assert!(Filters::parse(&["phase".into()]).is_err());
    }
}
