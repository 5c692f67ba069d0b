//! At-rest encryption: AES-256-GCM under a key-encryption key (KEK) that never enters the
//! database file. Each ciphertext is bound to its row by associated data.

use crate::{Result, StoreError};
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use std::path::Path;

/// The key-encryption key.
pub struct Kek {
    key: LessSafeKey,
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek(..)")
    }
}

impl Kek {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if bytes.len() != 32 {
            return Err(StoreError::Kek("must be 32 bytes".into()));
        }
        let unbound =
            UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| StoreError::Kek("invalid".into()))?;
        Ok(Self {
            key: LessSafeKey::new(unbound),
        })
    }

    /// Parse the base64 form (file content or env value).
    pub fn from_base64(text: &str) -> Result<Self> {
        let bytes = STANDARD
            .decode(text.trim())
            .map_err(|_| StoreError::Kek("not valid base64".into()))?;
        Self::from_bytes(&bytes)
    }

    /// Load the KEK from `path`, generating it (mode 0600) if the file does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::from_base64(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = [0u8; 32];
                aws_lc_rs::rand::fill(&mut bytes).map_err(|_| StoreError::Kek("rng".into()))?;
                write_private(path, STANDARD.encode(bytes).as_bytes())?;
                Self::from_bytes(&bytes)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Encrypt: `nonce || ciphertext || tag`.
    pub fn seal(&self, aad: &str, plaintext: &[u8]) -> Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| StoreError::Kek("rng".into()))?;
        let mut buf = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad.as_bytes()),
                &mut buf,
            )
            .map_err(|_| StoreError::Kek("seal".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        Ok(out)
    }

    pub fn open(&self, aad: &str, sealed: &[u8]) -> Result<Vec<u8>> {
        if sealed.len() < NONCE_LEN {
            return Err(StoreError::Decrypt);
        }
        let (n, ct) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(n).map_err(|_| StoreError::Decrypt)?;
        let mut buf = ct.to_vec();
        let pt = self
            .key
            .open_in_place(nonce, Aad::from(aad.as_bytes()), &mut buf)
            .map_err(|_| StoreError::Decrypt)?;
        Ok(pt.to_vec())
    }
}

/// Write a file readable only by its owner (0600), atomically.
pub fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts.open(&tmp)?;
    // a temp file left from before keeps its mode: set it on the open file
    #[cfg(unix)]
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_roundtrip_and_binding() {
        let kek = Kek::from_bytes(&[7u8; 32]).unwrap();
        let s = kek.seal("row1", b"secret").unwrap();
        assert_eq!(kek.open("row1", &s).unwrap(), b"secret");
        assert!(kek.open("row2", &s).is_err(), "bound to its row");
        let other = Kek::from_bytes(&[8u8; 32]).unwrap();
        assert!(other.open("row1", &s).is_err());
        assert!(kek.open("row1", &s[..5]).is_err());
        assert!(Kek::from_base64("short").is_err());
    }

    #[test]
    fn load_or_create_persists() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("kek");
        let a = Kek::load_or_create(&p).unwrap();
        let b = Kek::load_or_create(&p).unwrap();
        let s = a.seal("x", b"y").unwrap();
        assert_eq!(b.open("x", &s).unwrap(), b"y");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
    }
}
