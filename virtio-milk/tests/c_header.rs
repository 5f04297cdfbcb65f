//! Compiles `include/virtio_milk.h` with gcc and checks that every struct size, field
//! offset, field size and constant matches the Rust definitions in `protocol.rs`.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use virtio_milk::protocol::{C_CONSTANTS, LAYOUTS};

/// Builds a C program printing one `name value` line per checked quantity, and the
/// expected lines from the Rust side.
fn generate() -> (String, Vec<String>) {
    // <linux/types.h> (the kernel's uapi types, /usr/include/linux) is the header's only
    // dependency: it has no userspace fallback types.
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
    assert!(expected.len() > 150);
    assert!(C_CONSTANTS.len() > 55);
}

/// Records built in C with the header (as the guest driver builds them) parse in Rust to
/// exactly the intended messages, and Rust-encoded decisions read back in C.
#[test]
fn c_built_records_parse_in_rust() {
    use virtio_milk::protocol::{
        parse_record, unpack_name, AckInfo, AckStatus, CpuEventKind, DecisionInfo, Direction,
        EventInfo, Gtid, Message, TaskEventKind, TaskNewInfo, PREEMPT_HOST, RECORD_SIZE,
        RUN_F_PREEMPT, WAKE_NEW,
    };
    let c = r#"
#include <stdio.h>
#include <string.h>
#include "virtio_milk.h"
/* Little-endian host assumed (x86_64); the kernel uses cpu_to_le*(). */
#define GTID(pid, gen) (((__u64)(gen) << 32) | (pid))
static void hdr(struct virtio_milk_hdr *h, unsigned type, unsigned cpu)
{
	h->type = type; h->len = VIRTIO_MILK_RECORD_SIZE;
	h->version = VIRTIO_MILK_PROTO_VERSION; h->flags = 0; h->cpu = cpu;
}
static void emit(const union virtio_milk_record *r)
{
	fwrite(r->raw, 1, sizeof(r->raw), stdout);
}
int main(int argc, char **argv)
{
	union virtio_milk_record r;
	if (argc > 1) {
		/* Read decisions from stdin, print their fields. */
		while (fread(r.raw, 1, sizeof(r.raw), stdin) == sizeof(r.raw))
			printf("%u %u %u %u %llu %llu %llu %u\n", (unsigned)r.hdr.type,
			       (unsigned)r.hdr.cpu,
			       (unsigned)VIRTIO_MILK_GTID_PID(r.decision.gtid),
			       (unsigned)VIRTIO_MILK_GTID_GEN(r.decision.gtid),
			       (unsigned long long)r.decision.seq,
			       (unsigned long long)r.decision.slice_ns,
			       (unsigned long long)r.decision.cookie,
			       (unsigned)r.decision.flags);
		return 0;
	}
	memset(&r, 0, sizeof(r));
	hdr(&r.hdr, VIRTIO_MILK_MSG_TASK_NEW, 1);
	r.task_new.gtid = GTID(4242, 7); r.task_new.tgid = 4240; r.task_new.seq = 1;
	strncpy(r.task_new.comm, "kworker/1:0", sizeof(r.task_new.comm));
	r.task_new.cpus_allowed = 0x3; r.task_new.weight = 100;
	r.task_new.nice = (__le16)-5;
	emit(&r);
	memset(&r, 0, sizeof(r));
	hdr(&r.hdr, VIRTIO_MILK_MSG_TASK_WAKEUP, 1);
	r.event.gtid = GTID(4242, 7); r.event.seq = 2; r.event.arg = VIRTIO_MILK_WAKE_NEW;
	r.event.enq_flags = 1ULL << 40; r.event.src_cpu = 0;
	emit(&r);
	memset(&r, 0, sizeof(r));
	hdr(&r.hdr, VIRTIO_MILK_MSG_TASK_PREEMPT, 1);
	r.event.gtid = GTID(4242, 7); r.event.seq = 3; r.event.arg = VIRTIO_MILK_PREEMPT_HOST;
	r.event.runtime_ns = 123456789; r.event.slice_ns = 1000; r.event.src_cpu = 1;
	emit(&r);
	memset(&r, 0, sizeof(r));
	hdr(&r.hdr, VIRTIO_MILK_MSG_CPU_TICK, 0);
	r.event.gtid = GTID(17, 2); r.event.runtime_ns = 5000; r.event.slice_ns = 250;
	emit(&r);
	memset(&r, 0, sizeof(r));
	hdr(&r.hdr, VIRTIO_MILK_MSG_ACK, 0);
	r.ack.gtid = GTID(4242, 7); r.ack.status = VIRTIO_MILK_ACK_DROPPED; r.ack.seq = 2;
	r.ack.cookie = 99; r.ack.decision_type = VIRTIO_MILK_MSG_RUN; r.ack.target_cpu = 1;
	emit(&r);
	return 0;
}
"#;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("records.c");
    let bin = dir.path().join("records");
    std::fs::write(&src, c).unwrap();
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("include");
    let out = Command::new("gcc")
        .args(["-std=c11", "-Wall", "-Werror", "-I"])
        .arg(&include)
        .arg(&src)
        .arg("-o")
        .arg(&bin)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&bin).output().unwrap();
    assert!(run.status.success());
    let recs: Vec<Message> = run
        .stdout
        .chunks_exact(RECORD_SIZE)
        .map(|c| parse_record(c.try_into().unwrap(), Direction::GuestToHost, 2).unwrap())
        .collect();
    let g = Gtid::new(4242, 7);
    let mut comm = [0u8; 16];
    comm[..11].copy_from_slice(b"kworker/1:0");
    assert_eq!(
        recs,
        vec![
            Message::TaskNew(TaskNewInfo {
                cpu: 1,
                gtid: g,
                seq: 1,
                ts_ns: 0,
                comm,
                cpus_allowed: 3,
                tgid: 4240,
                weight: 100,
                nice: -5,
            }),
            Message::Task(
                TaskEventKind::Wakeup,
                EventInfo {
                    cpu: 1,
                    gtid: g,
                    seq: 2,
                    arg: WAKE_NEW,
                    enq_flags: 1 << 40,
                    ..Default::default()
                }
            ),
            Message::Task(
                TaskEventKind::Preempt,
                EventInfo {
                    cpu: 1,
                    gtid: g,
                    seq: 3,
                    arg: PREEMPT_HOST,
                    runtime_ns: 123_456_789,
                    slice_ns: 1000,
                    src_cpu: 1,
                    ..Default::default()
                }
            ),
            Message::Cpu(
                CpuEventKind::Tick,
                EventInfo {
                    gtid: Gtid::new(17, 2),
                    runtime_ns: 5000,
                    slice_ns: 250,
                    ..Default::default()
                }
            ),
            Message::Ack(AckInfo {
                cpu: 0,
                gtid: g,
                seq: 2,
                ts_ns: 0,
                cookie: 99,
                status: AckStatus::Dropped,
                decision_type: 0x40,
                target_cpu: 1,
            }),
        ]
    );
    if let Message::TaskNew(t) = &recs[0] {
        assert_eq!(unpack_name(&t.comm), "kworker/1:0");
    }
    // And the other way: decisions encoded in Rust, decoded by C.
    let run = DecisionInfo {
        cpu: 1,
        gtid: g,
        seq: 2,
        slice_ns: 3_000_000,
        cookie: 99,
        ts_ns: 0,
        flags: RUN_F_PREEMPT,
    };
    let mut input = Message::Run(run).encode().to_vec();
    input.extend_from_slice(
        &Message::Preempt(DecisionInfo {
            gtid: Gtid(0),
            seq: 0,
            slice_ns: 0,
            flags: 0,
            cookie: 100,
            ..run
        })
        .encode(),
    );
    let mut child = Command::new(&bin)
        .arg("decode")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child.stdin.take().unwrap().write_all(&input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!(
            "{} 1 4242 7 2 3000000 99 1\n{} 1 0 0 0 0 100 0\n",
            0x40, 0x41
        )
    );
}

/// Compile the header as kernel code against the configured guest kernel tree of the
/// milk-guest-kernel build cache: `-D__KERNEL__`, the kernel's own `<linux/types.h>`,
/// `static_assert` and `cpu_to_le16`. Needs that tree (`cargo xtask kernel` makes it).
#[test]
#[ignore = "needs a configured guest kernel tree in ~/.cache/milk (cargo xtask kernel); run with --ignored"]
fn header_compiles_as_kernel_code() {
    let cache = Path::new("/root/.cache/milk");
    let Some((src, build)) = std::fs::read_dir(cache.join("src")).ok().and_then(|d| {
        d.flatten().map(|e| e.path()).find_map(|src| {
            let build = cache.join("build").join(src.file_name()?);
            build
                .join("include/generated/autoconf.h")
                .exists()
                .then_some((src, build))
        })
    }) else {
        panic!(
            "no configured kernel tree under {} (run cargo xtask kernel)",
            cache.display()
        );
    };
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("kchk.c");
    std::fs::write(
        &c,
        "#include <linux/types.h>\n#include <linux/build_bug.h>\n#include <asm/byteorder.h>\n\
         #include \"virtio_milk.h\"\n\
         static_assert(sizeof(union virtio_milk_record) == VIRTIO_MILK_RECORD_SIZE);\n\
         int milk_hdr_type(const union virtio_milk_record *r);\n\
         int milk_hdr_type(const union virtio_milk_record *r)\n\
         { return le16_to_cpu(r->hdr.type) + le32_to_cpu(r->ack.status); }\n",
    )
    .unwrap();
    let gcc_inc = Command::new("gcc")
        .arg("-print-file-name=include")
        .output()
        .unwrap();
    let gcc_inc = String::from_utf8(gcc_inc.stdout).unwrap();
    let (s, b) = (src.display(), build.display());
    let args: Vec<String> = vec![
        "-std=gnu11".into(),
        "-D__KERNEL__".into(),
        "-nostdinc".into(),
        "-isystem".into(),
        gcc_inc.trim().into(),
        format!("-I{s}/arch/x86/include"),
        format!("-I{b}/arch/x86/include/generated"),
        format!("-I{s}/include"),
        format!("-I{b}/include"),
        format!("-I{s}/arch/x86/include/uapi"),
        format!("-I{b}/arch/x86/include/generated/uapi"),
        format!("-I{s}/include/uapi"),
        format!("-I{b}/include/generated/uapi"),
        "-include".into(),
        format!("{s}/include/linux/compiler-version.h"),
        "-include".into(),
        format!("{s}/include/linux/kconfig.h"),
        "-include".into(),
        format!("{s}/include/linux/compiler_types.h"),
        format!(
            "-I{}",
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("include")
                .display()
        ),
        "-Wall".into(),
        "-Werror".into(),
        "-c".into(),
    ];
    let out = Command::new("gcc")
        .args(&args)
        .arg(&c)
        .arg("-o")
        .arg(dir.path().join("kchk.o"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "header does not compile as kernel code:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
