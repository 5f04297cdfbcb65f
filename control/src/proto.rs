//! The control socket's wire format (docs/control.md): one JSON object per line each way.
//!
//! Request: `{"cmd": "<command>", ...arguments}`. Reply: `{"ok": true, "result": {...}}` or
//! `{"ok": false, "error": "<one line>"}`. A connection may carry any number of requests;
//! each gets exactly one reply line, in order.

use serde::{Deserialize, Serialize};

/// Longest request line accepted, in bytes (without the newline).
pub const MAX_LINE: usize = 4096;

/// A request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    /// Engine, guest uptime, boot id, policy, session, counters.
    Status,
    /// The policies `swap` accepts.
    Policies,
    /// Replace the policy: `policy` (`NAME[:PARAMS]`, in this process) or `socket` (an
    /// out-of-process policy daemon).
    Swap {
        /// `NAME[:PARAMS]`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        policy: Option<String>,
        /// vhost-user socket of a policy daemon.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        socket: Option<String>,
    },
    /// Counters and latency histograms.
    Metrics,
    /// Stop the host policy runtime; the guest falls back to its own scheduler (CFS).
    Pause,
    /// Start the policy runtime again; the guest re-enables the host scheduler.
    Resume,
    /// Stop the VM.
    Stop,
}

impl Request {
    /// The command word.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Policies => "policies",
            Request::Swap { .. } => "swap",
            Request::Metrics => "metrics",
            Request::Pause => "pause",
            Request::Resume => "resume",
            Request::Stop => "stop",
        }
    }
}

/// A reply line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the request was carried out.
    pub ok: bool,
    /// The result (`ok`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// Why not (not `ok`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    /// A success.
    pub fn ok(result: serde_json::Value) -> Self {
        Reply {
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    /// A failure.
    pub fn error(msg: impl Into<String>) -> Self {
        Reply {
            ok: false,
            result: None,
            error: Some(msg.into()),
        }
    }

    /// The reply as one line (with the newline).
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self)
            .unwrap_or_else(|_| r#"{"ok":false,"error":"unserializable reply"}"#.into());
        s.push('\n');
        s
    }
}

/// Parses a request line; the error is the one-line reason sent back.
pub fn parse_request(line: &str) -> Result<Request, String> {
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("malformed JSON: {e}"))?;
    let Some(cmd) = v.get("cmd") else {
        return Err("request has no \"cmd\"".into());
    };
    let Some(cmd) = cmd.as_str().map(str::to_owned) else {
        return Err("\"cmd\" must be a string".into());
    };
    let cmd = cmd.as_str();
    const KNOWN: [&str; 7] = [
        "status", "policies", "swap", "metrics", "pause", "resume", "stop",
    ];
    if !KNOWN.contains(&cmd) {
        return Err(format!(
            "unknown command {cmd:?} (known: {})",
            KNOWN.join(", ")
        ));
    }
    let allowed: &[&str] = if cmd == "swap" {
        &["cmd", "policy", "socket"]
    } else {
        &["cmd"]
    };
    if let Some(obj) = v.as_object() {
        if let Some(k) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(format!("bad {cmd} request: unknown field {k:?}"));
        }
    }
    serde_json::from_value(v).map_err(|e| format!("bad {cmd} request: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        for r in [
            Request::Status,
            Request::Policies,
            Request::Swap {
                policy: Some("fifo:slice_us=100".into()),
                socket: None,
            },
            Request::Metrics,
            Request::Pause,
            Request::Resume,
            Request::Stop,
        ] {
            let line = serde_json::to_string(&r).unwrap();
            assert!(
                line.contains(&format!("\"cmd\":\"{}\"", r.name())),
                "{line}"
            );
            assert_eq!(parse_request(&line).unwrap(), r);
        }
    }

    #[test]
    fn bad_requests_say_why() {
        assert!(parse_request("{").unwrap_err().contains("malformed JSON"));
        assert!(parse_request("[]").unwrap_err().contains("no \"cmd\""));
        assert!(parse_request(r#"{"cmd":1}"#)
            .unwrap_err()
            .contains("string"));
        let e = parse_request(r#"{"cmd":"reboot"}"#).unwrap_err();
        assert!(
            e.contains("unknown command \"reboot\"") && e.contains("swap"),
            "{e}"
        );
        let e = parse_request(r#"{"cmd":"swap","policy":3}"#).unwrap_err();
        assert!(e.starts_with("bad swap request"), "{e}");
        let e = parse_request(r#"{"cmd":"status","x":1}"#).unwrap_err();
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn replies_are_one_line() {
        let l = Reply::error("no\nnewline inside").to_line();
        assert_eq!(l.matches('\n').count(), 1);
        assert!(l.ends_with('\n'));
        let back: Reply = serde_json::from_str(l.trim_end()).unwrap();
        assert!(!back.ok);
    }
}
