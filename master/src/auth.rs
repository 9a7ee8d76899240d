//! The admin token: made at start unless configured, written to a file only
//! the master's user can read, and checked on every admin RPC.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clutch::admin::Gatekeeper;
use tonic::Status;

use crate::hub::Shared;

/// Why the token could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the admin token file {path}: {reason}")]
pub struct TokenFileError {
    /// The file.
    pub path: PathBuf,
    /// The OS's reason.
    pub reason: std::io::Error,
}

/// Writes `token` to `path` with mode 0600 (its folder 0700 if created),
/// replacing any older file.
pub fn write_token_file(path: &Path, token: &str) -> Result<(), TokenFileError> {
    let fail = |reason| TokenFileError {
        path: path.to_owned(),
        reason,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(fail)?;
    }
    // Remove first: an existing file keeps its old mode when truncated.
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(fail(e)),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(fail)?;
    file.write_all(format!("{token}\n").as_bytes())
        .map_err(fail)
}

/// Removes a token file, and its folder if that is now empty (the default
/// folder is one per master). Best effort: the master is exiting.
pub fn remove_token_file(path: &Path) {
    let _ = std::fs::remove_file(path);
    if let Some(dir) = path.parent() {
        let _ = std::fs::remove_dir(dir);
    }
}

/// The default token file: in `$XDG_RUNTIME_DIR` (private to the user) when
/// set, else the system temp folder, named after the master's pid.
pub fn default_token_file() -> PathBuf {
    let base = std::env::var_os("XDG_RUNTIME_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
    base.join(format!("clutch-{}", std::process::id()))
        .join("admin.token")
}

/// Checks bearer credentials against the admin token and the children's
/// secrets.
pub struct AdminGate {
    /// The admin token.
    token: String,
    /// To recognise a child's secret.
    shared: Arc<Shared>,
}

impl AdminGate {
    /// A gate for `token`.
    pub fn new(token: String, shared: Arc<Shared>) -> AdminGate {
        AdminGate { token, shared }
    }
}

impl Gatekeeper for AdminGate {
    fn check(&self, bearer: &str) -> Result<(), Status> {
        if crate::router::constant_time_eq(bearer.as_bytes(), self.token.as_bytes()) {
            return Ok(());
        }
        if self.shared.with_router(|r, _| r.is_child_secret(bearer)) {
            return Err(Status::permission_denied(
                "a child's secret cannot be used on admin RPCs: use the admin token",
            ));
        }
        Err(Status::unauthenticated("wrong admin token"))
    }
}
