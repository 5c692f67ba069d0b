//! Instance metadata, sealed blobs (CA and TLS keys) and token signing keys.

#[allow(unused_imports)]
use crate::store::{json, lower, parse};
#[allow(unused_imports)]
use crate::*;

impl Tx {
    pub async fn get_meta(&mut self, key: &str) -> Result<Option<String>> {
        todo!("port get_meta")
    }

    pub async fn set_meta(&mut self, key: &str, value: &str) -> Result<()> {
        todo!("port set_meta")
    }

    pub async fn put_secret(&mut self, name: &str, plaintext: &[u8]) -> Result<()> {
        todo!("port put_secret")
    }

    pub async fn get_secret(&mut self, name: &str) -> Result<Option<Vec<u8>>> {
        todo!("port get_secret")
    }

    /// Store a blob only if none exists under `name`; true when this call stored it.
    pub async fn put_secret_if_absent(&mut self, name: &str, plaintext: &[u8]) -> Result<bool> {
        todo!("port put_secret_if_absent")
    }

    pub async fn delete_secret(&mut self, name: &str) -> Result<bool> {
        todo!("port delete_secret")
    }

    pub async fn insert_signing_key(&mut self, key: &SigningKeyRecord) -> Result<()> {
        todo!("port insert_signing_key")
    }

    pub async fn list_signing_keys(&mut self) -> Result<Vec<SigningKeyRecord>> {
        todo!("port list_signing_keys")
    }

    pub async fn delete_signing_key(&mut self, kid: &str) -> Result<()> {
        todo!("port delete_signing_key")
    }
}
