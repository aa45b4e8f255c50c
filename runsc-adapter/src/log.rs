//! Where the adapter says what it did: one line per event in its own log
//! file (context: time, pid, command, container), errors also on stderr and,
//! in runc's JSON format, in the `--log` file the shim reads errors from.

use std::{
    fs::OpenOptions,
    io::Write as _,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

/// Rotated to `<file>.1` beyond this size.
const MAX_LOG_BYTES: u64 = 4 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct Logger {
    file: Option<PathBuf>,
    /// runc's `--log`: JSON lines, the shim reports the last `error` one.
    runc_log: Option<PathBuf>,
    context: String,
}

impl Logger {
    pub fn new(file: Option<PathBuf>, runc_log: Option<PathBuf>, context: String) -> Self {
        Self {
            file,
            runc_log,
            context,
        }
    }

    pub fn info(&self, msg: &str) {
        self.write("info", msg);
    }

    pub fn warn(&self, msg: &str) {
        self.write("warning", msg);
    }

    /// Logs an error to the adapter log, runc's JSON log and stderr.
    pub fn error(&self, msg: &str) {
        self.write("error", msg);
        if let Some(runc_log) = &self.runc_log {
            let line = serde_json::json!({ "level": "error", "msg": msg, "time": rfc3339_now() });
            append(runc_log, &format!("{line}\n"));
        }
        eprintln!("fast-sandbox-runsc: {msg}");
    }

    fn write(&self, level: &str, msg: &str) {
        let Some(file) = &self.file else {
            if level != "info" {
                eprintln!("fast-sandbox-runsc: {level}: {msg}");
            }
            return;
        };
        if std::fs::metadata(file).is_ok_and(|m| m.len() > MAX_LOG_BYTES) {
            let _ = std::fs::rename(file, file.with_extension("log.1"));
        }
        append(
            file,
            &format!(
                "{} {level} pid={} {}: {msg}\n",
                rfc3339_now(),
                std::process::id(),
                self.context
            ),
        );
    }
}

fn append(path: &Path, text: &str) {
    // Logging must never fail the operation it describes.
    if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(path) {
        let _ = f.write_all(text.as_bytes());
    }
}

/// The current UTC time as `YYYY-MM-DDThh:mm:ss.mmmZ`.
pub fn rfc3339_now() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(now.as_secs(), now.subsec_millis())
}

fn rfc3339(secs: u64, millis: u32) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_709_210_096, 7), "2024-02-29T12:34:56.007Z");
    }

    #[test]
    fn errors_reach_the_runc_json_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("adapter.log");
        let runc_log = dir.path().join("log.json");
        let l = Logger::new(Some(log.clone()), Some(runc_log.clone()), "kill c1".into());
        l.info("hello");
        l.error("boom");
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("info pid="), "{text}");
        assert!(text.contains("kill c1: boom"), "{text}");
        let json: serde_json::Value =
            serde_json::from_str(std::fs::read_to_string(&runc_log).unwrap().trim()).unwrap();
        assert_eq!(json["level"], "error");
        assert_eq!(json["msg"], "boom");
    }
}
