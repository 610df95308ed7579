//! Tools for files in a sandbox: read, write, edit, list, and copies between the host and a
//! sandbox (upload, download). All of them go through the daemon's file API.

use base64::Engine;
use futures_util::StreamExt;
use moat_api::{FileKind, MakeDir};
use rmcp::handler::server::wrapper::Parameters;
use rmcp::{tool, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;

use crate::edit;
use crate::error::{Checked, ToolError, ToolResult};
use crate::server::MoatMcp;

/// Most bytes `sandbox_file_read` returns at once.
const READ_LIMIT: usize = 256 << 10;
/// Largest file `sandbox_file_edit` works on.
const EDIT_LIMIT: u64 = 8 << 20;
/// Most entries `sandbox_file_list` returns.
const LIST_LIMIT: usize = 1000;

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadParams {
    /// The sandbox's name or id.
    pub sandbox: String,
    /// Absolute path of the file in the sandbox.
    pub path: String,
    /// First line to return (1-based). Default 1.
    #[serde(default)]
    pub offset: Option<usize>,
    /// How many lines to return. Default: up to 256 KiB of the file.
    #[serde(default)]
    pub limit: Option<usize>,
    /// "text" (default) or "base64" for binary files (the whole file, up to 256 KiB).
    #[serde(default)]
    pub encoding: Option<Encoding>,
}

/// How file contents travel in a tool call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Text,
    Base64,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteParams {
    /// The sandbox's name or id.
    pub sandbox: String,
    /// Absolute path of the file in the sandbox; missing parent directories are created. An
    /// existing file is replaced.
    pub path: String,
    /// The whole new content of the file.
    pub content: String,
    /// "text" (default), or "base64" when content is base64-encoded binary data.
    #[serde(default)]
    pub encoding: Option<Encoding>,
    /// Permission bits as an octal string, e.g. "755" for a script. Default "644".
    #[serde(default)]
    pub mode: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EditParams {
    /// The sandbox's name or id.
    pub sandbox: String,
    /// Absolute path of the text file in the sandbox.
    pub path: String,
    /// The exact text to replace, including whitespace and indentation; it must occur exactly
    /// once unless replace_all is set. Include enough surrounding lines to make it unique.
    pub old_string: String,
    /// The text to put in its place.
    pub new_string: String,
    /// Replace every occurrence instead of exactly one. Default false.
    #[serde(default)]
    pub replace_all: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// The sandbox's name or id.
    pub sandbox: String,
    /// Absolute path of a directory in the sandbox.
    pub path: String,
    /// List everything below it too. Default false.
    #[serde(default)]
    pub recursive: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UploadParams {
    /// File or directory on the host (relative paths are from the server's host directory).
    /// End it with "/." to copy what is inside a directory instead of the directory itself.
    pub host_path: String,
    /// The sandbox's name or id.
    pub sandbox: String,
    /// Absolute destination in the sandbox. An existing directory receives the copy under its
    /// own name; otherwise the copy is created with this name (its parent must exist).
    pub path: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DownloadParams {
    /// The sandbox's name or id.
    pub sandbox: String,
    /// Absolute path of a file or directory in the sandbox.
    pub path: String,
    /// Destination on the host (relative paths are from the server's host directory). An
    /// existing directory receives the copy under its own name; otherwise the copy is created
    /// with this name (its parent must exist).
    pub host_path: String,
}

fn kind_letter(kind: FileKind) -> char {
    match kind {
        FileKind::File => '-',
        FileKind::Dir => 'd',
        FileKind::Symlink => 'l',
        FileKind::Other => '?',
    }
}

fn absolute(path: &str) -> Result<(), ToolError> {
    if path.starts_with('/') {
        Ok(())
    } else {
        Err(ToolError::invalid(format!(
            "{path:?} is not an absolute path; paths in a sandbox start with /, e.g. /root/{path}"
        )))
    }
}

fn parse_mode(mode: &str) -> Result<u32, ToolError> {
    u32::from_str_radix(mode.trim_start_matches("0o"), 8).ok().filter(|m| *m <= 0o7777).ok_or_else(|| {
        ToolError::invalid(format!("mode {mode:?} is not octal permission bits; write e.g. \"644\" or \"755\""))
    })
}

impl MoatMcp {
    /// Up to `max` bytes of a file, and whether there was more.
    async fn read_prefix(&self, id: &str, path: &str, max: u64) -> Result<(Vec<u8>, bool), ToolError> {
        let mut stream = Box::pin(self.client.read_file(id, path).await?.into_stream());
        let mut data = Vec::new();
        while let Some(chunk) = stream.next().await {
            data.extend_from_slice(&chunk?);
            if data.len() as u64 > max {
                data.truncate(max as usize);
                return Ok((data, true));
            }
        }
        Ok((data, false))
    }

    async fn write_bytes(&self, id: &str, path: &str, data: Vec<u8>, mode: Option<u32>) -> Result<(), ToolError> {
        self.client.write_file(id, path, mode, true, std::io::Cursor::new(data)).await?;
        Ok(())
    }
}

#[tool_router(router = file_tools, vis = "pub(crate)")]
impl MoatMcp {
    #[tool(
        description = "Read a file in a sandbox. Text comes back as it is (no line numbers added); use offset and \
limit (lines) for parts of long files. Binary files need encoding \"base64\".",
        annotations(title = "Read file", read_only_hint = true, open_world_hint = false)
    )]
    async fn sandbox_file_read(&self, Parameters(Checked(p)): Parameters<Checked<ReadParams>>) -> ToolResult {
        absolute(&p.path)?;
        let info = self.sandbox(&p.sandbox).await?;
        if p.encoding == Some(Encoding::Base64) {
            let (data, more) = self.read_prefix(&info.id, &p.path, READ_LIMIT as u64).await?;
            if more {
                return Err(ToolError::new(
                    format!("{} is larger than {READ_LIMIT} bytes", p.path),
                    "copy it to the host with sandbox_download, or process it in the sandbox with sandbox_exec",
                ));
            }
            return Ok(base64::engine::general_purpose::STANDARD.encode(data));
        }
        let first = p.offset.unwrap_or(1).max(1);
        let limit = p.limit.unwrap_or(usize::MAX).max(1);
        let mut stream = Box::pin(self.client.read_file(&info.id, &p.path).await?.into_stream());
        // Stream through the file: skip to the first line, keep lines until the limit or cap.
        let (mut line, mut kept, mut total) = (1usize, Vec::new(), 0u64);
        let mut cut = false;
        'read: while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            total += chunk.len() as u64;
            for &b in chunk.iter() {
                if line >= first {
                    if line >= first.saturating_add(limit) {
                        cut = true;
                        break 'read;
                    }
                    if kept.len() >= READ_LIMIT {
                        cut = true;
                        break 'read;
                    }
                    kept.push(b);
                }
                if b == b'\n' {
                    line += 1;
                }
            }
        }
        drop(stream);
        if kept.contains(&0) {
            return Err(ToolError::new(
                format!("{} looks like a binary file", p.path),
                "read it with encoding \"base64\", or copy it to the host with sandbox_download",
            ));
        }
        let mut text = String::from_utf8_lossy(&kept).into_owned();
        if total == 0 {
            return Ok(format!("({} is empty)", p.path));
        }
        if kept.is_empty() {
            return Ok(format!("({} has fewer than {first} lines)", p.path));
        }
        if cut {
            let last = first + text.lines().count() - 1;
            text.push_str(&format!(
                "\n[moat: showed lines {first}-{last}; more follows: read on with offset {}]",
                last + 1
            ));
        }
        Ok(text)
    }

    #[tool(
        description = "Create or replace a file in a sandbox with the given content (missing parent directories \
are created). For changes to part of an existing file use sandbox_file_edit.",
        annotations(title = "Write file", destructive_hint = true, idempotent_hint = true, open_world_hint = false)
    )]
    async fn sandbox_file_write(&self, Parameters(Checked(p)): Parameters<Checked<WriteParams>>) -> ToolResult {
        absolute(&p.path)?;
        let mode = p.mode.as_deref().map(parse_mode).transpose()?;
        let data = match p.encoding.unwrap_or(Encoding::Text) {
            Encoding::Text => p.content.into_bytes(),
            Encoding::Base64 => base64::engine::general_purpose::STANDARD
                .decode(p.content.trim())
                .map_err(|e| ToolError::invalid(format!("content is not valid base64: {e}")))?,
        };
        let info = self.sandbox(&p.sandbox).await?;
        if let Some(parent) = std::path::Path::new(&p.path).parent().filter(|d| d != &std::path::Path::new("/")) {
            let mkdir = MakeDir { path: parent.display().to_string(), parents: true, mode: None, owner: None };
            self.client.mkdir(&info.id, &mkdir).await?;
        }
        let n = data.len();
        self.write_bytes(&info.id, &p.path, data, mode).await?;
        Ok(format!("wrote {n} bytes to {}", p.path))
    }

    #[tool(
        description = "Edit a text file in a sandbox by replacing an exact string: old_string must match the file \
exactly (whitespace and indentation included) and occur once, unless replace_all is set. Fails without changing \
anything when the string is missing or not unique. Returns the changed lines.",
        annotations(title = "Edit file", destructive_hint = true, open_world_hint = false)
    )]
    async fn sandbox_file_edit(&self, Parameters(Checked(p)): Parameters<Checked<EditParams>>) -> ToolResult {
        absolute(&p.path)?;
        let info = self.sandbox(&p.sandbox).await?;
        let stat = self.client.stat(&info.id, &p.path).await?;
        if stat.kind != FileKind::File {
            return Err(ToolError::invalid(format!("{} is not a regular file", p.path)));
        }
        if stat.size > EDIT_LIMIT {
            return Err(ToolError::new(
                format!(
                    "{} is {} bytes, larger than the {EDIT_LIMIT} bytes sandbox_file_edit works on",
                    p.path, stat.size
                ),
                "change it with a command instead (sandbox_exec with sed or a script)",
            ));
        }
        let (data, _) = self.read_prefix(&info.id, &p.path, EDIT_LIMIT).await?;
        let text = String::from_utf8(data).map_err(|_| {
            ToolError::new(
                format!("{} is not UTF-8 text", p.path),
                "edit binary files with a command (sandbox_exec), or replace them with sandbox_file_write",
            )
        })?;
        let edited = edit::replace(&text, &p.path, &p.old_string, &p.new_string, p.replace_all)?;
        self.write_bytes(&info.id, &p.path, edited.text.clone().into_bytes(), Some(stat.mode & 0o7777)).await?;
        Ok(format!(
            "replaced {} occurrence{} in {}; around the first one now:\n{}",
            edited.replaced,
            if edited.replaced == 1 { "" } else { "s" },
            p.path,
            edit::excerpt(&edited.text, edited.first_at, 3)
        ))
    }

    #[tool(
        description = "List a directory in a sandbox: type (d directory, - file, l symlink), permissions, size and path of each entry.",
        annotations(title = "List directory", read_only_hint = true, open_world_hint = false)
    )]
    async fn sandbox_file_list(&self, Parameters(Checked(p)): Parameters<Checked<ListParams>>) -> ToolResult {
        absolute(&p.path)?;
        let info = self.sandbox(&p.sandbox).await?;
        let listing = self.client.list_dir(&info.id, &p.path, p.recursive).await?;
        if listing.entries.is_empty() {
            return Ok(format!("{} is empty", p.path));
        }
        let mut out = String::new();
        for f in listing.entries.iter().take(LIST_LIMIT) {
            let target = f.target.as_deref().map(|t| format!(" -> {t}")).unwrap_or_default();
            out.push_str(&format!(
                "{} {:04o} {:>10} {}{target}\n",
                kind_letter(f.kind),
                f.mode & 0o7777,
                f.size,
                f.path
            ));
        }
        if listing.entries.len() > LIST_LIMIT {
            out.push_str(&format!(
                "[moat: {} more entries not shown; list a subdirectory]\n",
                listing.entries.len() - LIST_LIMIT
            ));
        }
        Ok(out)
    }

    #[tool(
        description = "Copy a file or directory tree from the host into a sandbox (modes and symlinks kept). Only \
host paths the operator allowed can be read.",
        annotations(title = "Upload to sandbox", destructive_hint = true, open_world_hint = false)
    )]
    async fn sandbox_upload(&self, Parameters(Checked(p)): Parameters<Checked<UploadParams>>) -> ToolResult {
        absolute(&p.path)?;
        let src = self.policy.host_files.resolve(&p.host_path, self.policy.flags)?;
        let info = self.sandbox(&p.sandbox).await?;
        self.client.copy_to_sandbox(&src, &info.id, &p.path).await?;
        Ok(format!("copied {src} to {}:{}", info.name, p.path))
    }

    #[tool(
        description = "Copy a file or directory tree from a sandbox to the host (symlinks kept; modes kept without \
setuid, setgid or group/other write). Only host paths the operator allowed can be written.",
        annotations(title = "Download from sandbox", destructive_hint = true, open_world_hint = false)
    )]
    async fn sandbox_download(&self, Parameters(Checked(p)): Parameters<Checked<DownloadParams>>) -> ToolResult {
        absolute(&p.path)?;
        let dest = self.policy.host_files.resolve(&p.host_path, self.policy.flags)?;
        let info = self.sandbox(&p.sandbox).await?;
        self.client.copy_from_sandbox(&info.id, &p.path, &dest).await?;
        Ok(format!("copied {}:{} to {dest}", info.name, p.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_are_octal() {
        assert_eq!(parse_mode("755").unwrap(), 0o755);
        assert_eq!(parse_mode("0644").unwrap(), 0o644);
        assert_eq!(parse_mode("0o600").unwrap(), 0o600);
        assert!(parse_mode("rwx").is_err() && parse_mode("99").is_err() && parse_mode("77777").is_err());
    }

    #[test]
    fn sandbox_paths_are_absolute() {
        assert!(absolute("/root/a").is_ok());
        let e = absolute("a.txt").unwrap_err();
        assert!(e.message.contains("/root/a.txt"), "{e}");
    }
}
