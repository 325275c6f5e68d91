/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * Structs shared by the eBPF programs and the agent. The Rust side mirrors them with
 * #[repr(C)] types (ebpf/src/lib.rs) and a test checks that sizes and offsets agree.
 * The includer provides __u32/__u64 (vmlinux.h in BPF, <linux/types.h> on the host).
 */
#ifndef MESH_H
#define MESH_H

/* log2 buckets of run-queue latency in microseconds: slot i counts [2^i, 2^(i+1)) us,
 * slot 0 also counts < 1 us */
#define MESH_RQ_SLOTS 32
#define MESH_MAX_CGROUPS 16384
#define MESH_MAX_QUEUED 65536

#define MESH_EVENT_EXEC 1
#define MESH_EVENT_EXIT 2

/* Per watched cgroup (key: v2 cgroup id), one copy per CPU. */
struct mesh_cgroup_stats {
	__u64 cpu_ns;
	__u64 rx_bytes;
	__u64 rx_packets;
	__u64 tx_bytes;
	__u64 tx_packets;
	__u64 rq_count;
	__u64 rq_sum_ns;
	__u64 rq_hist[MESH_RQ_SLOTS];
	__u64 execs;
	__u64 exits;
};

/* An exec or a process exit in a watched cgroup (ring buffer). */
struct mesh_event {
	__u32 kind;
	__u32 pid;
	__u32 ppid;
	/* wait(2) status as the kernel keeps it: (code << 8) | signal */
	__s32 exit_code;
	__u64 cgroup_id;
	__u64 ts_ns;
	char comm[16];
	char filename[128];
};

#endif
