//! The guest's result line: `MILK-RESULT status=<n>`, printed by `/init`.

/// What starts the result line.
pub const RESULT_PREFIX: &str = "MILK-RESULT ";

/// The guest command's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestResult {
    /// Exit status of the command `/init` ran (0..=255).
    pub status: i32,
}

/// Parses a console line; `None` if it is not a well-formed result line.
///
/// The prefix may appear after other text (kernel messages can share a
/// line with it on a serial console), but the status must be a number in
/// 0..=255 ending the line.
pub fn parse_result_line(line: &str) -> Option<GuestResult> {
    let at = line.find(RESULT_PREFIX)?;
    let rest = line[at + RESULT_PREFIX.len()..].trim_end();
    let status = rest.strip_prefix("status=")?;
    let status: i32 = status.parse().ok()?;
    (0..=255)
        .contains(&status)
        .then_some(GuestResult { status })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_well_formed_lines() {
        assert_eq!(
            parse_result_line("MILK-RESULT status=0"),
            Some(GuestResult { status: 0 })
        );
        assert_eq!(
            parse_result_line("MILK-RESULT status=127\r"),
            Some(GuestResult { status: 127 })
        );
        assert_eq!(
            parse_result_line("[    1.2] x MILK-RESULT status=3"),
            Some(GuestResult { status: 3 })
        );
    }

    #[test]
    fn rejects_everything_else() {
        for l in [
            "",
            "MILK-RESULT",
            "MILK-RESULT status=",
            "MILK-RESULT status=x",
            "MILK-RESULT status=256",
            "MILK-RESULT status=-1",
            "MILK-RESULT status=1 extra",
            "echo \"MILK-RESULT status=$status\"",
        ] {
            assert_eq!(parse_result_line(l), None, "{l:?}");
        }
    }

    #[test]
    fn the_image_init_prints_this_format() {
        let init = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../images/init"))
            .unwrap();
        assert!(init.contains(&format!("echo \"{RESULT_PREFIX}status=$status\"")));
    }
}
