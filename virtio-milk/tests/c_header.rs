//! Compiles `include/virtio_milk.h` with gcc and checks that every struct size, field
//! offset, field size and constant matches the Rust definitions in `protocol.rs`.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use virtio_milk::protocol::{C_CONSTANTS, LAYOUTS};

/// Builds a C program printing one `name value` line per checked quantity, and the
/// expected lines from the Rust side.
fn generate() -> (String, Vec<String>) {
    let mut c =
        String::from("#include <stdio.h>\n#include <stddef.h>\n#include \"virtio_milk.h\"\n");
    c.push_str("int main(void)\n{\n");
    let mut expected = Vec::new();
    for l in LAYOUTS {
        writeln!(
            c,
            "\tprintf(\"sizeof {s} %zu\\n\", sizeof(struct {s}));",
            s = l.c_struct
        )
        .unwrap();
        expected.push(format!("sizeof {} {}", l.c_struct, l.size));
        for f in l.fields {
            writeln!(
                c,
                "\tprintf(\"offsetof {s}.{f} %zu\\n\", offsetof(struct {s}, {f}));",
                s = f.c_struct,
                f = f.c_field
            )
            .unwrap();
            writeln!(
                c,
                "\tprintf(\"sizeof {s}.{f} %zu\\n\", sizeof(((struct {s} *)0)->{f}));",
                s = f.c_struct,
                f = f.c_field
            )
            .unwrap();
            expected.push(format!(
                "offsetof {}.{} {}",
                f.c_struct, f.c_field, f.offset
            ));
            expected.push(format!("sizeof {}.{} {}", f.c_struct, f.c_field, f.size));
        }
    }
    for (name, value) in C_CONSTANTS {
        writeln!(
            c,
            "\tprintf(\"const {name} %llu\\n\", (unsigned long long)({name}));"
        )
        .unwrap();
        expected.push(format!("const {name} {value}"));
    }
    c.push_str("\treturn 0;\n}\n");
    (c, expected)
}

fn compile_and_run(extra: &[&str]) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("layout.c");
    let bin = dir.path().join("layout");
    let (c, _) = generate();
    std::fs::write(&src, c).unwrap();
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("include");
    let out = Command::new("gcc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic", "-I"])
        .arg(&include)
        .args(extra)
        .arg(&src)
        .arg("-o")
        .arg(&bin)
        .output()
        .expect("gcc must be installed to check the C header");
    assert!(
        out.status.success(),
        "gcc failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&bin).output().unwrap();
    assert!(run.status.success());
    String::from_utf8(run.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn c_header_layout_matches_rust() {
    let (_, expected) = generate();
    let got = compile_and_run(&[]);
    assert_eq!(got.len(), expected.len());
    for (g, e) in got.iter().zip(&expected) {
        assert_eq!(g, e, "C header and Rust layout disagree");
    }
    // Sanity: the table covers every struct and a meaningful number of fields.
    assert_eq!(LAYOUTS.len(), 9);
    assert!(expected.len() > 100);
}

#[test]
fn c_header_fallback_types_match_too() {
    let (_, expected) = generate();
    assert_eq!(
        compile_and_run(&["-DVIRTIO_MILK_FORCE_FALLBACK_TYPES"]),
        expected
    );
}

/// The guest kernel build carries its own copy of the header next to the other MiLK uapi
/// headers; once it exists it must stay byte-identical to the canonical one here.
#[test]
fn guest_kernel_copy_is_identical() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let canonical = std::fs::read(here.join("include/virtio_milk.h")).unwrap();
    let copy = here.join("../guest-kernel/include/uapi/linux/virtio_milk.h");
    match std::fs::read(&copy) {
        Ok(c) => assert!(
            c == canonical,
            "{} differs from virtio-milk/include/virtio_milk.h",
            copy.display()
        ),
        Err(_) => eprintln!("no guest copy at {} yet", copy.display()),
    }
}
