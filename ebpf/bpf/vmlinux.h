/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * The subset of the kernel's types (from `bpftool btf dump file /sys/kernel/btf/vmlinux
 * format c` on 6.12 and 6.18) that mesh.bpf.c reads. Every struct carries
 * preserve_access_index, so clang emits CO-RE relocations and libbpf/aya move each field to
 * wherever the running kernel's BTF puts it: only the names and types must match, not the
 * layout. A full dump is 2.8 MB; this keeps the repository readable.
 */
#ifndef MESH_VMLINUX_H
#define MESH_VMLINUX_H

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef signed char __s8;
typedef short __s16;
typedef int __s32;
typedef long long __s64;
typedef __u16 __be16;
typedef __u32 __be32;
typedef __u32 __wsum;
typedef __u64 u64;
typedef __u32 u32;
typedef int pid_t;
typedef _Bool bool;
#define true 1
#define false 0

enum bpf_map_type {
	BPF_MAP_TYPE_HASH = 1,
	BPF_MAP_TYPE_ARRAY = 2,
	BPF_MAP_TYPE_PERCPU_HASH = 5,
	BPF_MAP_TYPE_PERCPU_ARRAY = 6,
	BPF_MAP_TYPE_RINGBUF = 27,
	BPF_MAP_TYPE_TASK_STORAGE = 29,
};

enum {
	BPF_LOCAL_STORAGE_GET_F_CREATE = 1,
};

enum {
	BPF_F_NO_PREALLOC = 1,
};

enum {
	BPF_ANY = 0,
	BPF_NOEXIST = 1,
	BPF_EXIST = 2,
};

#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)

struct kernfs_node {
	u64 id;
};

struct cgroup {
	struct kernfs_node *kn;
};

struct css_set {
	struct cgroup *dfl_cgrp;
};

struct sched_entity {
	u64 sum_exec_runtime;
};

struct task_struct {
	unsigned int __state;
	struct sched_entity se;
	pid_t pid;
	pid_t tgid;
	struct task_struct *real_parent;
	struct css_set *cgroups;
	int exit_code;
	char comm[16];
};

struct linux_binprm {
	const char *filename;
};

/* uapi: the context of cgroup_skb programs (fields read: len) */
struct __sk_buff {
	__u32 len;
};

#pragma clang attribute pop

#endif
