//! Sandbox labels: `key=value` pairs a client attaches to a sandbox when it creates it, and
//! selectors that list only the sandboxes carrying some.

use std::collections::BTreeMap;

/// Most labels one sandbox may carry.
pub const MAX_LABELS: usize = 64;
/// Longest label key, in bytes.
pub const MAX_LABEL_KEY: usize = 128;
/// Longest label value, in bytes.
pub const MAX_LABEL_VALUE: usize = 1024;

/// Labels: at most [`MAX_LABELS`]; keys of 1 to [`MAX_LABEL_KEY`] bytes without `=` or control
/// characters; values of at most [`MAX_LABEL_VALUE`] bytes without control characters.
pub fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), String> {
    if labels.len() > MAX_LABELS {
        return Err(format!("{} labels given; a sandbox carries at most {MAX_LABELS}", labels.len()));
    }
    for (k, v) in labels {
        validate_label_key(k)?;
        if v.len() > MAX_LABEL_VALUE {
            return Err(format!(
                "the value of label {k:?} is {} bytes; at most {MAX_LABEL_VALUE} are allowed",
                v.len()
            ));
        }
        if v.chars().any(char::is_control) {
            return Err(format!("the value of label {k:?} contains a control character; use printable text"));
        }
    }
    Ok(())
}

/// A label key: 1 to [`MAX_LABEL_KEY`] bytes, no `=`, no control characters.
pub fn validate_label_key(key: &str) -> Result<(), String> {
    let shown: String = key.chars().take(64).collect();
    if key.is_empty() || key.len() > MAX_LABEL_KEY {
        return Err(format!("the label key {shown:?} is not 1-{MAX_LABEL_KEY} bytes long"));
    }
    if key.contains('=') || key.chars().any(char::is_control) {
        return Err(format!(
            "the label key {shown:?} contains '=' or a control character; use printable text without '='"
        ));
    }
    Ok(())
}

/// Which sandboxes a listing keeps: those with label `key`, and when `value` is given, with
/// that value. Written `key=value` or `key` (`GET /v1/sandboxes?label=…`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelSelector {
    pub key: String,
    pub value: Option<String>,
}

impl LabelSelector {
    /// Whether a sandbox with `labels` is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match (labels.get(&self.key), &self.value) {
            (Some(have), Some(want)) => have == want,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }
}

impl std::str::FromStr for LabelSelector {
    type Err = String;

    /// `key=value` or `key`; a key has no `=`, so the first one splits.
    fn from_str(s: &str) -> Result<LabelSelector, String> {
        let (key, value) = match s.split_once('=') {
            Some((k, v)) => (k, Some(v.to_string())),
            None => (s, None),
        };
        validate_label_key(key)?;
        Ok(LabelSelector { key: key.to_string(), value })
    }
}

impl std::fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.value {
            Some(v) => write!(f, "{}={v}", self.key),
            None => f.write_str(&self.key),
        }
    }
}

/// A `key=value` label as given on a command line.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("label {s:?} is not KEY=VALUE"))?;
    validate_label_key(k)?;
    Ok((k.to_string(), v.to_string()))
}

/// `CreateSandbox.labels`: the bounds of [`validate_labels`] as JSON Schema.
pub(crate) fn schema() -> utoipa::openapi::schema::ObjectBuilder {
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    const PRINTABLE: &str = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$";
    let key = ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(MAX_LABEL_KEY))
        .pattern(Some("^[^=\\u0000-\\u001f\\u007f-\\u009f]+$"));
    let value =
        ObjectBuilder::new().schema_type(Type::String).max_length(Some(MAX_LABEL_VALUE)).pattern(Some(PRINTABLE));
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property_names(Some(key))
        .additional_properties(Some(value))
        .max_properties(Some(MAX_LABELS))
        .description(Some("Labels as KEY: VALUE"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn labels_are_bounded_printable_pairs() {
        assert!(validate_labels(&labels(&[("team", "ml"), ("e2b.io/template", "base"), ("empty", "")])).is_ok());
        let long_key = "k".repeat(MAX_LABEL_KEY + 1);
        let long_value = "v".repeat(MAX_LABEL_VALUE + 1);
        for (bad, says) in [
            (labels(&[("", "v")]), "1-128 bytes"),
            (labels(&[(&long_key, "v")]), "1-128 bytes"),
            (labels(&[("a=b", "v")]), "without '='"),
            (labels(&[("a\nb", "v")]), "control character"),
            (labels(&[("k", &long_value)]), "at most 1024"),
            (labels(&[("k", "a\x1b[2Jb")]), "control character"),
        ] {
            let e = validate_labels(&bad).expect_err(says);
            assert!(e.contains(says), "{e}");
        }
        let many: BTreeMap<String, String> = (0..=MAX_LABELS).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(validate_labels(&many).expect_err("too many").contains("at most 64"));
        assert!(validate_labels(&many.into_iter().skip(1).collect()).is_ok());
    }

    #[test]
    fn selectors_match_a_value_or_any_value() {
        let have = labels(&[("team", "ml"), ("tier", "")]);
        let sel = |s: &str| s.parse::<LabelSelector>().expect(s);
        assert!(sel("team=ml").matches(&have) && sel("team").matches(&have) && sel("tier=").matches(&have));
        assert!(!sel("team=web").matches(&have) && !sel("owner").matches(&have));
        assert_eq!(sel("url=http://x?a=b").value.as_deref(), Some("http://x?a=b"));
        assert_eq!(sel("team=ml").to_string(), "team=ml");
        assert!("=v".parse::<LabelSelector>().is_err());
        assert_eq!(parse_label("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert!(parse_label("novalue").is_err());
    }
}
