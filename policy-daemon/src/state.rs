//! The device state one `milk-policy` daemon hands to the next in a planned swap
//! (vhost-user `SET_DEVICE_STATE_FD`): the runtime's [`SessionState`] in a small versioned
//! little-endian encoding. Decoding checks every length and tag; a bad blob is an error,
//! never a panic.

use std::collections::HashMap;

use virtio_milk::policy::{CpuState, DecisionKind, Granted, SchedView, TaskInfo, TaskState};
use virtio_milk::protocol::Gtid;
use virtio_milk::protocol::{COMM_LEN, MAX_CPUS};
use virtio_milk::runtime::acks::Commit;
use virtio_milk::runtime::SessionState;

/// First bytes of an encoded state (format version 2: protocol v2 tables).
pub const MAGIC: &[u8; 8] = b"MILKST02";

/// Largest task table accepted (the guest has far fewer threads).
pub const MAX_TASKS: usize = 1 << 20;

/// Most decisions in flight per CPU accepted.
pub const MAX_PENDING: usize = 1 << 12;

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

fn cpu_state(c: CpuState) -> (u8, u64) {
    match c {
        CpuState::Unknown => (0, 0),
        CpuState::Idle => (1, 0),
        CpuState::Committed(g) => (2, g.0),
        CpuState::Running(g) => (3, g.0),
        CpuState::Released => (4, 0),
    }
}

/// Encode `s`.
pub fn encode(s: &SessionState) -> Vec<u8> {
    let mut b = Vec::with_capacity(64 + s.view.tasks.len() * 96);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&s.session_id.to_le_bytes());
    b.push(u8::from(s.established));
    b.extend_from_slice(&s.last_cookie.to_le_bytes());
    b.extend_from_slice(&s.heartbeats.to_le_bytes());
    b.extend_from_slice(&s.view.granted.tick_us.to_le_bytes());
    b.push(u8::from(s.view.granted.running));
    b.extend_from_slice(&(s.view.cpus.len() as u32).to_le_bytes());
    for c in &s.view.cpus {
        let (tag, g) = cpu_state(c.state);
        b.push(tag);
        b.extend_from_slice(&g.to_le_bytes());
        b.extend_from_slice(&(c.pending.len() as u32).to_le_bytes());
        for p in &c.pending {
            b.extend_from_slice(&p.0.to_le_bytes());
        }
    }
    b.extend_from_slice(&(s.commits.len() as u32).to_le_bytes());
    for (cpu, c) in &s.commits {
        b.extend_from_slice(&cpu.to_le_bytes());
        b.extend_from_slice(&c.cookie.to_le_bytes());
        b.push(match c.kind {
            DecisionKind::Run => 0,
            DecisionKind::Staged => 1,
            DecisionKind::RunPreempt => 2,
            DecisionKind::Preempt => 3,
        });
        b.extend_from_slice(&c.gtid.0.to_le_bytes());
        b.extend_from_slice(&c.seq.to_le_bytes());
        b.extend_from_slice(&c.sent_ns.to_le_bytes());
        b.extend_from_slice(&c.epoch.to_le_bytes());
    }
    let mut tasks: Vec<&TaskInfo> = s.view.tasks.values().collect();
    tasks.sort_by_key(|t| t.gtid.0);
    b.extend_from_slice(&(tasks.len() as u32).to_le_bytes());
    for t in tasks {
        b.extend_from_slice(&t.gtid.0.to_le_bytes());
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
        b.extend_from_slice(&t.runtime_ns.to_le_bytes());
        b.extend_from_slice(&t.running_since_ns.to_le_bytes());
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
    fn flag(&mut self, what: &'static str) -> Result<bool, StateError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(StateError::Field(what)),
        }
    }
}

/// Decode a blob made by [`encode`].
pub fn decode(bytes: &[u8]) -> Result<SessionState, StateError> {
    let mut r = Reader(bytes);
    if r.take(MAGIC.len()).map_err(|_| StateError::Magic)? != MAGIC {
        return Err(StateError::Magic);
    }
    let session_id = r.u64()?;
    let established = r.flag("established")?;
    let last_cookie = r.u64()?;
    let heartbeats = r.u64()?;
    let tick_us = r.u32()?;
    let running = r.flag("granted running")?;
    let ncpu = r.u32()?;
    if ncpu == 0 || ncpu > MAX_CPUS {
        return Err(StateError::Field("cpu count"));
    }
    let mut view = SchedView::new(ncpu);
    view.granted = Granted { tick_us, running };
    for c in view.cpus.iter_mut() {
        let tag = r.u8()?;
        let g = Gtid(r.u64()?);
        c.state = match tag {
            0 => CpuState::Unknown,
            1 => CpuState::Idle,
            2 => CpuState::Committed(g),
            3 => CpuState::Running(g),
            4 => CpuState::Released,
            _ => return Err(StateError::Field("cpu state")),
        };
        let np = r.u32()? as usize;
        if np > MAX_PENDING {
            return Err(StateError::Field("pending count"));
        }
        for _ in 0..np {
            c.pending.push(Gtid(r.u64()?));
        }
    }
    let nc = r.u32()? as usize;
    if nc > MAX_PENDING * ncpu as usize {
        return Err(StateError::Field("commitment count"));
    }
    let mut commits = Vec::with_capacity(nc);
    for _ in 0..nc {
        let cpu = r.u16()?;
        if u32::from(cpu) >= ncpu {
            return Err(StateError::Field("commitment cpu"));
        }
        let cookie = r.u64()?;
        let kind = match r.u8()? {
            0 => DecisionKind::Run,
            1 => DecisionKind::Staged,
            2 => DecisionKind::RunPreempt,
            3 => DecisionKind::Preempt,
            _ => return Err(StateError::Field("commitment kind")),
        };
        let c = Commit {
            cookie,
            kind,
            gtid: Gtid(r.u64()?),
            seq: r.u64()?,
            sent_ns: r.u64()?,
            epoch: r.u64()?,
        };
        commits.push((cpu, c));
    }
    let ntask = r.u32()? as usize;
    if ntask > MAX_TASKS {
        return Err(StateError::Field("task count"));
    }
    let mut tasks = HashMap::with_capacity(ntask);
    for _ in 0..ntask {
        let gtid = Gtid(r.u64()?);
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
        let runtime_ns = r.u64()?;
        let running_since_ns = r.u64()?;
        let t = TaskInfo {
            gtid,
            tgid,
            comm,
            cpus_allowed,
            weight,
            nice,
            seq,
            state,
            last_cpu,
            runnable_since_ns,
            runtime_ns,
            running_since_ns,
        };
        if tasks.insert(gtid, t).is_some() {
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
        commits,
        last_cookie,
        heartbeats,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SessionState {
        let mut view = SchedView::new(2);
        view.cpus[0].state = CpuState::Running(Gtid::new(7, 1));
        view.cpus[1].state = CpuState::Released;
        view.granted = Granted {
            tick_us: 1000,
            running: true,
        };
        let mut t = TaskInfo::new(Gtid::new(7, 1), 3);
        t.comm[..6].copy_from_slice(b"worker");
        t.nice = -5;
        t.seq = 42;
        t.state = TaskState::Running(0);
        t.last_cpu = 1;
        t.runtime_ns = 99;
        view.tasks.insert(t.gtid, t);
        view.cpus[0].pending.push(Gtid::new(7, 1));
        let commit = Commit {
            cookie: 17,
            kind: DecisionKind::Staged,
            gtid: Gtid::new(7, 1),
            seq: 42,
            sent_ns: 5,
            epoch: 2,
        };
        SessionState {
            session_id: 99,
            established: true,
            view,
            commits: vec![(0, commit)],
            last_cookie: 17,
            heartbeats: 3,
        }
    }

    #[test]
    fn round_trip() {
        let s = sample();
        let d = decode(&encode(&s)).unwrap();
        assert_eq!(d.session_id, 99);
        assert!(d.established);
        assert_eq!(d.last_cookie, 17);
        assert_eq!(d.heartbeats, 3);
        assert_eq!(d.view.cpus, s.view.cpus);
        assert_eq!(d.view.granted, s.view.granted);
        assert_eq!(d.commits, s.commits);
        let t = &d.view.tasks[&Gtid::new(7, 1)];
        assert_eq!(t.nice, -5);
        assert_eq!(t.seq, 42);
        assert_eq!(t.runtime_ns, 99);
        assert_eq!(t.state, TaskState::Running(0));
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
        c[38..42].copy_from_slice(&0u32.to_le_bytes()); // cpu count
        assert_eq!(decode(&c).err(), Some(StateError::Field("cpu count")));
    }
}
