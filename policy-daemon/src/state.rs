//! The device state one `milk-policy` daemon hands to the next in a planned swap
//! (vhost-user `SET_DEVICE_STATE_FD`): the runtime's [`SessionState`] in a small versioned
//! little-endian encoding. Decoding checks every length and tag; a bad blob is an error,
//! never a panic.

use std::collections::HashMap;

use virtio_milk::policy::{CpuState, SchedView, TaskInfo, TaskState};
use virtio_milk::protocol::{COMM_LEN, MAX_CPUS};
use virtio_milk::runtime::SessionState;

/// First bytes of an encoded state (format version 1).
pub const MAGIC: &[u8; 8] = b"MILKST01";

/// Largest task table accepted (the guest has far fewer threads).
pub const MAX_TASKS: usize = 1 << 20;

/// Why a state blob was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    /// Wrong magic or version.
    #[error("not a virtio-milk device state (bad magic)")]
    Magic,
    /// The blob ended early.
    #[error("device state truncated")]
    Truncated,
    /// Bytes left after the state.
    #[error("device state has trailing bytes")]
    Trailing,
    /// A tag or count out of range.
    #[error("device state field out of range: {0}")]
    Field(&'static str),
}

/// Encode `s`.
pub fn encode(s: &SessionState) -> Vec<u8> {
    let mut b = Vec::with_capacity(64 + s.view.tasks.len() * 64);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&s.session_id.to_le_bytes());
    b.push(u8::from(s.established));
    b.extend_from_slice(&s.cookie.to_le_bytes());
    b.extend_from_slice(&s.heartbeats.to_le_bytes());
    b.extend_from_slice(&(s.view.cpus.len() as u32).to_le_bytes());
    for (i, c) in s.view.cpus.iter().enumerate() {
        let (tag, pid) = match c {
            CpuState::Unknown => (0u8, 0),
            CpuState::Idle => (1, 0),
            CpuState::Committed(p) => (2, *p),
            CpuState::Running(p) => (3, *p),
        };
        b.push(tag);
        b.extend_from_slice(&pid.to_le_bytes());
        b.extend_from_slice(&s.inflight.get(i).copied().unwrap_or(0).to_le_bytes());
        b.extend_from_slice(&s.inflight_ns.get(i).copied().unwrap_or(0).to_le_bytes());
    }
    let mut tasks: Vec<&TaskInfo> = s.view.tasks.values().collect();
    tasks.sort_by_key(|t| t.pid);
    b.extend_from_slice(&(tasks.len() as u32).to_le_bytes());
    for t in tasks {
        b.extend_from_slice(&t.pid.to_le_bytes());
        b.extend_from_slice(&t.tgid.to_le_bytes());
        b.extend_from_slice(&t.comm);
        b.extend_from_slice(&t.cpus_allowed.to_le_bytes());
        b.extend_from_slice(&t.weight.to_le_bytes());
        b.extend_from_slice(&t.nice.to_le_bytes());
        b.extend_from_slice(&t.seq.to_le_bytes());
        let (tag, cpu) = match t.state {
            TaskState::Blocked => (0u8, 0),
            TaskState::Runnable => (1, 0),
            TaskState::Dispatched(c) => (2, c),
            TaskState::Running(c) => (3, c),
        };
        b.push(tag);
        b.extend_from_slice(&cpu.to_le_bytes());
        b.extend_from_slice(&t.last_cpu.to_le_bytes());
        b.extend_from_slice(&t.runnable_since_ns.to_le_bytes());
    }
    b
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        if self.0.len() < n {
            return Err(StateError::Truncated);
        }
        let (h, t) = self.0.split_at(n);
        self.0 = t;
        Ok(h)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], StateError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, StateError> {
        Ok(self.arr::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, StateError> {
        Ok(u16::from_le_bytes(self.arr()?))
    }
    fn u32(&mut self) -> Result<u32, StateError> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64, StateError> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
}

/// Decode a blob made by [`encode`].
pub fn decode(bytes: &[u8]) -> Result<SessionState, StateError> {
    let mut r = Reader(bytes);
    if r.take(MAGIC.len()).map_err(|_| StateError::Magic)? != MAGIC {
        return Err(StateError::Magic);
    }
    let session_id = r.u64()?;
    let established = match r.u8()? {
        0 => false,
        1 => true,
        _ => return Err(StateError::Field("established")),
    };
    let cookie = r.u64()?;
    let heartbeats = r.u64()?;
    let ncpu = r.u32()?;
    if ncpu == 0 || ncpu > MAX_CPUS {
        return Err(StateError::Field("cpu count"));
    }
    let mut view = SchedView::new(ncpu);
    let mut inflight = Vec::with_capacity(ncpu as usize);
    let mut inflight_ns = Vec::with_capacity(ncpu as usize);
    for c in view.cpus.iter_mut() {
        let tag = r.u8()?;
        let pid = r.u32()?;
        *c = match tag {
            0 => CpuState::Unknown,
            1 => CpuState::Idle,
            2 => CpuState::Committed(pid),
            3 => CpuState::Running(pid),
            _ => return Err(StateError::Field("cpu state")),
        };
        inflight.push(r.u64()?);
        inflight_ns.push(r.u64()?);
    }
    let ntask = r.u32()? as usize;
    if ntask > MAX_TASKS {
        return Err(StateError::Field("task count"));
    }
    let mut tasks = HashMap::with_capacity(ntask);
    for _ in 0..ntask {
        let pid = r.u32()?;
        let tgid = r.u32()?;
        let comm: [u8; COMM_LEN] = r.arr()?;
        let cpus_allowed = r.u64()?;
        let weight = r.u32()?;
        let nice = r.u32()? as i32;
        let seq = r.u64()?;
        let tag = r.u8()?;
        let cpu = r.u16()?;
        if u32::from(cpu) >= ncpu && tag >= 2 {
            return Err(StateError::Field("task cpu"));
        }
        let state = match tag {
            0 => TaskState::Blocked,
            1 => TaskState::Runnable,
            2 => TaskState::Dispatched(cpu),
            3 => TaskState::Running(cpu),
            _ => return Err(StateError::Field("task state")),
        };
        let last_cpu = r.u16()?;
        let runnable_since_ns = r.u64()?;
        let t = TaskInfo {
            pid,
            tgid,
            comm,
            cpus_allowed,
            weight,
            nice,
            seq,
            state,
            last_cpu,
            runnable_since_ns,
        };
        if tasks.insert(pid, t).is_some() {
            return Err(StateError::Field("duplicate task"));
        }
    }
    if !r.0.is_empty() {
        return Err(StateError::Trailing);
    }
    view.tasks = tasks;
    Ok(SessionState {
        session_id,
        established,
        view,
        cookie,
        inflight,
        inflight_ns,
        heartbeats,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SessionState {
        let mut view = SchedView::new(2);
        view.cpus = vec![CpuState::Committed(7), CpuState::Running(0)];
        view.tasks.insert(
            7,
            TaskInfo {
                pid: 7,
                tgid: 7,
                comm: *b"worker\0\0\0\0\0\0\0\0\0\0",
                cpus_allowed: 3,
                weight: 100,
                nice: -5,
                seq: 42,
                state: TaskState::Dispatched(0),
                last_cpu: 1,
                runnable_since_ns: 123,
            },
        );
        SessionState {
            session_id: 99,
            established: true,
            view,
            cookie: 17,
            inflight: vec![17, 0],
            inflight_ns: vec![5, 0],
            heartbeats: 3,
        }
    }

    #[test]
    fn round_trip() {
        let s = sample();
        let d = decode(&encode(&s)).unwrap();
        assert_eq!(d.session_id, 99);
        assert!(d.established);
        assert_eq!(d.cookie, 17);
        assert_eq!(d.heartbeats, 3);
        assert_eq!(d.inflight, vec![17, 0]);
        assert_eq!(d.inflight_ns, vec![5, 0]);
        assert_eq!(d.view.cpus, s.view.cpus);
        let t = &d.view.tasks[&7];
        assert_eq!(t.nice, -5);
        assert_eq!(t.seq, 42);
        assert_eq!(t.state, TaskState::Dispatched(0));
        assert_eq!(&t.comm[..6], b"worker");
    }

    #[test]
    fn every_truncation_and_bad_field_is_an_error() {
        let b = encode(&sample());
        for n in 0..b.len() {
            assert!(decode(&b[..n]).is_err(), "prefix of {n} bytes accepted");
        }
        let mut t = b.clone();
        t.push(0);
        assert_eq!(decode(&t).err(), Some(StateError::Trailing));
        let mut m = b.clone();
        m[0] = b'X';
        assert_eq!(decode(&m).err(), Some(StateError::Magic));
        let mut e = b.clone();
        e[16] = 2; // established must be 0 or 1
        assert_eq!(decode(&e).err(), Some(StateError::Field("established")));
        let mut c = b;
        c[33..37].copy_from_slice(&0u32.to_le_bytes()); // cpu count
        assert_eq!(decode(&c).err(), Some(StateError::Field("cpu count")));
    }
}
