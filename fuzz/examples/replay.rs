//! Runs one input through a target: `cargo run -p milk-fuzz --example replay -- TARGET FILE`
//! (a crash the fuzzer found, in an ordinary debug build with a backtrace).

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(name), Some(file)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: replay TARGET FILE");
        std::process::exit(2);
    };
    let Some(f) = milk_fuzz::target(name) else {
        eprintln!("unknown target {name:?}");
        std::process::exit(2);
    };
    let data = std::fs::read(file).unwrap_or_else(|e| {
        eprintln!("cannot read {file}: {e}");
        std::process::exit(2);
    });
    f(&data);
    eprintln!("{name}: {file} ran without a failure");
}
