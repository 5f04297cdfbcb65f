//! BPF support built from the project's own files: a small instruction
//! assembler, raw bpf(2) calls, and user-space ends of the ring buffers.

pub mod btf;
pub mod insn;
pub mod ring;
pub mod sys;
