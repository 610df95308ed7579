//! When the console's bytes were written: `console.times` beside `console.log`.
//!
//! QEMU writes the console straight to its file, so nothing stamps its lines. The task that keeps
//! the file under its cap already looks at its size a few times a second; when the size changed
//! and a second has passed since the last mark, it appends a mark `UNIX_MS BASE LEN`: at that
//! time the file held LEN bytes, after BASE bytes moved out by earlier cuts. So everything after
//! a mark's BASE + LEN was written after its time, and `moat logs --since` starts there: its
//! times are known to about a second.
//!
//! The daemon alone writes the file, but it sits in the run directory beside what QEMU writes,
//! so it is read as untrusted: bounded, and a line that does not parse is skipped (the worst a
//! bad mark can do is start a log at the wrong place).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Marks at most this often.
const MARK_EVERY_MS: i64 = 1000;
/// Past this size the file keeps its newer half (about an hour of marks at one a second).
const TIMES_CAP: u64 = 128 * 1024;

/// `console.times` beside `console.log`.
pub fn times_path(console_log: &Path) -> PathBuf {
    console_log.with_file_name("console.times")
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Mark {
    at_ms: i64,
    base: u64,
    len: u64,
}

fn parse(line: &str) -> Option<Mark> {
    let mut it = line.split(' ');
    let mark = Mark { at_ms: it.next()?.parse().ok()?, base: it.next()?.parse().ok()?, len: it.next()?.parse().ok()? };
    it.next().is_none().then_some(mark)
}

/// The marks in the file (its last [`TIMES_CAP`] bytes at most), oldest first.
fn read_marks(path: &Path) -> Vec<Mark> {
    let Ok(mut f) = File::open(path) else { return Vec::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(TIMES_CAP)));
    let mut text = String::new();
    let _ = f.take(TIMES_CAP).read_to_string(&mut text);
    text.lines().filter_map(parse).collect()
}

/// The writer's side, owned by the task that keeps the console under its cap.
#[derive(Debug)]
pub(crate) struct Marker {
    path: PathBuf,
    base: u64,
    last: Option<Mark>,
}

impl Marker {
    /// Continue the marks of `console_log` (a daemon restarting goes on from the last one).
    pub(crate) fn open(console_log: &Path) -> Marker {
        let path = times_path(console_log);
        let last = read_marks(&path).pop();
        Marker { base: last.map_or(0, |m| m.base), path, last }
    }

    /// The console holds `len` bytes at `now_ms`; mark it when that is news.
    pub(crate) fn observe(&mut self, len: u64, now_ms: i64) {
        let mark = Mark { at_ms: now_ms, base: self.base, len };
        let news = self.last.is_none_or(|l| (l.base, l.len) != (mark.base, mark.len));
        if news && self.last.is_none_or(|l| now_ms - l.at_ms >= MARK_EVERY_MS) {
            self.append(mark);
        }
    }

    /// The file was cut after its first `end` bytes moved to `console.log.1`.
    pub(crate) fn rotated(&mut self, end: u64, now_ms: i64) {
        self.base += end;
        self.append(Mark { at_ms: now_ms, base: self.base, len: 0 });
    }

    fn append(&mut self, mark: Mark) {
        self.last = Some(mark);
        let line = format!("{} {} {}\n", mark.at_ms, mark.base, mark.len);
        let file = OpenOptions::new().create(true).append(true).mode(0o600).open(&self.path);
        let Ok(mut file) = file else { return };
        if file.write_all(line.as_bytes()).is_err() {
            return;
        }
        if file.metadata().is_ok_and(|m| m.len() > TIMES_CAP) {
            let marks = read_marks(&self.path);
            let kept: String =
                marks[marks.len() / 2..].iter().map(|m| format!("{} {} {}\n", m.at_ms, m.base, m.len)).collect();
            let partial = self.path.with_extension("times.tmp");
            if std::fs::write(&partial, kept).is_ok() {
                let _ = std::fs::rename(&partial, &self.path);
            }
        }
    }
}

/// Where the console's bytes written at or after `since_ms` start: in `console.log.1` at the
/// first offset (and then all of `console.log`), or in `console.log` at the second.
pub fn since(console_log: &Path, since_ms: i64) -> (Option<u64>, u64) {
    let marks = read_marks(&times_path(console_log));
    let Some(at) = marks.iter().rev().find(|m| m.at_ms <= since_ms) else {
        // Nothing known from before then: all of it may be newer.
        return (Some(0), 0);
    };
    let Some(now) = marks.last() else { return (Some(0), 0) };
    let from = at.base + at.len;
    if from >= now.base {
        return (None, from - now.base);
    }
    let rotated = std::fs::metadata(super::rotated_path(console_log)).map(|m| m.len()).unwrap_or(0);
    let rotated_start = now.base.saturating_sub(rotated);
    (Some(from.saturating_sub(rotated_start)), 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_find_where_a_time_starts_across_a_cut() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let mut m = Marker::open(&log);
        m.observe(10, 1_000);
        m.observe(20, 1_500); // Too soon: no mark.
        m.observe(30, 2_000);
        m.observe(30, 3_000); // No news: no mark.
        assert_eq!(read_marks(&times_path(&log)).len(), 2);
        assert_eq!(since(&log, 500), (Some(0), 0), "before every mark: all of it");
        assert_eq!(since(&log, 1_200), (None, 10));
        assert_eq!(since(&log, 5_000), (None, 30));
        // 40 bytes were moved out: 30 of them kept in console.log.1.
        std::fs::write(super::super::rotated_path(&log), [b'x'; 30]).unwrap();
        m.rotated(40, 6_000);
        m.observe(5, 7_000);
        assert_eq!(since(&log, 1_200), (Some(0), 0), "bytes 10..40: 10 of them are gone");
        assert_eq!(since(&log, 2_500), (Some(20), 0), "bytes 30..40 are the last 10 of the 30 kept");
        assert_eq!(since(&log, 6_500), (None, 0));
        assert_eq!(since(&log, 8_000), (None, 5));
        // A restarted daemon goes on from the last mark.
        let mut again = Marker::open(&log);
        again.observe(9, 9_000);
        assert_eq!(since(&log, 9_500), (None, 9));
    }

    #[test]
    fn bad_lines_are_skipped_and_the_file_stays_small() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        std::fs::write(times_path(&log), "garbage\n1 2\n-5 x 3\n1 2 3 4\n100 0 7\n").unwrap();
        assert_eq!(read_marks(&times_path(&log)), [Mark { at_ms: 100, base: 0, len: 7 }]);
        let mut m = Marker::open(&log);
        for i in 1..20_000u64 {
            m.observe(i, 1_000 * i as i64);
        }
        assert!(std::fs::metadata(times_path(&log)).unwrap().len() <= TIMES_CAP + 64);
        assert_eq!(since(&log, 1_000 * 19_999), (None, 19_999));
    }
}
