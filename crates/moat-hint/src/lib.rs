//! Errors that say what to do next.
//!
//! An error's message says what failed, its [`source`](Error::source) chain says why, and its
//! [`Hint`] says what to do about it. The three are kept apart as data and put together only where
//! they are shown: to a person as a [`Report`], or as one line of text ([`one_line`]) where an
//! error travels as a string. A message never repeats its source: the chain is printed once, here.
//! uv's `uv-errors` crate is the model.

use std::borrow::Cow;
use std::error::Error;
use std::fmt;

/// An error that can say what to do about it.
pub trait Hint {
    /// What to do next, one sentence without the `hint:` prefix; `None` when this error has
    /// nothing to add. A wrapper of a hinted error returns its inner error's hint.
    fn hint(&self) -> Option<Cow<'static, str>>;
}

/// A message with its hint: the error of a binary's edge, where a type of its own would hold
/// nothing more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hinted {
    message: String,
    hint: Cow<'static, str>,
}

impl Hinted {
    pub fn new(message: impl Into<String>, hint: impl Into<Cow<'static, str>>) -> Hinted {
        Hinted { message: message.into(), hint: hint.into() }
    }
}

impl fmt::Display for Hinted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl Error for Hinted {}

impl Hint for Hinted {
    fn hint(&self) -> Option<Cow<'static, str>> {
        Some(self.hint.clone())
    }
}

/// `error`'s hint when it is an `E`: one step of the lookup a [`Report::find`] takes.
pub fn hint_of<E: Error + Hint + 'static>(error: &(dyn Error + 'static)) -> Option<Cow<'static, str>> {
    error.downcast_ref::<E>().and_then(Hint::hint)
}

/// The messages of `error` and its causes, outermost first. A cause whose text the message before
/// it already ends with is left out: some libraries' errors print their source themselves.
pub fn messages(error: &(dyn Error + 'static)) -> Vec<String> {
    let mut out: Vec<String> = vec![error.to_string()];
    for cause in std::iter::successors(error.source(), |e| (*e).source()) {
        let text = cause.to_string();
        let said = out.last().is_some_and(|before| before.ends_with(&text));
        if !text.is_empty() && !said {
            out.push(text);
        }
    }
    out
}

/// `error`'s message and its causes on one line, `: ` between them ("cannot read x: permission
/// denied"): for an error that travels as one string, such as an API error's message.
pub fn one_line(error: &(dyn Error + 'static)) -> String {
    messages(error).join(": ")
}

/// An error as a person reads it: its message, each cause on a `caused by:` line, and a `hint:`
/// line.
///
/// ```text
/// cannot read the kernel /boot/vmlinuz-6.1.0-cloud-amd64
/// caused by: Permission denied (os error 13)
/// hint: check the path given in MOAT_KERNEL / --kernel
/// ```
pub struct Report<'a> {
    error: &'a (dyn Error + 'static),
    hint: Option<Cow<'static, str>>,
}

impl<'a> Report<'a> {
    /// `error` with its own hint.
    pub fn new<E: Error + Hint + 'static>(error: &'a E) -> Report<'a> {
        Report { error, hint: error.hint() }
    }

    /// `error` with `hint`.
    pub fn with_hint(error: &'a (dyn Error + 'static), hint: Option<Cow<'static, str>>) -> Report<'a> {
        Report { error, hint }
    }

    /// `error` with the hint of the first error of its chain, itself first, that `hint_of` finds
    /// one for. The caller knows the error types that may be in the chain and looks each up with
    /// [`hint_of`]: stable Rust cannot ask a `dyn Error` for another trait.
    pub fn find(
        error: &'a (dyn Error + 'static),
        hint_of: impl Fn(&(dyn Error + 'static)) -> Option<Cow<'static, str>>,
    ) -> Report<'a> {
        let hint = std::iter::successors(Some(error), |e| (*e).source()).find_map(hint_of);
        Report { error, hint }
    }

    /// The hint this report ends with.
    pub fn hint(&self) -> Option<&str> {
        self.hint.as_deref()
    }
}

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let messages = messages(self.error);
        let (message, causes) = messages.split_first().expect("messages holds the error's own message first");
        f.write_str(message)?;
        for cause in causes {
            write!(f, "\ncaused by: {cause}")?;
        }
        if let Some(hint) = self.hint.as_deref().filter(|h| !h.is_empty()) {
            write!(f, "\nhint: {hint}")?;
        }
        Ok(())
    }
}

/// The shape every error type keeps, for its unit tests: the message holds no `hint:` and does not
/// repeat any message of its source chain, and the hint is there (and not empty) exactly when
/// `hinted`. Says what is wrong.
pub fn check<E: Error + Hint + 'static>(error: &E, hinted: bool) -> Result<(), String> {
    let message = error.to_string();
    if message.contains("hint:") {
        return Err(format!("the message holds a hint: {message:?}"));
    }
    for cause in std::iter::successors(error.source(), |e| (*e).source()) {
        let text = cause.to_string();
        if !text.is_empty() && message.contains(&text) {
            return Err(format!("the message {message:?} repeats its source {text:?}"));
        }
    }
    match error.hint() {
        Some(h) if h.is_empty() => Err(format!("{message:?} has an empty hint")),
        Some(h) if h.contains("hint:") => Err(format!("the hint of {message:?} says `hint:` itself: {h:?}")),
        Some(h) if !hinted => Err(format!("{message:?} has a hint it should leave to others: {h:?}")),
        None if hinted => Err(format!("{message:?} has no hint")),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    enum Outer {
        Read(std::io::Error),
        Inner(Inner),
    }

    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match self {
                Outer::Read(_) => f.write_str("cannot read the kernel"),
                Outer::Inner(_) => f.write_str("the sandbox failed"),
            }
        }
    }

    impl Error for Outer {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            match self {
                Outer::Read(e) => Some(e),
                Outer::Inner(e) => Some(e),
            }
        }
    }

    impl Hint for Outer {
        fn hint(&self) -> Option<Cow<'static, str>> {
            match self {
                Outer::Read(_) => Some("check the path".into()),
                Outer::Inner(_) => None,
            }
        }
    }

    #[derive(Debug)]
    struct Inner;

    impl fmt::Display for Inner {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("QEMU is missing")
        }
    }

    impl Error for Inner {}

    impl Hint for Inner {
        fn hint(&self) -> Option<Cow<'static, str>> {
            Some("install qemu-system-x86".into())
        }
    }

    fn known(e: &(dyn Error + 'static)) -> Option<Cow<'static, str>> {
        hint_of::<Outer>(e).or_else(|| hint_of::<Inner>(e)).or_else(|| hint_of::<Hinted>(e))
    }

    #[test]
    fn a_report_prints_the_message_then_each_cause_then_the_hint() {
        let e = Outer::Read(std::io::Error::other("permission denied"));
        assert_eq!(
            Report::new(&e).to_string(),
            "cannot read the kernel\ncaused by: permission denied\nhint: check the path"
        );
        assert_eq!(one_line(&e), "cannot read the kernel: permission denied");
    }

    #[test]
    fn the_first_hint_down_the_chain_is_the_one_shown() {
        let e = Outer::Inner(Inner);
        assert_eq!(Report::new(&e).hint(), None);
        let report = Report::find(&e, known);
        assert_eq!(report.hint(), Some("install qemu-system-x86"));
        assert_eq!(report.to_string(), "the sandbox failed\ncaused by: QEMU is missing\nhint: install qemu-system-x86");
        let outer = Outer::Read(std::io::Error::other("x"));
        assert_eq!(Report::find(&outer, known).hint(), Some("check the path"));
        let unknown = std::io::Error::other("nothing to say");
        assert_eq!(Report::find(&unknown, known).to_string(), "nothing to say");
    }

    #[test]
    fn a_cause_its_message_already_printed_is_not_repeated() {
        #[derive(Debug)]
        struct Chatty(std::io::Error);
        impl fmt::Display for Chatty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "connecting: {}", self.0)
            }
        }
        impl Error for Chatty {
            fn source(&self) -> Option<&(dyn Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = Chatty(std::io::Error::other("refused"));
        assert_eq!(one_line(&e), "connecting: refused");
    }

    #[test]
    fn check_finds_a_repeated_source_a_baked_hint_and_a_missing_hint() {
        #[derive(Debug)]
        struct Repeats(std::io::Error);
        impl fmt::Display for Repeats {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "reading x: {}", self.0)
            }
        }
        impl Error for Repeats {
            fn source(&self) -> Option<&(dyn Error + 'static)> {
                Some(&self.0)
            }
        }
        impl Hint for Repeats {
            fn hint(&self) -> Option<Cow<'static, str>> {
                None
            }
        }
        let e = Repeats(std::io::Error::other("denied"));
        assert!(check(&e, false).unwrap_err().contains("repeats its source"));
        let baked = Hinted::new("failed\nhint: do this", "do this");
        assert!(check(&baked, true).unwrap_err().contains("holds a hint"));
        let plain = Hinted::new("failed", "do this");
        check(&plain, true).unwrap();
        assert!(check(&plain, false).unwrap_err().contains("should leave to others"));
        assert!(check(&Hinted::new("failed", ""), true).unwrap_err().contains("empty hint"));
        assert!(check(&Outer::Inner(Inner), true).unwrap_err().contains("has no hint"));
    }

    #[test]
    fn hinted_keeps_its_hint_out_of_its_message() {
        let e = Hinted::new("neither side is in a sandbox", "write the sandbox side as BOX:PATH");
        assert_eq!(e.to_string(), "neither side is in a sandbox");
        assert_eq!(e.hint().as_deref(), Some("write the sandbox side as BOX:PATH"));
        assert_eq!(
            Report::find(&e, known).to_string(),
            "neither side is in a sandbox\nhint: write the sandbox side as BOX:PATH"
        );
    }
}
