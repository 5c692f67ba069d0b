//! The guest-agent handler status file: `<statusDir>/<seq>.status`, a JSON array with one
//! object, rewritten atomically (temp file in the same directory + rename).

use crate::{Error, Result};
use serde_json::{json, Value};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Extension name in `status.name`.
pub const NAME: &str = "KeyVaultForLinux";

/// `status.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Transitioning,
    Success,
    Error,
    Warning,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Transitioning => "transitioning",
            State::Success => "success",
            State::Error => "error",
            State::Warning => "warning",
        }
    }
}

/// One status object (top level or a substatus entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    /// Only the top level carries an operation.
    pub operation: Option<String>,
    pub state: State,
    pub code: i64,
    pub message: String,
}

impl Entry {
    fn to_json(&self) -> Value {
        let mut v = json!({
            "name": self.name,
            "status": self.state.as_str(),
            "code": self.code,
            "formattedMessage": {"lang": "en", "message": self.message},
        });
        if let Some(op) = &self.operation {
            v["operation"] = json!(op);
        }
        v
    }
}

/// `YYYY-MM-DDThh:mm:ssZ`.
pub fn timestamp(unix: u64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(unix as i64) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => "1970-01-01T00:00:00Z".into(),
    }
}

/// The status document.
pub fn document(now: u64, top: &Entry, substatus: &[Entry]) -> Value {
    let mut status = top.to_json();
    status["substatus"] = Value::Array(substatus.iter().map(Entry::to_json).collect());
    json!([{"version": "1.0", "timestampUTC": timestamp(now), "status": status}])
}

/// Where the status goes (nowhere without a directory).
#[derive(Debug, Clone)]
pub struct StatusFile {
    dir: Option<PathBuf>,
    seq: u64,
}

impl StatusFile {
    pub fn new(dir: Option<PathBuf>, seq: u64) -> Self {
        Self { dir, seq }
    }

    /// `<dir>/<seq>.status`.
    pub fn path(&self) -> Option<PathBuf> {
        self.dir
            .as_ref()
            .map(|d| d.join(format!("{}.status", self.seq)))
    }

    /// Write the document atomically.
    pub fn write(&self, doc: &Value) -> Result<()> {
        let (Some(dir), Some(path)) = (&self.dir, self.path()) else {
            return Ok(());
        };
        let io = |p: &Path| {
            let p = p.display().to_string();
            move |source| Error::Io { path: p, source }
        };
        fs::create_dir_all(dir).map_err(io(dir))?;
        static N: AtomicU64 = AtomicU64::new(0);
        let tmp = dir.join(format!(
            ".{}.status.tmp.{}.{}",
            self.seq,
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
        let bytes = serde_json::to_vec(doc).unwrap_or_default();
        let written = f.write_all(&bytes).and_then(|_| f.sync_all());
        drop(f);
        if let Err(e) = written.and_then(|_| fs::rename(&tmp, &path)) {
            let _ = fs::remove_file(&tmp);
            return Err(io(&path)(e));
        }
        Ok(())
    }

    /// Write one top-level status without substatus (e.g. a settings error).
    pub fn write_simple(
        &self,
        operation: &str,
        state: State,
        code: i64,
        message: &str,
    ) -> Result<()> {
        let top = Entry {
            name: NAME.into(),
            operation: Some(operation.into()),
            state,
            code,
            message: message.into(),
        };
        self.write(&document(crate::fetch::unix_now(), &top, &[]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(timestamp(1_614_813_143), "2021-03-03T23:12:23Z");
    }

    #[test]
    fn document_shape_and_atomic_write() {
        let dir = tempfile::tempdir().unwrap();
        let f = StatusFile::new(Some(dir.path().join("status")), 3);
        let top = Entry {
            name: NAME.into(),
            operation: Some("Service start.".into()),
            state: State::Success,
            code: 0,
            message: "ok".into(),
        };
        let sub = Entry {
            name: "https://kv.vault.azure.net/secrets/a".into(),
            operation: None,
            state: State::Error,
            code: 403,
            message: "denied".into(),
        };
        f.write(&document(1_614_813_143, &top, &[sub])).unwrap();
        let path = f.path().unwrap();
        assert_eq!(path, dir.path().join("status/3.status"));
        let v: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(
            v,
            json!([{"version": "1.0", "timestampUTC": "2021-03-03T23:12:23Z", "status": {
                "name": "KeyVaultForLinux", "operation": "Service start.", "status": "success", "code": 0,
                "formattedMessage": {"lang": "en", "message": "ok"},
                "substatus": [{"name": "https://kv.vault.azure.net/secrets/a", "status": "error", "code": 403,
                               "formattedMessage": {"lang": "en", "message": "denied"}}]}}])
        );
        f.write_simple("Enable.", State::Error, 1, "bad settings")
            .unwrap();
        let v: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(v[0]["status"]["status"], "error");
        assert_eq!(v[0]["status"]["substatus"], json!([]));
        let names: Vec<_> = fs::read_dir(dir.path().join("status"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("3.status")]);
        // No directory: nothing written, no error.
        StatusFile::new(None, 0).write(&json!([])).unwrap();
    }
}
