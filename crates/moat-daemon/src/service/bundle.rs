//! Support bundles (`moat doctor --bundle`): the daemon's log, the versions, and each chosen
//! sandbox's record, lifecycle, events, console and QEMU logs, in one gzipped tar. Built here
//! because the daemon alone knows every value that must not leave with it: the API token, the
//! sandboxes' secret values and their environment values. Each is replaced in every file.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use moat_api::{CreateBundle, ErrorCode, Event, SandboxInfo, MAX_BUNDLE_SANDBOXES};
use serde::Serialize;

use super::Service;
use crate::error::ServiceError;

/// What stands in for a secret value.
const REDACTED: &str = "[REDACTED]";
/// Shorter values are not looked for: they would blank ordinary words and numbers all over.
const MIN_SECRET: usize = 4;
/// Each log keeps at most its last this many bytes.
const LOG_TAIL: u64 = 8 << 20;
/// The files of one bundle, before compression; what does not fit is listed as left out.
const MAX_BUNDLE: u64 = 64 << 20;
/// The newest events kept.
const MAX_EVENTS: usize = 100_000;
/// Events read from the database at a time.
const EVENT_BATCH: usize = 1000;

impl Service {
    /// A support bundle (gzipped tar) of `req.sandboxes` (every sandbox when none is named), with
    /// every known secret value replaced by `[REDACTED]`.
    pub async fn bundle(self: &Arc<Self>, req: CreateBundle) -> Result<Vec<u8>, ServiceError> {
        if req.sandboxes.len() > MAX_BUNDLE_SANDBOXES {
            return Err(ServiceError::invalid(format!(
                "a bundle takes at most {MAX_BUNDLE_SANDBOXES} sandboxes; name fewer, or none for all"
            )));
        }
        let all = self.db(|db| db.list())?;
        let mut chosen: Vec<SandboxInfo> = Vec::new();
        if req.sandboxes.is_empty() {
            chosen.clone_from(&all);
        } else {
            for reference in &req.sandboxes {
                let info = self.resolve(reference)?;
                if !chosen.iter().any(|c| c.id == info.id) {
                    chosen.push(info);
                }
            }
        }
        let redactor = Redactor::new(self.secret_values(&all));
        let events = self.all_events()?;
        let mut sandboxes = Vec::new();
        for info in chosen {
            let lifecycle = self.db(|db| db.lifecycle(&info.id))?;
            let dir = self.run_dir(&info.id);
            sandboxes.push(SandboxPart { info, lifecycle: serde_json::to_value(lifecycle).unwrap_or_default(), dir });
        }
        let home = self.rt.config.home.clone();
        let versions = self.versions();
        tokio::task::spawn_blocking(move || {
            let mut b = Bundle::new(redactor);
            b.json("doctor.json", &req.doctor);
            b.json("config.json", &req.config);
            b.json("versions.json", &versions);
            for log in ["daemon.log", "daemon.log.1"] {
                b.log(log, &[home.join(log)]);
            }
            b.events("events.ndjson", events.iter());
            for s in &sandboxes {
                s.add_to(&mut b, &events);
            }
            b.finish()
        })
        .await
        .map_err(|e| ServiceError::internal(format!("building the bundle failed: {e}")))?
        .map_err(|e| {
            ServiceError::new(
                ErrorCode::Internal,
                format!("writing the bundle failed: {e}"),
                "see the daemon log; check the free memory of the host",
            )
        })
    }

    /// Every value the daemon holds that must stay out of a bundle: the API token, and each
    /// sandbox's environment and secret values.
    fn secret_values(&self, all: &[SandboxInfo]) -> Vec<String> {
        let mut values = Vec::new();
        if let Ok(token) = std::fs::read_to_string(self.rt.config.home.join("token")) {
            // The E2B API key is `e2b_<token>`: it goes with the token.
            values.push(token.trim().to_string());
        }
        for info in all {
            values.extend(info.env.iter().map(|(_, v)| v.clone()));
            if !info.net.secrets.is_empty() {
                let mut net = info.net.clone();
                if self.fill_secrets(info, &mut net).is_ok() {
                    values.extend(net.secrets.into_iter().filter_map(|s| s.value));
                }
            }
        }
        values
    }

    /// The newest [`MAX_EVENTS`] events, oldest first.
    fn all_events(&self) -> Result<Vec<Event>, ServiceError> {
        let mut kept = std::collections::VecDeque::new();
        let mut seq = 0;
        loop {
            let batch = self.db(|db| db.events_after(seq, EVENT_BATCH))?;
            let Some(last) = batch.last().map(|e| e.seq) else { break };
            seq = last;
            kept.extend(batch);
            while kept.len() > MAX_EVENTS {
                kept.pop_front();
            }
        }
        Ok(kept.into())
    }

    fn versions(&self) -> serde_json::Value {
        let uname = rustix::system::uname();
        serde_json::json!({
            "moat": env!("CARGO_PKG_VERSION"),
            "daemon_pid": std::process::id(),
            "qemu": self.rt.qemu_version,
            "qemu_path": self.rt.qemu.display().to_string(),
            "guest_kernel": self.rt.kernel.release,
            "guest_kernel_path": self.rt.kernel.path.display().to_string(),
            "host_kernel": format!(
                "{} {} {}",
                uname.release().to_string_lossy(),
                uname.version().to_string_lossy(),
                uname.machine().to_string_lossy()
            ),
            "accel": self.rt.accel.accel.to_string(),
            "accel_reason": self.rt.accel.reason,
        })
    }
}

/// What one sandbox puts into a bundle, gathered before the archive is written.
struct SandboxPart {
    info: SandboxInfo,
    lifecycle: serde_json::Value,
    dir: PathBuf,
}

impl SandboxPart {
    fn add_to(&self, b: &mut Bundle, events: &[Event]) {
        let base = format!("sandboxes/{}", self.info.name);
        let mut info = self.info.clone();
        for (_, value) in &mut info.env {
            *value = REDACTED.to_string();
        }
        for secret in &mut info.net.secrets {
            secret.value = None;
        }
        b.json(&format!("{base}/info.json"), &info);
        b.json(&format!("{base}/lifecycle.json"), &self.lifecycle);
        let own = |e: &&Event| e.sandbox.as_deref().is_some_and(|s| s == self.info.id || s == self.info.name);
        b.events(&format!("{base}/events.ndjson"), events.iter().filter(own));
        let console = self.dir.join(moat_vmm::run_files::CONSOLE_LOG);
        // The console's earlier part (moved aside at its cap) first.
        b.log(&format!("{base}/console.log"), &[moat_vmm::rotated_console_log(&console), console]);
        b.log(&format!("{base}/qemu.log"), &[self.dir.join(moat_vmm::run_files::QEMU_LOG)]);
    }
}

/// Replaces every known secret value in bytes, in one pass.
struct Redactor {
    /// The values (and their JSON-escaped forms) by their first byte, longest first, so that a
    /// value containing another is replaced whole.
    by_first: Vec<Vec<Vec<u8>>>,
    count: usize,
}

impl Redactor {
    fn new(values: Vec<String>) -> Redactor {
        let mut by_first = vec![Vec::new(); 256];
        let mut count = 0;
        for value in values.into_iter().filter(|v| v.len() >= MIN_SECRET) {
            // In JSON files (and debug-formatted log lines) a value with quotes, backslashes or
            // control characters is written escaped.
            let escaped = serde_json::to_string(&value).expect("a string serializes");
            let escaped = escaped[1..escaped.len() - 1].to_string();
            for form in [value, escaped] {
                let bucket: &mut Vec<Vec<u8>> = &mut by_first[usize::from(form.as_bytes()[0])];
                if !bucket.iter().any(|b| b == form.as_bytes()) {
                    bucket.push(form.into_bytes());
                    count += 1;
                }
            }
        }
        for bucket in &mut by_first {
            bucket.sort_by_key(|b| std::cmp::Reverse(b.len()));
        }
        Redactor { by_first, count }
    }

    fn redact(&self, data: &[u8]) -> Vec<u8> {
        if self.count == 0 {
            return data.to_vec();
        }
        let mut out = Vec::with_capacity(data.len());
        let mut i = 0;
        while i < data.len() {
            let rest = &data[i..];
            match self.by_first[usize::from(rest[0])].iter().find(|v| rest.starts_with(v)) {
                Some(v) => {
                    out.extend_from_slice(REDACTED.as_bytes());
                    i += v.len();
                }
                None => {
                    out.push(rest[0]);
                    i += 1;
                }
            }
        }
        out
    }
}

/// One file's place in `manifest.json`.
#[derive(Serialize)]
struct Entry {
    path: String,
    bytes: u64,
    /// Only the end of the log is in (it was longer than the cap).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    cut: bool,
}

#[derive(Serialize)]
struct LeftOut {
    path: String,
    why: String,
}

#[derive(Serialize, Default)]
struct Manifest {
    created_at: i64,
    files: Vec<Entry>,
    left_out: Vec<LeftOut>,
}

/// The files of a bundle, redacted and counted against [`MAX_BUNDLE`] as they come.
struct Bundle {
    redactor: Redactor,
    files: Vec<(String, Vec<u8>)>,
    manifest: Manifest,
    size: u64,
}

impl Bundle {
    fn new(redactor: Redactor) -> Bundle {
        let manifest = Manifest { created_at: crate::state::now_secs(), ..Manifest::default() };
        Bundle { redactor, files: Vec::new(), manifest, size: 0 }
    }

    fn add(&mut self, path: &str, data: &[u8], cut: bool) {
        let data = self.redactor.redact(data);
        let len = data.len() as u64;
        if self.size + len > MAX_BUNDLE {
            let why = format!("the bundle's {} MiB were full", MAX_BUNDLE >> 20);
            self.manifest.left_out.push(LeftOut { path: path.to_string(), why });
            return;
        }
        self.size += len;
        self.manifest.files.push(Entry { path: path.to_string(), bytes: len, cut });
        self.files.push((path.to_string(), data));
    }

    fn json(&mut self, path: &str, value: &impl Serialize) {
        let mut text = serde_json::to_vec_pretty(value).expect("bundle parts always serialize");
        text.push(b'\n');
        self.add(path, &text, false);
    }

    fn events<'a>(&mut self, path: &str, events: impl Iterator<Item = &'a Event>) {
        let mut text = Vec::new();
        for e in events {
            serde_json::to_writer(&mut text, e).expect("events always serialize");
            text.push(b'\n');
        }
        let cut = cut_to_tail(&mut text, LOG_TAIL);
        self.add(path, &text, cut);
    }

    /// The end of a log kept in several files, oldest first; absent files are skipped, and
    /// left out altogether when none is there.
    fn log(&mut self, path: &str, parts: &[PathBuf]) {
        let mut data = Vec::new();
        let mut cut = false;
        let mut found = false;
        for part in parts.iter().rev() {
            let room = LOG_TAIL.saturating_sub(data.len() as u64);
            if room == 0 {
                cut = true;
                break;
            }
            match read_tail(part, room) {
                Ok((mut tail, c)) => {
                    found = true;
                    cut |= c;
                    tail.extend_from_slice(&data);
                    data = tail;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    let why = format!("reading {} failed: {e}", part.display());
                    self.manifest.left_out.push(LeftOut { path: path.to_string(), why });
                    return;
                }
            }
        }
        if !found {
            self.manifest.left_out.push(LeftOut { path: path.to_string(), why: "no such log".into() });
            return;
        }
        if cut {
            drop_partial_line(&mut data);
        }
        self.add(path, &data, cut);
    }

    /// The gzipped tar: every file under one top directory, and the manifest last.
    fn finish(mut self) -> std::io::Result<Vec<u8>> {
        let top = format!("moat-bundle-{}", self.manifest.created_at);
        let manifest = serde_json::to_vec_pretty(&self.manifest).expect("the manifest serializes");
        self.files.push(("manifest.json".into(), manifest));
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        let mut tar = tar::Builder::new(gz);
        let mtime = u64::try_from(self.manifest.created_at).unwrap_or(0);
        for (path, data) in &self.files {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(data.len() as u64);
            header.set_mode(0o600);
            header.set_mtime(mtime);
            tar.append_data(&mut header, format!("{top}/{path}"), data.as_slice())?;
        }
        let mut gz = tar.into_inner()?;
        gz.flush()?;
        gz.finish()
    }
}

/// The last `limit` bytes of a file, and whether it was longer.
fn read_tail(path: &Path, limit: u64) -> std::io::Result<(Vec<u8>, bool)> {
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let cut = len > limit;
    if cut {
        file.seek(SeekFrom::Start(len - limit))?;
    }
    let mut data = Vec::new();
    file.take(limit).read_to_end(&mut data)?;
    Ok((data, cut))
}

/// Keep the last `limit` bytes; whether any went.
fn cut_to_tail(data: &mut Vec<u8>, limit: u64) -> bool {
    let Some(over) = (data.len() as u64).checked_sub(limit).filter(|o| *o > 0) else { return false };
    data.drain(..over as usize);
    drop_partial_line(data);
    true
}

/// A log cut at a byte offset starts mid-line, perhaps mid-secret where only its end is left for
/// the redactor to miss: start at the next whole line.
fn drop_partial_line(data: &mut Vec<u8>) {
    match data.iter().position(|&b| b == b'\n') {
        Some(i) => {
            data.drain(..=i);
        }
        None => data.clear(),
    }
    let mut marked =
        format!("[moat: earlier lines left out (each log keeps its last {} MiB)]\n", LOG_TAIL >> 20).into_bytes();
    marked.append(data);
    *data = marked;
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// The files of a bundle by path below its top directory.
    fn unpack(gz: &[u8]) -> BTreeMap<String, Vec<u8>> {
        let mut files = BTreeMap::new();
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(gz));
        for entry in archive.entries().expect("a tar") {
            let mut entry = entry.expect("an entry");
            let path = entry.path().expect("a path").to_string_lossy().into_owned();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).expect("readable");
            let path = path.split_once('/').map(|(_, p)| p.to_string()).unwrap_or(path);
            files.insert(path, data);
        }
        files
    }

    fn contains(hay: &[u8], needle: &str) -> bool {
        hay.windows(needle.len()).any(|w| w == needle.as_bytes())
    }

    #[test]
    fn every_form_of_a_value_is_redacted_and_short_ones_are_left() {
        let r = Redactor::new(vec!["s3cr\"et".into(), "abc".into(), "tok123".into(), "tok1234567".into()]);
        let out = r.redact(b"a s3cr\"et, in json s3cr\\\"et, tok1234567 and tok123; abc stays");
        let out = String::from_utf8(out).unwrap();
        assert_eq!(out, "a [REDACTED], in json [REDACTED], [REDACTED] and [REDACTED]; abc stays");
        assert_eq!(Redactor::new(Vec::new()).redact(b"as is"), b"as is");
    }

    #[test]
    fn a_cut_log_starts_at_a_whole_line() {
        let mut data = b"secret-tail-of-a-line\nsecond\nthird\n".to_vec();
        assert!(cut_to_tail(&mut data, 20));
        let text = String::from_utf8(data).unwrap();
        assert!(text.ends_with("\nsecond\nthird\n") && !text.contains("a-line"), "{text}");
        let mut short = b"short\n".to_vec();
        assert!(!cut_to_tail(&mut short, 20));
        assert_eq!(short, b"short\n");
    }

    #[test]
    fn a_bundle_lists_its_files_and_what_did_not_fit() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("daemon.log");
        std::fs::write(&log, b"started with token tok-0123456789\n").unwrap();
        let mut b = Bundle::new(Redactor::new(vec!["tok-0123456789".into()]));
        b.json("doctor.json", &serde_json::json!({"checks": []}));
        b.log("daemon.log", &[log]);
        b.log("missing.log", &[dir.path().join("none")]);
        b.size = MAX_BUNDLE - 3;
        b.add("big.txt", b"0123456789", false);
        let files = unpack(&b.finish().unwrap());
        assert!(contains(&files["daemon.log"], "[REDACTED]") && !contains(&files["daemon.log"], "0123456789"));
        assert!(files.contains_key("doctor.json") && !files.contains_key("big.txt"));
        let manifest: serde_json::Value = serde_json::from_slice(&files["manifest.json"]).unwrap();
        let left: Vec<&str> =
            manifest["left_out"].as_array().unwrap().iter().map(|l| l["path"].as_str().unwrap()).collect();
        assert_eq!(left, ["missing.log", "big.txt"]);
    }
}
