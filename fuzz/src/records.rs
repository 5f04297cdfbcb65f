//! `records`: raw 64-byte records as a guest (or a host) writes them, through the host's
//! parser, in both directions and for any CPU count. A record that parses must re-encode to
//! one that parses to the same message (nothing unvalidated survives a round trip).

use virtio_milk::protocol::{
    parse_record, record_version, type_name, Direction, MAX_CPUS, RECORD_SIZE,
};

use crate::input::Input;

/// One input: a byte choosing the CPU count and direction, then records back to back (the
/// last one zero padded).
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let sel = inp.u8();
    let num_cpus = 1 + u32::from(sel & 0x3f) % MAX_CPUS;
    let dir = if sel & 0x80 == 0 {
        Direction::GuestToHost
    } else {
        Direction::HostToGuest
    };
    for chunk in inp.rest().chunks(RECORD_SIZE) {
        let mut raw = [0u8; RECORD_SIZE];
        raw[..chunk.len()].copy_from_slice(chunk);
        let _ = record_version(&raw);
        match parse_record(&raw, dir, num_cpus) {
            Ok(m) => {
                let _ = type_name(m.msg_type());
                let again = parse_record(&m.encode(), dir, num_cpus)
                    .unwrap_or_else(|e| panic!("{m:?} re-encoded does not parse: {e}"));
                assert_eq!(again, m, "round trip changed the message");
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
}
