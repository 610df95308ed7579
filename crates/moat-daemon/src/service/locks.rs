//! Locks made on demand, one per key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// One async lock per key (a sandbox id, a template key, an image name), made on first use.
#[derive(Default)]
pub(crate) struct KeyedLocks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl KeyedLocks {
    /// The lock of `key`.
    pub(crate) fn of(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.0.lock().expect("no panics while held").entry(key.to_string()).or_default().clone()
    }

    /// Drop the lock of a key that is gone (holders keep theirs).
    pub(crate) fn forget(&self, key: &str) {
        self.0.lock().expect("no panics while held").remove(key);
    }
}
