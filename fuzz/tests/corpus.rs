//! Replays every committed corpus input (and every regression input in
//! `fuzz/regressions/TARGET/`) through its target on the ordinary test build: what the
//! fuzzer found interesting, and every crash it ever found, keeps passing.

use std::path::Path;

fn replay(dir: &Path, f: fn(&[u8])) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for e in entries {
        let p = e.expect("corpus entry").path();
        let data = std::fs::read(&p).expect("corpus input");
        f(&data);
        n += 1;
    }
    n
}

#[test]
fn every_target_replays_its_corpus() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (name, f) in milk_fuzz::TARGETS {
        let n = replay(&root.join("corpus").join(name), *f);
        assert!(n > 0, "target {name} has no committed corpus");
        replay(&root.join("regressions").join(name), *f);
    }
}

#[test]
fn targets_accept_empty_and_tiny_inputs() {
    for (_, f) in milk_fuzz::TARGETS {
        f(&[]);
        f(&[0xff]);
        f(&[0; 3]);
    }
}
