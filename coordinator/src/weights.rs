//! Trained weights kept for downstream evaluations: one file per attempt,
//! `<dir>/<attempt>.safetensors`, written by `WorkService.UploadWeights` and read by
//! `FetchWeights`.
//!
//! A file is keyed by the attempt that trained it, so an upload from a fenced-out attempt
//! never replaces the weights of the attempt whose result counts; downloads read the file of
//! the parent trial's *result* attempt. An upload is written to a temporary name, checked
//! against the size and SHA-256 its first chunk announced, synced, then renamed into place:
//! a crash or a bad upload never leaves a partial file under the final name.

use std::path::{Path, PathBuf};

use deepmad_design::digest::Sha256Hex;
use tokio::io::AsyncWriteExt;

use crate::error::Error;
use crate::model::AttemptId;

/// Largest weights file accepted (a ResNet-50 checkpoint with momentum is about 200 MB).
pub const MAX_WEIGHTS_BYTES: u64 = 4 << 30;

/// The directory of weights files.
#[derive(Clone, Debug)]
pub struct WeightStore {
    dir: PathBuf,
}

impl WeightStore {
    pub fn new(dir: impl Into<PathBuf>) -> WeightStore {
        WeightStore { dir: dir.into() }
    }

    /// Returns where `attempt`'s weights are (or would be) kept.
    pub fn path(&self, attempt: AttemptId) -> PathBuf {
        self.dir.join(format!("{attempt}.safetensors"))
    }

    /// Starts an upload of `total_bytes` bytes whose SHA-256 is `sha256` (lowercase hex).
    pub async fn begin(
        &self,
        attempt: AttemptId,
        total_bytes: u64,
        sha256: &str,
        limit: u64,
    ) -> Result<Upload, Error> {
        let most = limit.min(MAX_WEIGHTS_BYTES);
        if total_bytes == 0 || total_bytes > most {
            return Err(Error::InvalidArgument {
                field: "total_bytes".into(),
                reason: format!("must be 1 to {most} bytes for this design, got {total_bytes}"),
            });
        }
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::InvalidArgument {
                field: "sha256".into(),
                reason: "must be 64 hex digits".into(),
            });
        }
        tokio::fs::create_dir_all(&self.dir)
            .await
            .map_err(|error| io_error(&self.dir, error))?;
        let temporary = self
            .dir
            .join(format!("{attempt}.{}.partial", uuid::Uuid::new_v4()));
        let file = tokio::fs::File::create(&temporary)
            .await
            .map_err(|error| io_error(&temporary, error))?;
        Ok(Upload {
            file,
            temporary,
            target: self.path(attempt),
            expected_bytes: total_bytes,
            expected_sha256: sha256.to_ascii_lowercase(),
            written: 0,
            hasher: Sha256Hex::new(),
        })
    }
}

/// An upload in progress. Dropping it without [`Upload::finish`] leaves a `.partial` file,
/// which [`Upload::abort`] removes.
#[derive(Debug)]
pub struct Upload {
    file: tokio::fs::File,
    temporary: PathBuf,
    target: PathBuf,
    expected_bytes: u64,
    expected_sha256: String,
    written: u64,
    hasher: Sha256Hex,
}

impl Upload {
    /// Appends a chunk; more bytes than announced is an error.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), Error> {
        self.written += data.len() as u64;
        if self.written > self.expected_bytes {
            return Err(Error::InvalidArgument {
                field: "data".into(),
                reason: format!("more than the announced {} bytes", self.expected_bytes),
            });
        }
        self.hasher.update(data);
        self.file
            .write_all(data)
            .await
            .map_err(|error| io_error(&self.temporary, error))
    }

    /// Checks size and hash, syncs and renames the file into place; returns its size.
    pub async fn finish(mut self) -> Result<u64, Error> {
        if self.written != self.expected_bytes {
            let reason = format!(
                "the upload ended after {} of the announced {} bytes",
                self.written, self.expected_bytes
            );
            self.abort().await;
            return Err(Error::InvalidArgument {
                field: "data".into(),
                reason,
            });
        }
        let digest = std::mem::take(&mut self.hasher).finish();
        if digest != self.expected_sha256 {
            let reason = format!(
                "SHA-256 of the data is {digest}, the first chunk announced {}",
                self.expected_sha256
            );
            self.abort().await;
            return Err(Error::InvalidArgument {
                field: "sha256".into(),
                reason,
            });
        }
        self.file
            .sync_all()
            .await
            .map_err(|error| io_error(&self.temporary, error))?;
        tokio::fs::rename(&self.temporary, &self.target)
            .await
            .map_err(|error| io_error(&self.target, error))?;
        Ok(self.written)
    }

    /// Removes the temporary file.
    pub async fn abort(self) {
        drop(self.file);
        let _ = tokio::fs::remove_file(&self.temporary).await;
    }
}

/// Returns the SHA-256 of a file in hex and its size.
pub async fn file_digest(path: &Path) -> Result<(String, u64), Error> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::open(&path).map_err(|error| io_error(&path, error))?;
        let mut hasher = Sha256Hex::new();
        let size = std::io::copy(&mut file, &mut hasher).map_err(|error| io_error(&path, error))?;
        Ok((hasher.finish(), size))
    })
    .await
    .map_err(|error| Error::Internal(format!("digest task: {error}")))?
}

fn io_error(path: &Path, error: std::io::Error) -> Error {
    Error::Internal(format!("weights file {}: {error}", path.display()))
}

#[cfg(test)]
mod tests {
    use deepmad_design::digest::sha256_hex as sha;

    use super::*;

    #[tokio::test]
    async fn an_upload_lands_only_when_size_and_hash_match() {
        let dir = tempfile::tempdir().unwrap();
        let store = WeightStore::new(dir.path());
        let attempt = AttemptId::new();
        let data = b"weights of a trained backbone".to_vec();

        let mut upload = store
            .begin(attempt, data.len() as u64, &sha(&data), MAX_WEIGHTS_BYTES)
            .await
            .unwrap();
        upload.write(&data[..7]).await.unwrap();
        upload.write(&data[7..]).await.unwrap();
        assert_eq!(upload.finish().await.unwrap(), data.len() as u64);
        assert_eq!(std::fs::read(store.path(attempt)).unwrap(), data);

        // A corrupted upload for another attempt: refused, nothing left behind.
        let other = AttemptId::new();
        let mut upload = store
            .begin(other, data.len() as u64, &sha(&data), MAX_WEIGHTS_BYTES)
            .await
            .unwrap();
        let mut corrupted = data.clone();
        corrupted[0] ^= 1;
        upload.write(&corrupted).await.unwrap();
        let error = upload.finish().await.unwrap_err();
        assert!(error.to_string().contains("SHA-256"), "{error}");
        assert!(!store.path(other).exists());
        // A short upload is refused too; and a long one at the first extra byte.
        let mut upload = store
            .begin(other, data.len() as u64, &sha(&data), MAX_WEIGHTS_BYTES)
            .await
            .unwrap();
        upload.write(&data[..3]).await.unwrap();
        assert!(upload.finish().await.is_err());
        let mut upload = store
            .begin(other, 3, &sha(&data[..3]), MAX_WEIGHTS_BYTES)
            .await
            .unwrap();
        assert!(upload.write(&data[..4]).await.is_err());
        upload.abort().await;
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "only the finished file remains: {left:?}");
        assert_eq!(
            file_digest(&store.path(attempt)).await.unwrap(),
            (sha(&data), data.len() as u64)
        );
    }
}
