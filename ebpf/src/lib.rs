//! eBPF programs of Mycelium Mesh and the struct layouts they share with the agent.
//!
//! The programs are C (bpf/mesh.bpf.c), compiled by clang-19 for the BPF target with CO-RE
//! relocations against bpf/vmlinux.h, and embedded here as an ELF object that the agent loads
//! with aya. Nothing in this crate runs: it carries bytes and types.

/// The compiled object (programs `mesh_sched_switch`, `mesh_sched_wakeup`,
/// `mesh_sched_wakeup_new`, `mesh_exec`, `mesh_exit`, `mesh_skb_ingress`, `mesh_skb_egress`;
/// maps `cgroup_stats`, `cpu_state`, `queued`, `events`).
pub const OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/mesh.bpf.o"));

/// Run-queue latency slots: slot i counts waits of [2^i, 2^(i+1)) microseconds (slot 0 also
/// the waits under 1 us).
pub const RQ_SLOTS: usize = 32;
pub const EVENT_EXEC: u32 = 1;
pub const EVENT_EXIT: u32 = 2;

/// `struct mesh_cgroup_stats`: one watched cgroup's counters on one CPU.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupStats {
    pub cpu_ns: u64,
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub rq_count: u64,
    pub rq_sum_ns: u64,
    pub rq_hist: [u64; RQ_SLOTS],
    pub execs: u64,
    pub exits: u64,
}

impl CgroupStats {
    /// Adds another CPU's copy.
    pub fn add(&mut self, o: &CgroupStats) {
        self.cpu_ns += o.cpu_ns;
        self.rx_bytes += o.rx_bytes;
        self.rx_packets += o.rx_packets;
        self.tx_bytes += o.tx_bytes;
        self.tx_packets += o.tx_packets;
        self.rq_count += o.rq_count;
        self.rq_sum_ns += o.rq_sum_ns;
        for (a, b) in self.rq_hist.iter_mut().zip(o.rq_hist.iter()) {
            *a += b;
        }
        self.execs += o.execs;
        self.exits += o.exits;
    }

    /// Upper bound, in seconds, of run-queue slot `i`.
    pub fn rq_slot_le_seconds(i: usize) -> f64 {
        (1u64 << (i + 1)) as f64 / 1e6
    }

    /// The run-queue latency below which `q` (0..1) of the waits fell, as the upper bound of
    /// its slot, in microseconds.
    pub fn rq_quantile_us(&self, q: f64) -> Option<u64> {
        let total: u64 = self.rq_hist.iter().sum();
        if total == 0 {
            return None;
        }
        let want = (total as f64 * q).ceil() as u64;
        let mut seen = 0;
        for (i, n) in self.rq_hist.iter().enumerate() {
            seen += n;
            if seen >= want {
                return Some(1u64 << (i + 1));
            }
        }
        Some(1u64 << RQ_SLOTS)
    }
}

/// `struct mesh_event`: an exec or exit in a watched cgroup, from the ring buffer.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Event {
    pub kind: u32,
    pub pid: u32,
    pub ppid: u32,
    /// wait(2) status: (code << 8) | signal.
    pub exit_code: i32,
    pub cgroup_id: u64,
    pub ts_ns: u64,
    pub comm: [u8; 16],
    pub filename: [u8; 128],
}

impl Event {
    /// Reads an event from ring buffer bytes (None if too short).
    pub fn from_bytes(b: &[u8]) -> Option<Event> {
        if b.len() < std::mem::size_of::<Event>() {
            return None;
        }
        // SAFETY: length checked; Event is plain data valid for any bit pattern; the read is
        // unaligned-safe.
        Some(unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<Event>()) })
    }

    pub fn comm(&self) -> String {
        c_string(&self.comm)
    }

    pub fn filename(&self) -> String {
        c_string(&self.filename)
    }

    /// Exit code if the process exited, None if a signal ended it.
    pub fn code(&self) -> Option<i32> {
        (self.exit_code & 0x7f == 0).then_some((self.exit_code >> 8) & 0xff)
    }

    /// Signal that ended the process, if one did.
    pub fn signal(&self) -> Option<i32> {
        let s = self.exit_code & 0x7f;
        (s != 0).then_some(s)
    }
}

fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    include!(concat!(env!("OUT_DIR"), "/c_layout.rs"));

    #[test]
    fn rust_mirrors_match_the_c_layout() {
        assert!(
            !C_SIZES.is_empty(),
            "build.rs could not compile the layout probe (need cc)"
        );
        for (name, size) in C_SIZES {
            let rust = match *name {
                "mesh_cgroup_stats" => size_of::<CgroupStats>(),
                "mesh_event" => size_of::<Event>(),
                other => panic!("unknown struct {other}"),
            };
            assert_eq!(rust, *size, "size of {name}");
        }
        for (field, offset, size) in C_FIELDS {
            let (rust_offset, rust_size) = match *field {
                "mesh_cgroup_stats.cpu_ns" => (offset_of!(CgroupStats, cpu_ns), 8),
                "mesh_cgroup_stats.rx_bytes" => (offset_of!(CgroupStats, rx_bytes), 8),
                "mesh_cgroup_stats.rx_packets" => (offset_of!(CgroupStats, rx_packets), 8),
                "mesh_cgroup_stats.tx_bytes" => (offset_of!(CgroupStats, tx_bytes), 8),
                "mesh_cgroup_stats.tx_packets" => (offset_of!(CgroupStats, tx_packets), 8),
                "mesh_cgroup_stats.rq_count" => (offset_of!(CgroupStats, rq_count), 8),
                "mesh_cgroup_stats.rq_sum_ns" => (offset_of!(CgroupStats, rq_sum_ns), 8),
                "mesh_cgroup_stats.rq_hist" => (offset_of!(CgroupStats, rq_hist), 8 * RQ_SLOTS),
                "mesh_cgroup_stats.execs" => (offset_of!(CgroupStats, execs), 8),
                "mesh_cgroup_stats.exits" => (offset_of!(CgroupStats, exits), 8),
                "mesh_event.kind" => (offset_of!(Event, kind), 4),
                "mesh_event.pid" => (offset_of!(Event, pid), 4),
                "mesh_event.ppid" => (offset_of!(Event, ppid), 4),
                "mesh_event.exit_code" => (offset_of!(Event, exit_code), 4),
                "mesh_event.cgroup_id" => (offset_of!(Event, cgroup_id), 8),
                "mesh_event.ts_ns" => (offset_of!(Event, ts_ns), 8),
                "mesh_event.comm" => (offset_of!(Event, comm), 16),
                "mesh_event.filename" => (offset_of!(Event, filename), 128),
                other => panic!("field {other} has no Rust mirror"),
            };
            assert_eq!((rust_offset, rust_size), (*offset, *size), "{field}");
        }
        for (name, value) in C_CONSTS {
            let rust = match *name {
                "MESH_RQ_SLOTS" => RQ_SLOTS as u64,
                "MESH_EVENT_EXEC" => u64::from(EVENT_EXEC),
                "MESH_EVENT_EXIT" => u64::from(EVENT_EXIT),
                other => panic!("unknown constant {other}"),
            };
            assert_eq!(rust, *value, "{name}");
        }
    }

    #[test]
    fn the_object_is_a_bpf_elf() {
        assert_eq!(&OBJECT[..4], b"\x7fELF");
        // e_machine 247 = EM_BPF
        assert_eq!(u16::from_le_bytes([OBJECT[18], OBJECT[19]]), 247);
    }

    #[test]
    fn exit_status_decodes_codes_and_signals() {
        let mut e = Event::from_bytes(&[0u8; size_of::<Event>()]).unwrap();
        e.exit_code = 3 << 8;
        assert_eq!((e.code(), e.signal()), (Some(3), None));
        e.exit_code = 9;
        assert_eq!((e.code(), e.signal()), (None, Some(9)));
    }

    #[test]
    fn quantiles_use_slot_upper_bounds() {
        let mut s = CgroupStats::default();
        s.rq_hist[0] = 90;
        s.rq_hist[10] = 10;
        assert_eq!(s.rq_quantile_us(0.5), Some(2));
        assert_eq!(s.rq_quantile_us(0.99), Some(2048));
    }
}
