//! The external effect of a charge: the [`EffectLog`] file that stands for
//! the card network call made outside the store's transaction (see "The
//! external effect" in the [`app`](crate::app) docs).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The demo's external effect: a file that every charge appends a line to
/// (its "card network call") before the ledger and the idempotency record
/// commit; see the [`app`](crate::app) docs.
#[derive(Clone, Debug)]
pub struct EffectLog {
    path: PathBuf,
    file: Arc<File>,
}

impl EffectLog {
    /// Opens `path` for appending (`O_APPEND`), creating it if absent; the
    /// lines already in it are kept.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            file: Arc::new(file),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `<tenant> <key> <payment id>\n` in one write and waits for
    /// it to reach the disk (`sync_data`). Tenants, keys and payment ids are
    /// visible ASCII without spaces, so a line splits into exactly three
    /// fields.
    pub(crate) async fn record(
        &self,
        tenant: &str,
        key: &str,
        payment_id: &str,
    ) -> std::io::Result<()> {
        let line = format!("{tenant} {key} {payment_id}\n");
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || {
            // `&File` writes; with O_APPEND each write lands at the end, so
            // concurrent lines do not interleave.
            (&*file).write_all(line.as_bytes())?;
            file.sync_data()
        })
        .await
        .map_err(std::io::Error::other)?
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[tokio::test]
    async fn the_effect_log_appends_one_line_per_call() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("effects.log");
        std::fs::write(&path, "acme k0 pay_0\n").unwrap();
        let log = EffectLog::open(&path).unwrap();
        log.record("acme", "k1", "pay_1").await.unwrap();
        log.record("globex", "k1", "pay_2").await.unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "acme k0 pay_0\nacme k1 pay_1\nglobex k1 pay_2\n"
        );
    }
}
