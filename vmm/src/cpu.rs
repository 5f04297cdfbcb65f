//! Per-vCPU architectural set-up: GDT, identity page tables, segment/control
//! registers for the two entry modes, general registers, FPU, MSRs, CPUID and
//! the local APIC's LINT pins.

use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs,
};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::boot::EntryMode;
use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_PD_COUNT, BOOT_STACK_POINTER, PAGE_SIZE, PDE_START,
    PDPTE_START, PML4_START, PVH_INFO_START, ZERO_PAGE_START,
};

/// Errors configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {cpu}: {what} failed: {err}")]
    Kvm {
        /// vCPU index.
        cpu: u32,
        /// Which operation.
        what: &'static str,
        /// errno.
        err: kvm_ioctls::Error,
    },
    /// Writing boot tables to guest memory failed.
    #[error("cannot write boot page tables/GDT to guest memory")]
    GuestMemory,
}

// Control register / EFER bits.
const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// GDT selectors (index * 8).
pub const SEL_CODE32: u16 = 0x08;
/// 64-bit code selector (`__BOOT_CS`).
pub const SEL_CODE64: u16 = 0x10;
/// Data selector (`__BOOT_DS`).
pub const SEL_DATA: u16 = 0x18;
/// TSS selector.
pub const SEL_TSS: u16 = 0x20;

/// Encodes a GDT descriptor from access/flags (`flags` = 0xF0FF mask of
/// flags nibble and access byte), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (((base as u64) & 0xff00_0000) << 32)
        | (((flags as u64) & 0xf0ff) << 40)
        | (((limit as u64) & 0x000f_0000) << 32)
        | (((base as u64) & 0x00ff_ffff) << 16)
        | ((limit as u64) & 0x0000_ffff)
}

/// The boot GDT: null, 32-bit code, 64-bit code, data, TSS.
pub const BOOT_GDT: [u64; 5] = [
    0,
    gdt_entry(0xc09b, 0, 0xfffff), // code32: G, D/B, P, DPL0, S, exec/read, accessed
    gdt_entry(0xa09b, 0, 0xfffff), // code64: G, L, P, DPL0, S, exec/read, accessed
    gdt_entry(0xc093, 0, 0xfffff), // data: G, D/B, P, DPL0, S, read/write, accessed
    gdt_entry(0x808b, 0, 0xfffff), // TSS: G, P, busy 32/64-bit TSS
];

/// Decodes a GDT entry into the KVM segment representation.
pub fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if present == 0 { 1 } else { 0 },
        padding: 0,
    }
}

/// Writes the boot GDT and an empty IDT.
pub fn write_gdt<M: GuestMemoryBackend>(mem: &M) -> Result<(), CpuError> {
    for (i, e) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(|_| CpuError::GuestMemory)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|_| CpuError::GuestMemory)
}

/// Writes identity page tables covering the low 4 GiB with 2 MiB pages.
pub fn write_page_tables<M: GuestMemoryBackend>(mem: &M) -> Result<(), CpuError> {
    let w = |v: u64, a: u64| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(|_| CpuError::GuestMemory)
    };
    // Present | writable.
    w(PDPTE_START | 0x3, PML4_START)?;
    for pd in 0..BOOT_PD_COUNT {
        let pd_addr = PDE_START + pd * PAGE_SIZE;
        w(pd_addr | 0x3, PDPTE_START + pd * 8)?;
        for i in 0..512u64 {
            // Present | writable | page size (2 MiB).
            w(((pd * 512 + i) << 21) | 0x83, pd_addr + i * 8)?;
        }
    }
    Ok(())
}

/// Segment and control registers for `mode`, based on the vCPU's current sregs.
pub fn boot_sregs(mut sregs: kvm_sregs, mode: EntryMode) -> kvm_sregs {
    let code = match mode {
        EntryMode::Pvh => segment_from_gdt(BOOT_GDT[1], SEL_CODE32),
        EntryMode::Linux64 => segment_from_gdt(BOOT_GDT[2], SEL_CODE64),
    };
    let data = segment_from_gdt(BOOT_GDT[3], SEL_DATA);
    let tss = segment_from_gdt(BOOT_GDT[4], SEL_TSS);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match mode {
        EntryMode::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        EntryMode::Linux64 => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.cr3 = PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    sregs
}

/// General registers for the boot CPU.
pub fn boot_regs(mode: EntryMode, entry: u64) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        ..Default::default()
    };
    match mode {
        EntryMode::Pvh => regs.rbx = PVH_INFO_START,
        EntryMode::Linux64 => regs.rsi = ZERO_PAGE_START,
    }
    regs
}

/// FPU state after reset (x87 control word and SSE control/status).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

// MSR indices.
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 6;

/// MSR values every vCPU starts with.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        e(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

/// The CPU vendor, from CPUID leaf 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vendor {
    /// `GenuineIntel`.
    Intel,
    /// `AuthenticAMD` or `HygonGenuine` (AMD's topology leaves).
    Amd,
    /// Anything else: only the vendor-neutral leaves are touched.
    Other,
}

/// The vendor named by leaf 0 (EBX, EDX, ECX spell the vendor string).
pub fn cpuid_vendor(cpuid: &CpuId) -> Vendor {
    let Some(e) = cpuid.as_slice().iter().find(|e| e.function == 0) else {
        return Vendor::Other;
    };
    let mut v = [0u8; 12];
    v[0..4].copy_from_slice(&e.ebx.to_le_bytes());
    v[4..8].copy_from_slice(&e.edx.to_le_bytes());
    v[8..12].copy_from_slice(&e.ecx.to_le_bytes());
    match &v {
        b"GenuineIntel" => Vendor::Intel,
        b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
        _ => Vendor::Other,
    }
}

/// CPUID.1:ECX bit 24: TSC-deadline mode of the local APIC timer.
pub const CPUID_1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// CPUID.1:ECX bit 31: running under a hypervisor.
pub const CPUID_1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.0x8000_0001:ECX bit 1 (AMD CmpLegacy): the HTT count means cores.
pub const CPUID_80000001_ECX_CMP_LEGACY: u32 = 1 << 1;

/// What the vCPU's CPUID describes besides the host's features.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuidTopology {
    /// This vCPU's index (= its APIC ID).
    pub cpu: u32,
    /// vCPUs in the VM: one package, one core per vCPU, one thread per core.
    pub num_cpus: u32,
    /// KVM emulates the TSC-deadline timer (`KVM_CAP_TSC_DEADLINE_TIMER`).
    pub tsc_deadline: bool,
}

/// Adapts the host-supported CPUID for one vCPU: APIC IDs and logical CPU
/// counts (leaf 1, Intel leaf 4 and 0xB/0x1F, AMD 0x8000_0001/0x8000_0008/
/// 0x8000_001E, all describing the same one-package topology), the
/// TSC-deadline bit when KVM emulates it, and the hypervisor bit.
pub fn filter_cpuid(cpuid: &mut CpuId, t: CpuidTopology) {
    let vendor = cpuid_vendor(cpuid);
    let (apic_id, num_cpus) = (t.cpu, t.num_cpus.max(1));
    // Bits needed to number all CPUs at the core level.
    let core_shift = 32 - (num_cpus - 1).leading_zeros();
    for e in cpuid.as_mut_slice().iter_mut() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (num_cpus.min(255) << 16);
                e.ecx |= CPUID_1_ECX_HYPERVISOR;
                if t.tsc_deadline {
                    e.ecx |= CPUID_1_ECX_TSC_DEADLINE;
                } else {
                    e.ecx &= !CPUID_1_ECX_TSC_DEADLINE;
                }
                if num_cpus > 1 {
                    e.edx |= 1 << 28; // HTT: the count in EBX[23:16] is valid
                } else {
                    e.edx &= !(1 << 28);
                }
            }
            // Intel deterministic cache parameters: cores per package - 1 in
            // EAX[31:26] (matching leaf 0xB's core level), and the threads
            // sharing each cache: one for per-core caches (one thread per
            // core), all vCPUs for the shared L3.
            0x4 if vendor != Vendor::Amd && e.eax & 0x1f != 0 => {
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { num_cpus - 1 } else { 0 };
                e.eax =
                    (e.eax & 0x3fff) | ((num_cpus - 1).min(63) << 26) | ((sharing & 0xfff) << 14);
            }
            0xb | 0x1f => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = core_shift;
                        e.ebx = num_cpus;
                        e.ecx = (2 << 8) | 1;
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n;
                    }
                }
            }
            0x8000_0001 if vendor == Vendor::Amd => {
                if num_cpus > 1 {
                    e.ecx |= CPUID_80000001_ECX_CMP_LEGACY;
                } else {
                    e.ecx &= !CPUID_80000001_ECX_CMP_LEGACY;
                }
            }
            // AMD: ECX[7:0] = cores - 1, ECX[15:12] = APIC ID bits for the
            // core; the rest (address sizes in EAX, features in EBX) stays.
            0x8000_0008 if vendor == Vendor::Amd => {
                e.ecx = (e.ecx & !0xf0ff) | ((num_cpus - 1).min(255)) | ((core_shift & 0xf) << 12);
            }
            // AMD extended APIC ID / compute unit / node: one thread per
            // compute unit, one node.
            0x8000_001e if vendor == Vendor::Amd => {
                e.eax = apic_id;
                e.ebx = apic_id & 0xff;
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
    }
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(l: &kvm_lapic_state, off: usize) -> u32 {
    let b = &l.regs[off..off + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(l: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        l.regs[off + i] = *b as _;
    }
}

fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Routes LINT0 as ExtINT and LINT1 as NMI (what the MP table announces).
pub fn setup_lapic_lint(l: &mut kvm_lapic_state) {
    let lvt0 = lapic_reg(l, APIC_LVT0);
    set_lapic_reg(l, APIC_LVT0, set_delivery_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(l, APIC_LVT1);
    set_lapic_reg(l, APIC_LVT1, set_delivery_mode(lvt1, APIC_MODE_NMI));
}

/// Applies the whole architectural set-up to one vCPU. Only the boot CPU gets
/// registers: application processors stay in wait-for-SIPI (in-kernel LAPIC)
/// until the guest starts them.
pub fn configure_vcpu(
    vcpu: &VcpuFd,
    cpu: u32,
    num_cpus: u32,
    base_cpuid: &CpuId,
    tsc_deadline: bool,
    boot: Option<(EntryMode, u64)>,
) -> Result<(), CpuError> {
    let kvm = |what| move |err| CpuError::Kvm { cpu, what, err };
    let mut cpuid = base_cpuid.clone();
    filter_cpuid(
        &mut cpuid,
        CpuidTopology {
            cpu,
            num_cpus,
            tsc_deadline,
        },
    );
    vcpu.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;

    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(|_| CpuError::Kvm {
        cpu,
        what: "building MSR list",
        err: kvm_ioctls::Error::new(libc::EINVAL),
    })?;
    let n = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if n != entries.len() {
        log::debug!(
            "vCPU {cpu}: KVM accepted {n} of {} boot MSRs (first rejected: {:#x})",
            entries.len(),
            entries[n].index
        );
    }
    vcpu.set_fpu(&boot_fpu()).map_err(kvm("KVM_SET_FPU"))?;
    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    setup_lapic_lint(&mut lapic);
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))?;

    if let Some((mode, entry)) = boot {
        let sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        vcpu.set_sregs(&boot_sregs(sregs, mode))
            .map_err(kvm("KVM_SET_SREGS"))?;
        vcpu.set_regs(&boot_regs(mode, entry))
            .map_err(kvm("KVM_SET_REGS"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn gdt_entries_encode_flat_segments() {
        assert_eq!(BOOT_GDT[1], 0x00cf_9b00_0000_ffff);
        assert_eq!(BOOT_GDT[2], 0x00af_9b00_0000_ffff);
        assert_eq!(BOOT_GDT[3], 0x00cf_9300_0000_ffff);
        assert_eq!(BOOT_GDT[4], 0x008f_8b00_0000_ffff);
        assert_eq!(
            gdt_entry(0xc093, 0x1234_5678, 0xabcde),
            0x12ca_9334_5678_bcde
        );
    }

    #[test]
    fn segments_decode() {
        let c64 = segment_from_gdt(BOOT_GDT[2], SEL_CODE64);
        assert_eq!(
            (c64.l, c64.db, c64.type_, c64.s, c64.present),
            (1, 0, 0xb, 1, 1)
        );
        assert_eq!(c64.limit, 0xffff_ffff);
        assert_eq!(c64.selector, 0x10);
        let c32 = segment_from_gdt(BOOT_GDT[1], SEL_CODE32);
        assert_eq!((c32.l, c32.db), (0, 1));
        let d = segment_from_gdt(BOOT_GDT[3], SEL_DATA);
        assert_eq!((d.type_, d.db, d.unusable), (3, 1, 0));
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
        let tss = segment_from_gdt(BOOT_GDT[4], SEL_TSS);
        assert_eq!((tss.type_, tss.s), (0xb, 0));
    }

    #[test]
    fn sregs_per_mode() {
        let s = boot_sregs(kvm_sregs::default(), EntryMode::Linux64);
        assert_eq!(s.cr3, PML4_START);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        assert_eq!(s.cs.selector, 0x10);
        assert_eq!(s.ds.selector, 0x18);
        assert_eq!(s.gdt.base, BOOT_GDT_START);
        let p = boot_sregs(kvm_sregs::default(), EntryMode::Pvh);
        assert_eq!(p.cr0, X86_CR0_PE | X86_CR0_ET);
        assert_eq!((p.cr4, p.efer), (0, 0));
        assert_eq!((p.cs.db, p.cs.l), (1, 0));
    }

    #[test]
    fn regs_per_mode() {
        let r = boot_regs(EntryMode::Pvh, 0x100_0000);
        assert_eq!((r.rip, r.rbx, r.rflags), (0x100_0000, PVH_INFO_START, 2));
        let r = boot_regs(EntryMode::Linux64, 0x100_0200);
        assert_eq!((r.rip, r.rsi), (0x100_0200, ZERO_PAGE_START));
    }

    #[test]
    fn page_tables_identity_map_4g() {
        let mem = crate::memory::create_guest_memory(16 << 20).unwrap();
        write_page_tables(&mem).unwrap();
        write_gdt(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        // Walk a few addresses: the 2 MiB page containing `va` maps to itself.
        for va in [0u64, 0x20_0000, 0x3fff_ffff, 0xd000_0000, 0xfee0_0000] {
            let pdpte: u64 = mem
                .read_obj(GuestAddress(PDPTE_START + (va >> 30) * 8))
                .unwrap();
            let pd = pdpte & !0xfff;
            let pde: u64 = mem
                .read_obj(GuestAddress(pd + ((va >> 21) & 511) * 8))
                .unwrap();
            assert_eq!(pde & 0x83, 0x83);
            assert_eq!(pde & !0x1f_ffff, va & !0x1f_ffff, "va {va:#x}");
        }
        let gdt2: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 16)).unwrap();
        assert_eq!(gdt2, BOOT_GDT[2]);
    }

    fn vendor_leaf(v: &[u8; 12], max: u32) -> kvm_cpuid_entry2 {
        let w = |i: usize| u32::from_le_bytes([v[i], v[i + 1], v[i + 2], v[i + 3]]);
        kvm_cpuid_entry2 {
            function: 0,
            eax: max,
            ebx: w(0),
            edx: w(4),
            ecx: w(8),
            ..Default::default()
        }
    }

    fn topo(cpu: u32, num_cpus: u32) -> CpuidTopology {
        CpuidTopology {
            cpu,
            num_cpus,
            tsc_deadline: true,
        }
    }

    fn leaf(c: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn vendor_comes_from_leaf_0() {
        for (v, want) in [
            (b"GenuineIntel", Vendor::Intel),
            (b"AuthenticAMD", Vendor::Amd),
            (b"HygonGenuine", Vendor::Amd),
            (b"KVMKVMKVM\0\0\0", Vendor::Other),
        ] {
            let c = CpuId::from_entries(&[vendor_leaf(v, 0xd)]).unwrap();
            assert_eq!(cpuid_vendor(&c), want);
        }
        assert_eq!(cpuid_vendor(&CpuId::new(0).unwrap()), Vendor::Other);
    }

    #[test]
    fn cpuid_topology_intel() {
        let entries = [
            vendor_leaf(b"GenuineIntel", 0x1f),
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0x0000_0800,
                ecx: CPUID_1_ECX_TSC_DEADLINE,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 0,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 4,
                index: 3,
                eax: (3 << 5) | 3,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 4,
                index: 0,
                eax: (1 << 5) | 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x8000_0008,
                eax: 0x3030,
                ecx: 0x1234,
                ..Default::default()
            },
        ];
        let mut c = CpuId::from_entries(&entries).unwrap();
        filter_cpuid(&mut c, topo(2, 4));
        let l1 = leaf(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 2, "APIC ID");
        assert_eq!((l1.ebx >> 16) & 0xff, 4, "logical CPUs");
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(l1.ecx & CPUID_1_ECX_HYPERVISOR, 0, "hypervisor bit");
        assert_ne!(l1.ecx & CPUID_1_ECX_TSC_DEADLINE, 0, "TSC deadline");
        assert_ne!(l1.edx & (1 << 28), 0, "HTT");
        let (smt, core) = (leaf(&c, 0xb, 0), leaf(&c, 0xb, 1));
        assert_eq!((smt.ebx, smt.edx, smt.ecx), (1, 2, 1 << 8));
        assert_eq!((core.eax, core.ebx, core.ecx), (2, 4, (2 << 8) | 1));
        // Leaf 4 agrees with leaf 0xB: 4 cores per package; L1 per core, L3
        // shared by all.
        let (l3, l1d) = (leaf(&c, 4, 3), leaf(&c, 4, 0));
        assert_eq!(l3.eax >> 26, core.ebx - 1);
        assert_eq!((l3.eax >> 14) & 0xfff, 3);
        assert_eq!(l1d.eax >> 26, 3);
        assert_eq!((l1d.eax >> 14) & 0xfff, 0);
        // AMD leaves are left alone on Intel.
        assert_eq!(leaf(&c, 0x8000_0008, 0).ecx, 0x1234);

        let mut one = CpuId::from_entries(&entries).unwrap();
        filter_cpuid(
            &mut one,
            CpuidTopology {
                cpu: 0,
                num_cpus: 1,
                tsc_deadline: false,
            },
        );
        assert_eq!(leaf(&one, 1, 0).edx & (1 << 28), 0);
        assert_eq!(leaf(&one, 1, 0).ecx & CPUID_1_ECX_TSC_DEADLINE, 0);
        assert_eq!(leaf(&one, 0xb, 1).eax, 0);
    }

    #[test]
    fn cpuid_topology_amd() {
        let entries = [
            vendor_leaf(b"AuthenticAMD", 0x10),
            kvm_cpuid_entry2 {
                function: 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 4,
                eax: 0x121,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x8000_0001,
                ecx: 1 << 22,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x8000_0008,
                eax: 0x3030,
                ebx: 0x1000,
                ecx: 0x0000_7007, // host: 8 cores, 7 APIC ID bits
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x8000_001e,
                eax: 9,
                ebx: 0x0107,
                ecx: 0x0302,
                edx: 5,
                ..Default::default()
            },
        ];
        let mut c = CpuId::from_entries(&entries).unwrap();
        filter_cpuid(&mut c, topo(2, 3));
        let l1 = leaf(&c, 1, 0);
        assert_eq!((l1.ebx >> 24, (l1.ebx >> 16) & 0xff), (2, 3));
        assert_ne!(l1.ecx & CPUID_1_ECX_TSC_DEADLINE, 0);
        // Intel's leaf 4 means nothing on AMD and is not rewritten.
        assert_eq!(leaf(&c, 4, 0).eax, 0x121);
        let ext = leaf(&c, 0x8000_0001, 0);
        assert_ne!(ext.ecx & CPUID_80000001_ECX_CMP_LEGACY, 0, "CmpLegacy");
        assert_ne!(ext.ecx & (1 << 22), 0, "other features kept");
        let sz = leaf(&c, 0x8000_0008, 0);
        assert_eq!(sz.ecx & 0xff, 2, "NC = cores - 1");
        assert_eq!((sz.ecx >> 12) & 0xf, 2, "ApicIdSize: 2 bits for 3 cores");
        assert_eq!((sz.eax, sz.ebx), (0x3030, 0x1000), "address sizes kept");
        let topo_ext = leaf(&c, 0x8000_001e, 0);
        assert_eq!(topo_ext.eax, 2, "extended APIC ID");
        assert_eq!(topo_ext.ebx, 2, "compute unit 2, one thread per unit");
        assert_eq!((topo_ext.ecx, topo_ext.edx), (0, 0), "node 0 of 1");

        let mut one = CpuId::from_entries(&entries).unwrap();
        filter_cpuid(&mut one, topo(0, 1));
        assert_eq!(
            leaf(&one, 0x8000_0001, 0).ecx & CPUID_80000001_ECX_CMP_LEGACY,
            0
        );
        assert_eq!(leaf(&one, 0x8000_0008, 0).ecx & 0xf0ff, 0);
    }

    #[test]
    fn lapic_lint_modes() {
        let mut l = kvm_lapic_state::default();
        set_lapic_reg(&mut l, APIC_LVT0, 0x0001_0000);
        setup_lapic_lint(&mut l);
        assert_eq!(lapic_reg(&l, APIC_LVT0), 0x0001_0700);
        assert_eq!(lapic_reg(&l, APIC_LVT1), 0x0000_0400);
    }
}
