//! Exact-string edits of a text file: the string must be there, and once unless every occurrence
//! is to be replaced, so an edit never lands somewhere the model did not mean.

use crate::error::ToolError;

/// The edited text and how many occurrences were replaced.
#[derive(Debug, PartialEq, Eq)]
pub struct Edited {
    pub text: String,
    pub replaced: usize,
    /// Byte offset of the first replacement in the new text.
    pub first_at: usize,
}

/// Replace `old` by `new` in `text` (of the file `path`, for messages).
pub fn replace(text: &str, path: &str, old: &str, new: &str, all: bool) -> Result<Edited, ToolError> {
    if old.is_empty() {
        return Err(ToolError::invalid("old_string is empty; give the exact text to replace"));
    }
    if old == new {
        return Err(ToolError::invalid("old_string and new_string are the same; the edit would change nothing"));
    }
    let at: Vec<usize> = text.match_indices(old).map(|(i, _)| i).collect();
    match at.len() {
        0 => {
            let hint = if text.contains(old.trim()) && !old.trim().is_empty() {
                "the text is there with other leading or trailing whitespace: read the file again and copy the exact text, including indentation and line ends"
            } else {
                "read the file again (sandbox_file_read) and copy the exact text, including whitespace and indentation"
            };
            Err(ToolError::new(format!("old_string was not found in {path}"), hint))
        }
        n if n > 1 && !all => {
            let lines: Vec<String> = at.iter().take(10).map(|&i| line_of(text, i).to_string()).collect();
            Err(ToolError::new(
                format!("old_string occurs {n} times in {path} (lines {}); an edit needs it to be unique", lines.join(", ")),
                "include more of the surrounding lines in old_string so it matches once, or set replace_all to replace every occurrence",
            ))
        }
        n => {
            let text = if all { text.replace(old, new) } else { text.replacen(old, new, 1) };
            Ok(Edited { text, replaced: n, first_at: at[0] })
        }
    }
}

/// The 1-based line number of a byte offset.
pub fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1
}

/// Lines around a byte offset, numbered, for the model to check an edit.
pub fn excerpt(text: &str, offset: usize, context: usize) -> String {
    let line = line_of(text, offset);
    let first = line.saturating_sub(context).max(1);
    text.lines()
        .enumerate()
        .skip(first - 1)
        .take(2 * context + 1)
        .map(|(i, l)| format!("{:>6}\t{l}\n", i + 1))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "def f():\n    return 1\n\ndef g():\n    return 1\n";

    #[test]
    fn a_unique_string_is_replaced() {
        let e = replace(TEXT, "/a.py", "def g():\n    return 1", "def g():\n    return 2", false).unwrap();
        assert_eq!(e.text, "def f():\n    return 1\n\ndef g():\n    return 2\n");
        assert_eq!((e.replaced, line_of(&e.text, e.first_at)), (1, 4));
        assert_eq!(excerpt(&e.text, e.first_at, 1), "     3\t\n     4\tdef g():\n     5\t    return 2\n");
    }

    #[test]
    fn ambiguous_or_missing_strings_fail_with_a_way_out() {
        let e = replace(TEXT, "/a.py", "return 1", "return 3", false).unwrap_err();
        assert!(e.message.contains("occurs 2 times in /a.py (lines 2, 5)"), "{e}");
        assert!(e.hint.contains("replace_all"), "{e}");
        let e = replace(TEXT, "/a.py", "return 1", "return 3", true).unwrap();
        assert_eq!(e.replaced, 2);
        assert!(!e.text.contains("return 1"));
        let e = replace(TEXT, "/a.py", "return 7", "x", false).unwrap_err();
        assert!(e.message.contains("not found in /a.py"), "{e}");
        let e = replace(TEXT, "/a.py", "  return 1  ", "x", false).unwrap_err();
        assert!(e.hint.contains("other leading or trailing whitespace"), "{e}");
        assert!(replace(TEXT, "/a.py", "", "x", false).is_err());
        assert!(replace(TEXT, "/a.py", "f", "f", false).is_err());
    }
}
