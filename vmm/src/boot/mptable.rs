//! Intel MultiProcessor Specification 1.4 tables.
//!
//! Without ACPI, an SMP Linux guest (CONFIG_X86_MPPARSE) discovers its CPUs,
//! the IOAPIC and the ISA interrupt routing from these tables. The floating
//! pointer sits at the start of the EBDA (which Linux scans), immediately
//! followed by the configuration table:
//!
//! - one processor entry per vCPU (APIC ID = vCPU index, CPU 0 is the BSP),
//! - one ISA bus,
//! - one IOAPIC (ID = number of vCPUs) at [`IOAPIC_START`],
//! - an I/O interrupt entry per IOAPIC pin (ISA IRQ n -> pin n),
//! - local interrupts: ExtINT on LINT0, NMI on LINT1.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{APIC_START, IOAPIC_START, IRQ_MAX, MAX_VCPUS, MPTABLE_START};

const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const PROCESSOR_ENTRY_LEN: usize = 20;
const SHORT_ENTRY_LEN: usize = 8;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

const CPU_FLAG_ENABLED: u8 = 1;
const CPU_FLAG_BSP: u8 = 2;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const SPEC_REVISION: u8 = 4;
const ISA_BUS_ID: u8 = 0;
/// CPU signature: family 6 (the value is informational for Linux).
const CPU_SIGNATURE: u32 = 0x600;
/// CPUID.1:EDX bits FPU and APIC.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

/// Errors writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// Unsupported number of CPUs.
    #[error("MP table supports 1..={MAX_VCPUS} CPUs, got {0}")]
    CpuCount(u32),
    /// The table does not fit in guest memory.
    #[error("MP table does not fit in guest memory")]
    NotEnoughMemory,
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// Size of the whole MP table (floating pointer + configuration table).
pub fn mptable_size(num_cpus: u32) -> usize {
    FLOATING_POINTER_LEN
        + HEADER_LEN
        + PROCESSOR_ENTRY_LEN * num_cpus as usize
        + SHORT_ENTRY_LEN * (1 + 1 + (IRQ_MAX as usize + 1) + 2)
}

/// Builds the MP table bytes for a table placed at guest address `base`.
pub fn mptable_bytes(num_cpus: u32, base: u64) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 || num_cpus > MAX_VCPUS {
        return Err(MptableError::CpuCount(num_cpus));
    }
    let ioapic_id = num_cpus as u8;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = CPU_FLAG_ENABLED | if cpu == 0 { CPU_FLAG_BSP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu as u8, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    for irq in 0..=IRQ_MAX as u8 {
        // Polarity/trigger "conforms to bus" (ISA: active high, edge).
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0]);
        entries.extend_from_slice(&[ISA_BUS_ID, irq, ioapic_id, irq]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0]);
    entries.extend_from_slice(&[ISA_BUS_ID, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0]);
    entries.extend_from_slice(&[ISA_BUS_ID, 0, 0xff, 1]);
    count += 2;

    let table_len = HEADER_LEN + entries.len();
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&(table_len as u16).to_le_bytes());
    header.push(SPEC_REVISION);
    header.push(0); // checksum, patched below
    header.extend_from_slice(b"MILK    "); // OEM ID, 8 bytes
    header.extend_from_slice(b"MILK-VMM    "); // product ID, 12 bytes
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    header.extend_from_slice(&[0u8; 4]); // extended table length/checksum, reserved
    debug_assert_eq!(header.len(), HEADER_LEN);

    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let config_addr = base + FLOATING_POINTER_LEN as u64;
    let mut fp = Vec::with_capacity(FLOATING_POINTER_LEN);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(config_addr as u32).to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(SPEC_REVISION);
    fp.push(0); // checksum
    fp.extend_from_slice(&[0u8; 5]); // feature bytes: config table present, no IMCR
    fp[10] = checksum(&fp);

    let mut out = fp;
    out.extend_from_slice(&table);
    debug_assert_eq!(out.len(), mptable_size(num_cpus));
    Ok(out)
}

/// Writes the MP table for `num_cpus` CPUs at [`MPTABLE_START`].
pub fn setup_mptable<M: GuestMemoryBackend>(mem: &M, num_cpus: u32) -> Result<(), MptableError> {
    let bytes = mptable_bytes(num_cpus, MPTABLE_START)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(|_| MptableError::NotEnoughMemory)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn floating_pointer_is_valid() {
        let t = mptable_bytes(2, MPTABLE_START).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        let phys = u32::from_le_bytes(t[4..8].try_into().unwrap());
        assert_eq!(phys as u64, MPTABLE_START + 16);
        assert_eq!(t[8], 1);
        assert_eq!(t[9], 4);
        assert_eq!(sum(&t[0..16]), 0, "floating pointer checksum");
        assert_eq!(t[11], 0, "feature byte 1: configuration table present");
    }

    #[test]
    fn config_table_header_and_checksum() {
        let n = 4;
        let t = mptable_bytes(n, MPTABLE_START).unwrap();
        let cfg = &t[16..];
        assert_eq!(&cfg[0..4], b"PCMP");
        let len = u16::from_le_bytes(cfg[4..6].try_into().unwrap()) as usize;
        assert_eq!(len, cfg.len());
        assert_eq!(sum(cfg), 0, "configuration table checksum");
        let count = u16::from_le_bytes(cfg[34..36].try_into().unwrap());
        assert_eq!(count as u32, n + 1 + 1 + 24 + 2);
        let lapic = u32::from_le_bytes(cfg[36..40].try_into().unwrap());
        assert_eq!(lapic as u64, APIC_START);
        assert_eq!(t.len(), mptable_size(n));
    }

    #[test]
    fn processor_entries() {
        let t = mptable_bytes(3, MPTABLE_START).unwrap();
        let e = &t[16 + 44..];
        for cpu in 0..3usize {
            let p = &e[cpu * 20..cpu * 20 + 20];
            assert_eq!(p[0], ENTRY_PROCESSOR);
            assert_eq!(p[1] as usize, cpu, "APIC ID");
            assert_eq!(p[3] & CPU_FLAG_ENABLED, CPU_FLAG_ENABLED);
            assert_eq!(p[3] & CPU_FLAG_BSP != 0, cpu == 0, "only CPU 0 is the BSP");
        }
        let rest = &e[60..];
        assert_eq!(
            &rest[0..8],
            &[ENTRY_BUS, 0, b'I', b'S', b'A', b' ', b' ', b' ']
        );
        assert_eq!(rest[8], ENTRY_IOAPIC);
        assert_eq!(rest[9], 3, "IOAPIC ID follows the CPUs");
        assert_eq!(rest[11], 1, "IOAPIC enabled");
        assert_eq!(
            u32::from_le_bytes(rest[12..16].try_into().unwrap()) as u64,
            IOAPIC_START
        );
    }

    #[test]
    fn interrupt_routing() {
        let n = 1;
        let t = mptable_bytes(n, MPTABLE_START).unwrap();
        let ints = &t[16 + 44 + 20 + 16..];
        for irq in 0..24usize {
            let e = &ints[irq * 8..irq * 8 + 8];
            assert_eq!(e[0], ENTRY_IO_INTERRUPT);
            assert_eq!(e[1], INT_TYPE_INT);
            assert_eq!(e[5] as usize, irq, "source bus IRQ");
            assert_eq!(e[6], 1, "destination IOAPIC ID");
            assert_eq!(e[7] as usize, irq, "IOAPIC pin");
        }
        let local = &ints[24 * 8..];
        assert_eq!(local[0..2], [ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT]);
        assert_eq!(local[7], 0, "ExtINT on LINT0");
        assert_eq!(local[8..10], [ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI]);
        assert_eq!(local[15], 1, "NMI on LINT1");
        assert_eq!(local.len(), 16);
    }

    #[test]
    fn cpu_count_bounds() {
        assert!(mptable_bytes(0, MPTABLE_START).is_err());
        assert!(mptable_bytes(MAX_VCPUS + 1, MPTABLE_START).is_err());
        let t = mptable_bytes(MAX_VCPUS, MPTABLE_START).unwrap();
        assert!(MPTABLE_START + t.len() as u64 <= crate::layout::HIMEM_START);
    }

    #[test]
    fn written_to_guest_memory() {
        let mem = crate::memory::create_guest_memory(16 << 20).unwrap();
        setup_mptable(&mem, 2).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(MPTABLE_START))
            .unwrap();
        assert_eq!(&sig, b"_MP_");
        let mut sig2 = [0u8; 4];
        mem.read_slice(&mut sig2, GuestAddress(MPTABLE_START + 16))
            .unwrap();
        assert_eq!(&sig2, b"PCMP");
    }
}
