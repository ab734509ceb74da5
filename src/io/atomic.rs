//! Write-then-rename: every file medgen writes (weights, PNGs, volumes, JSON, logs) goes to a sibling temporary
//! file first and is renamed over its destination when complete, so a reader, or a run resumed after a kill, never
//! sees half a file.
use anyhow::{anyhow, Context, Result};
use std::path::{Path, PathBuf};

/// `.tmp-<pid>-<name>` next to `path`: unique per process, and hidden.
pub fn temporary_path(path: &Path) -> Result<PathBuf> {
    let name =
        path.file_name().and_then(|n| n.to_str()).ok_or_else(|| anyhow!("{}: not a file name", path.display()))?;
    Ok(path.with_file_name(format!(".tmp-{}-{name}", std::process::id())))
}

/// Creates `path`'s folder, calls `write` on a temporary path, and renames the result to `path`; on an error the
/// temporary file is removed and `path` is left as it was.
pub fn write_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let tmp = temporary_path(path)?;
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
}

/// `write_with` for bytes.
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(path, |tmp| std::fs::write(tmp, bytes).with_context(|| format!("cannot write {}", tmp.display())))
}
