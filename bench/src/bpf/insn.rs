//! A tiny eBPF assembler: just the instructions our two programs need,
//! with named labels so jump offsets are computed, not hand-counted.

use std::collections::HashMap;

/// One 8-byte eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    /// dst_reg in the low nibble, src_reg in the high nibble.
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

/// eBPF registers.
pub type Reg = u8;
pub const R0: Reg = 0;
pub const R1: Reg = 1;
pub const R2: Reg = 2;
pub const R3: Reg = 3;
pub const R4: Reg = 4;
pub const R5: Reg = 5;
pub const R6: Reg = 6;
pub const R7: Reg = 7;
pub const R8: Reg = 8;
pub const R10: Reg = 10;

// Opcodes (class | size/op | source), from include/uapi/linux/bpf.h.
const LD_IMM_DW: u8 = 0x18;
const LDX_MEM_DW: u8 = 0x79;
const ALU64_MOV_K: u8 = 0xb7;
const ALU64_MOV_X: u8 = 0xbf;
const ALU64_ADD_K: u8 = 0x07;
const ALU64_RSH_K: u8 = 0x77;
const JMP_JA: u8 = 0x05;
const JMP_JEQ_K: u8 = 0x15;
const JMP_JNE_K: u8 = 0x55;
const JMP_JLT_K: u8 = 0xa5;
const STX_MEM_DW: u8 = 0x7b;
const JMP_CALL: u8 = 0x85;
const JMP_EXIT: u8 = 0x95;

/// src_reg of a 64-bit immediate load naming a map by fd.
pub const PSEUDO_MAP_FD: u8 = 1;
/// src_reg of a 64-bit immediate load naming a subprogram (callback).
pub const PSEUDO_FUNC: u8 = 4;

/// Helper function ids (`enum bpf_func_id`).
pub mod helper {
    pub const GET_CURRENT_PID_TGID: i32 = 14;
    pub const PROBE_READ_USER: i32 = 112;
    pub const PROBE_READ_KERNEL: i32 = 113;
    pub const RINGBUF_RESERVE: i32 = 131;
    pub const RINGBUF_SUBMIT: i32 = 132;
    pub const RINGBUF_DISCARD: i32 = 133;
    pub const RINGBUF_QUERY: i32 = 134;
    pub const DYNPTR_READ: i32 = 201;
    pub const USER_RINGBUF_DRAIN: i32 = 209;
}

fn insn(code: u8, dst: Reg, src: Reg, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (dst & 0xf) | (src << 4),
        off,
        imm,
    }
}

/// Assembler with forward/backward labels.
#[derive(Default)]
pub struct Asm {
    insns: Vec<Insn>,
    labels: HashMap<&'static str, usize>,
    /// (instruction index, label, is a pseudo-func load)
    fixups: Vec<(usize, &'static str, bool)>,
}

/// Assembly errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AsmError {
    #[error("undefined label {0}")]
    Undefined(&'static str),
    #[error("jump to {0} out of range")]
    Range(&'static str),
}

impl Asm {
    pub fn new() -> Self {
        Self::default()
    }

    fn push(&mut self, i: Insn) -> &mut Self {
        self.insns.push(i);
        self
    }

    pub fn label(&mut self, name: &'static str) -> &mut Self {
        self.labels.insert(name, self.insns.len());
        self
    }

    pub fn mov_imm(&mut self, dst: Reg, imm: i32) -> &mut Self {
        self.push(insn(ALU64_MOV_K, dst, 0, 0, imm))
    }

    pub fn mov(&mut self, dst: Reg, src: Reg) -> &mut Self {
        self.push(insn(ALU64_MOV_X, dst, src, 0, 0))
    }

    pub fn add_imm(&mut self, dst: Reg, imm: i32) -> &mut Self {
        self.push(insn(ALU64_ADD_K, dst, 0, 0, imm))
    }

    pub fn rsh_imm(&mut self, dst: Reg, imm: i32) -> &mut Self {
        self.push(insn(ALU64_RSH_K, dst, 0, 0, imm))
    }

    /// dst = *(u64 *)(src + off)
    pub fn ldx_dw(&mut self, dst: Reg, src: Reg, off: i16) -> &mut Self {
        self.push(insn(LDX_MEM_DW, dst, src, off, 0))
    }

    /// *(u64 *)(dst + off) = src
    pub fn stx_dw(&mut self, dst: Reg, src: Reg, off: i16) -> &mut Self {
        self.push(insn(STX_MEM_DW, dst, src, off, 0))
    }

    /// dst = map (by fd), relocated by the kernel to the map pointer.
    pub fn ld_map_fd(&mut self, dst: Reg, fd: i32) -> &mut Self {
        self.push(insn(LD_IMM_DW, dst, PSEUDO_MAP_FD, 0, fd));
        self.push(insn(0, 0, 0, 0, 0))
    }

    /// dst = address of the subprogram at `label` (a callback).
    pub fn ld_func(&mut self, dst: Reg, label: &'static str) -> &mut Self {
        self.fixups.push((self.insns.len(), label, true));
        self.push(insn(LD_IMM_DW, dst, PSEUDO_FUNC, 0, 0));
        self.push(insn(0, 0, 0, 0, 0))
    }

    fn jump(&mut self, code: u8, dst: Reg, imm: i32, label: &'static str) -> &mut Self {
        self.fixups.push((self.insns.len(), label, false));
        self.push(insn(code, dst, 0, 0, imm))
    }

    pub fn jeq_imm(&mut self, dst: Reg, imm: i32, label: &'static str) -> &mut Self {
        self.jump(JMP_JEQ_K, dst, imm, label)
    }

    pub fn jne_imm(&mut self, dst: Reg, imm: i32, label: &'static str) -> &mut Self {
        self.jump(JMP_JNE_K, dst, imm, label)
    }

    /// Unsigned `if dst < imm goto label`.
    pub fn jlt_imm(&mut self, dst: Reg, imm: i32, label: &'static str) -> &mut Self {
        self.jump(JMP_JLT_K, dst, imm, label)
    }

    pub fn ja(&mut self, label: &'static str) -> &mut Self {
        self.jump(JMP_JA, 0, 0, label)
    }

    pub fn call(&mut self, helper: i32) -> &mut Self {
        self.push(insn(JMP_CALL, 0, 0, 0, helper))
    }

    pub fn exit(&mut self) -> &mut Self {
        self.push(insn(JMP_EXIT, 0, 0, 0, 0))
    }

    /// Instruction index of `label`, if defined.
    pub fn position(&self, label: &str) -> Option<usize> {
        self.labels.get(label).copied()
    }

    /// Resolves labels: offsets are relative to the next instruction.
    pub fn finish(&self) -> Result<Vec<Insn>, AsmError> {
        let mut out = self.insns.clone();
        for &(at, name, func) in &self.fixups {
            let target = *self.labels.get(name).ok_or(AsmError::Undefined(name))?;
            let rel = target as i64 - at as i64 - 1;
            if func {
                out[at].imm = i32::try_from(rel).map_err(|_| AsmError::Range(name))?;
            } else {
                out[at].off = i16::try_from(rel).map_err(|_| AsmError::Range(name))?;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_registers_and_opcodes() {
        let mut a = Asm::new();
        a.mov(R6, R1).ldx_dw(R2, R6, 8).exit();
        let p = a.finish().unwrap();
        assert_eq!(
            p[0],
            Insn {
                code: 0xbf,
                regs: 0x16,
                off: 0,
                imm: 0
            }
        );
        assert_eq!(
            p[1],
            Insn {
                code: 0x79,
                regs: 0x62,
                off: 8,
                imm: 0
            }
        );
        assert_eq!(p[2].code, 0x95);
    }

    #[test]
    fn resolves_forward_and_backward_labels() {
        let mut a = Asm::new();
        a.label("top")
            .jne_imm(R1, 5, "out") // 0
            .ld_func(R2, "cb") // 1-2
            .ja("top") // 3
            .label("out")
            .exit() // 4
            .label("cb")
            .exit(); // 5
        let p = a.finish().unwrap();
        assert_eq!(p[0].off, 3);
        assert_eq!((p[1].regs >> 4, p[1].imm), (PSEUDO_FUNC, 3));
        assert_eq!(p[3].off, -4);
    }

    #[test]
    fn undefined_label_is_an_error() {
        let mut a = Asm::new();
        a.ja("nowhere");
        assert_eq!(a.finish(), Err(AsmError::Undefined("nowhere")));
    }
}
