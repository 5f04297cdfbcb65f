//! `control_proto`: the control socket's request parser (`milk_control::proto`), one
//! request line as a client sends it.
//!
//! Properties: no panic; an error is one line; an accepted request serialises back to a
//! line that parses to the same request; every reply is exactly one line that parses back.

use milk_control::proto::{parse_request, Reply, MAX_LINE};

/// One input: the request line (lossily UTF-8, at most `MAX_LINE` bytes as the server reads).
pub fn run(data: &[u8]) {
    let data = &data[..data.len().min(MAX_LINE)];
    let line = String::from_utf8_lossy(data);
    let reply = match parse_request(&line) {
        Ok(r) => {
            let back = serde_json::to_string(&r).expect("request serialises");
            assert_eq!(
                parse_request(&back).as_ref(),
                Ok(&r),
                "round trip of {back}"
            );
            Reply::ok(serde_json::json!({ "cmd": r.name() }))
        }
        Err(e) => {
            assert!(!e.contains('\n'), "multi-line error: {e:?}");
            Reply::error(e)
        }
    };
    let l = reply.to_line();
    assert!(l.ends_with('\n') && l.matches('\n').count() == 1, "{l:?}");
    let _: Reply = serde_json::from_str(l.trim_end()).expect("reply parses");
}
