// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/*
 * Per-spore accounting, aggregated in the kernel by v2 cgroup id. Only cgroups the agent put
 * in `cgroup_stats` are counted: for every other task on the host a program costs one
 * failed hash lookup.
 *
 *   sched_switch        on-CPU time of the task leaving the CPU (its sum_exec_runtime delta);
 *                       run-queue latency of the one
 *                       arriving (wakeup or preemption -> switch-in)
 *   sched_wakeup(_new)  when a watched task became runnable (task-local storage)
 *   sched_process_exec  exec events;  sched_process_exit  exit events with the exit status
 *   cgroup_skb          bytes and packets in and out (attached once, at the spores' parent)
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include "mesh.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* The watched cgroups and their counters: the agent inserts a zeroed entry per spore. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, MESH_MAX_CGROUPS);
	__type(key, __u64);
	__type(value, struct mesh_cgroup_stats);
} cgroup_stats SEC(".maps");

/* Per CPU: the running task's sum_exec_runtime when it got the CPU, and its cgroup's id if
 * watched (else 0). The kernel's own runtime (what cpu.stat sums) rather than wall time:
 * interrupt and steal time are not the task's, and the numbers agree with cpu.stat. */
struct cpu_state {
	__u64 since;
	__u64 cgroup_id;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct cpu_state);
} cpu_state SEC(".maps");

/* Per watched task: when it became runnable (0: not queued). Task-local storage, not a hash
 * keyed by pid: no lock, no allocation on the hot path, freed with the task. */
struct queued_at {
	__u64 ts;
};

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct queued_at);
} queued SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

/* tp_btf arguments are BTF-typed pointers: plain dereferences (CO-RE relocated, checked by
 * the verifier) instead of bpf_probe_read_kernel calls, which cost a helper call per field. */
static __always_inline __u64 task_cgroup_id(struct task_struct *t)
{
	return t->cgroups->dfl_cgrp->kn->id;
}

static __always_inline __u32 log2_slot(__u64 us)
{
	__u32 slot = 0;
	/* bounded loop: the verifier sees at most MESH_RQ_SLOTS - 1 iterations */
	for (int i = 0; i < MESH_RQ_SLOTS - 1; i++) {
		if (us < 2)
			break;
		us >>= 1;
		slot++;
	}
	return slot;
}

SEC("tp_btf/sched_switch")
int BPF_PROG(mesh_sched_switch, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	__u32 zero = 0;
	struct cpu_state *cs = bpf_map_lookup_elem(&cpu_state, &zero);
	if (!cs)
		return 0;
	struct mesh_cgroup_stats *st;

	/* the task leaving: its CPU time, and if still runnable, it queues again */
	if (cs->cgroup_id) {
		st = bpf_map_lookup_elem(&cgroup_stats, &cs->cgroup_id);
		if (st) {
			__u64 ran = prev->se.sum_exec_runtime;
			if (ran > cs->since)
				st->cpu_ns += ran - cs->since;
			if (prev->__state == 0) {
				struct queued_at *q = bpf_task_storage_get(&queued, prev, 0,
									   BPF_LOCAL_STORAGE_GET_F_CREATE);
				if (q)
					q->ts = bpf_ktime_get_ns();
			}
		}
	}

	/* the task arriving: remember whether it is watched, and its wait */
	__u64 cg = task_cgroup_id(next);
	st = bpf_map_lookup_elem(&cgroup_stats, &cg);
	cs->cgroup_id = st ? cg : 0;
	if (!st)
		return 0;
	cs->since = next->se.sum_exec_runtime;
	struct queued_at *q = bpf_task_storage_get(&queued, next, 0, 0);
	if (q && q->ts) {
		__u64 waited = bpf_ktime_get_ns() - q->ts;
		q->ts = 0;
		__u32 slot = log2_slot(waited / 1000);
		if (slot < MESH_RQ_SLOTS)
			st->rq_hist[slot]++;
		st->rq_count++;
		st->rq_sum_ns += waited;
	}
	return 0;
}

static __always_inline int on_wakeup(struct task_struct *p)
{
	__u64 cg = task_cgroup_id(p);
	if (!bpf_map_lookup_elem(&cgroup_stats, &cg))
		return 0;
	struct queued_at *q = bpf_task_storage_get(&queued, p, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (q)
		q->ts = bpf_ktime_get_ns();
	return 0;
}

SEC("tp_btf/sched_wakeup")
int BPF_PROG(mesh_sched_wakeup, struct task_struct *p)
{
	return on_wakeup(p);
}

SEC("tp_btf/sched_wakeup_new")
int BPF_PROG(mesh_sched_wakeup_new, struct task_struct *p)
{
	return on_wakeup(p);
}

static __always_inline void emit(__u32 kind, struct task_struct *t, __u64 cg, struct linux_binprm *bprm)
{
	struct mesh_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e)
		return;
	e->kind = kind;
	e->pid = BPF_CORE_READ(t, tgid);
	e->ppid = BPF_CORE_READ(t, real_parent, tgid);
	e->exit_code = kind == MESH_EVENT_EXIT ? BPF_CORE_READ(t, exit_code) : 0;
	e->cgroup_id = cg;
	e->ts_ns = bpf_ktime_get_ns();
	BPF_CORE_READ_STR_INTO(&e->comm, t, comm);
	e->filename[0] = 0;
	if (bprm) {
		const char *name = BPF_CORE_READ(bprm, filename);
		bpf_probe_read_kernel_str(e->filename, sizeof(e->filename), name);
	}
	bpf_ringbuf_submit(e, 0);
}

SEC("tp_btf/sched_process_exec")
int BPF_PROG(mesh_exec, struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)
{
	__u64 cg = task_cgroup_id(p);
	struct mesh_cgroup_stats *st = bpf_map_lookup_elem(&cgroup_stats, &cg);
	if (!st)
		return 0;
	__sync_fetch_and_add(&st->execs, 1);
	emit(MESH_EVENT_EXEC, p, cg, bprm);
	return 0;
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(mesh_exit, struct task_struct *p)
{
	/* one event per process: its thread-group leader */
	if (BPF_CORE_READ(p, pid) != BPF_CORE_READ(p, tgid))
		return 0;
	__u64 cg = task_cgroup_id(p);
	struct mesh_cgroup_stats *st = bpf_map_lookup_elem(&cgroup_stats, &cg);
	if (!st)
		return 0;
	__sync_fetch_and_add(&st->exits, 1);
	emit(MESH_EVENT_EXIT, p, cg, 0);
	return 0;
}

static __always_inline int count_skb(struct __sk_buff *skb, int egress)
{
	__u64 cg = bpf_skb_cgroup_id(skb);
	struct mesh_cgroup_stats *st = bpf_map_lookup_elem(&cgroup_stats, &cg);
	if (st) {
		/* softirq and process context may interleave on one CPU: atomic adds */
		if (egress) {
			__sync_fetch_and_add(&st->tx_bytes, skb->len);
			__sync_fetch_and_add(&st->tx_packets, 1);
		} else {
			__sync_fetch_and_add(&st->rx_bytes, skb->len);
			__sync_fetch_and_add(&st->rx_packets, 1);
		}
	}
	return 1; /* accounting only: always let the packet through */
}

SEC("cgroup_skb/ingress")
int mesh_skb_ingress(struct __sk_buff *skb)
{
	return count_skb(skb, 0);
}

SEC("cgroup_skb/egress")
int mesh_skb_egress(struct __sk_buff *skb)
{
	return count_skb(skb, 1);
}
