//! The only module that speaks io_uring: one ring per worker thread, a registered buffer
//! ring that multishot receives fill, and the few operations the proxy submits.
//!
//! Callers pass an opaque `u64` token with each operation and get it back in its completion.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use io_uring::{IoUring, cqueue, opcode, squeue, types};

/// Token of operations whose completion nobody needs (cancellations).
pub const IGNORE: u64 = u64::MAX;

/// One completion, copied out of the completion queue.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    pub token: u64,
    pub result: i32,
    /// A multishot operation stays armed after this completion.
    pub more: bool,
    /// Buffer from the buffer ring that holds the received bytes (`result` of them).
    pub buffer: Option<u16>,
}

/// Group id of our single provided-buffer ring.
const BUF_GROUP: u16 = 7;

/// Receive buffers the kernel picks from (IORING_REGISTER_PBUF_RING).
struct BufRing {
    /// `entries` ring slots, page aligned (mmap), shared with the kernel.
    ring: *mut types::BufRingEntry,
    ring_bytes: usize,
    entries: u16,
    tail: u16,
    /// `entries * size` bytes the kernel writes into: only ever touched through this raw
    /// pointer (never a Rust reference to the whole area), so kernel writes alias nothing.
    memory: *mut u8,
    size: usize,
}

impl BufRing {
    fn new(entries: u16, size: usize) -> io::Result<BufRing> {
        let ring_bytes = usize::from(entries) * std::mem::size_of::<types::BufRingEntry>();
        // SAFETY: anonymous private mapping; checked for MAP_FAILED below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ring_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(BufRing {
            ring: ptr.cast(),
            ring_bytes,
            entries,
            tail: 0,
            memory: Box::into_raw(vec![0u8; usize::from(entries) * size].into_boxed_slice()).cast(),
            size,
        })
    }

    /// Hand buffer `id` (back) to the kernel.
    fn push(&mut self, id: u16) {
        let mask = self.entries - 1;
        let slot = usize::from(self.tail & mask);
        let addr = self.memory as u64 + u64::from(id) * self.size as u64;
        // SAFETY: slot < entries, inside the mapping; the kernel reads only slots before tail.
        let entry = unsafe { &mut *self.ring.add(slot) };
        entry.set_addr(addr);
        entry.set_len(u32::try_from(self.size).unwrap_or(u32::MAX));
        entry.set_bid(id);
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the tail field overlays slot 0's reserved word; the kernel reads it with
        // acquire semantics, so a release store publishes the entry written above.
        unsafe {
            let tail = types::BufRingEntry::tail(self.ring).cast_mut();
            std::sync::atomic::AtomicU16::from_ptr(tail)
                .store(self.tail, std::sync::atomic::Ordering::Release);
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what new() mapped; the ring was unregistered first.
        unsafe { libc::munmap(self.ring.cast(), self.ring_bytes) };
        let len = usize::from(self.entries) * self.size;
        // SAFETY: the pointer came from Box::into_raw of a boxed slice of exactly `len` bytes
        // in new(), and the kernel no longer uses it (the ring is unregistered and dropped).
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.memory, len)) });
    }
}

/// A worker's ring.
pub struct Ring {
    ring: IoUring,
    bufs: BufRing,
    timespec: Box<types::Timespec>,
}

impl Ring {
    /// `buffers` (a power of two) receive buffers of `buffer_size` bytes each.
    pub fn new(entries: u32, buffers: u16, buffer_size: usize) -> io::Result<Ring> {
        // Single issuer + deferred task work: completions run when this thread asks for
        // them, not as interrupts of whatever it is doing (6.1+; older kernels get defaults).
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_cqsize(entries * 4)
            .build(entries)
            .or_else(|_| IoUring::builder().setup_cqsize(entries * 4).build(entries))?;
        if !buffers.is_power_of_two() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "buffer count must be a power of two",
            ));
        }
        let mut bufs = BufRing::new(buffers, buffer_size)?;
        // SAFETY: the ring memory stays mapped until Drop, which unregisters it first.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                bufs.ring as u64,
                buffers,
                BUF_GROUP,
                0,
            )?;
        }
        for id in 0..buffers {
            bufs.push(id);
        }
        Ok(Ring {
            ring,
            bufs,
            timespec: Box::new(types::Timespec::new()),
        })
    }

    fn push(&mut self, entry: squeue::Entry) {
        loop {
            // SAFETY: every entry's pointers are kept alive by the caller until completion
            // (documented on the unsafe submitters below); the others carry none.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            // Queue full: hand what we have to the kernel and try again.
            if let Err(e) = self.ring.submit() {
                tracing::warn!("io_uring submit failed: {e}");
            }
        }
    }

    pub fn accept_multi(&mut self, listener: RawFd, token: u64) {
        let e = opcode::AcceptMulti::new(types::Fd(listener))
            .flags(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK)
            .build()
            .user_data(token);
        self.push(e);
    }

    /// Receive into ring buffers until cancelled, EOF or error.
    pub fn recv_multi(&mut self, fd: RawFd, token: u64) {
        let e = opcode::RecvMulti::new(types::Fd(fd), BUF_GROUP)
            .build()
            .user_data(token);
        self.push(e);
    }

    /// One receive into a ring buffer.
    pub fn recv_one(&mut self, fd: RawFd, token: u64) {
        let e = opcode::Recv::new(types::Fd(fd), std::ptr::null_mut(), 0)
            .buf_group(BUF_GROUP)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)
            .user_data(token);
        self.push(e);
    }

    /// Send `len` bytes at `buf`.
    ///
    /// # Safety
    /// The bytes must stay valid and unchanged until the completion for `token` arrives.
    pub unsafe fn send(&mut self, fd: RawFd, buf: *const u8, len: usize, token: u64) {
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        let e = opcode::Send::new(types::Fd(fd), buf, len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(token);
        self.push(e);
    }

    /// Connect `fd` to the address at `addr`.
    ///
    /// # Safety
    /// The address must stay valid until the completion for `token` arrives.
    pub unsafe fn connect(
        &mut self,
        fd: RawFd,
        addr: *const libc::sockaddr,
        len: libc::socklen_t,
        token: u64,
    ) {
        let e = opcode::Connect::new(types::Fd(fd), addr, len)
            .build()
            .user_data(token);
        self.push(e);
    }

    /// One-shot readiness (POLLIN / POLLOUT).
    pub fn poll(&mut self, fd: RawFd, events: i16, token: u64) {
        let e = opcode::PollAdd::new(types::Fd(fd), u32::from(events as u16))
            .build()
            .user_data(token);
        self.push(e);
    }

    /// Ask the kernel to end the operation submitted with `target`.
    pub fn cancel(&mut self, target: u64) {
        let e = opcode::AsyncCancel::new(target).build().user_data(IGNORE);
        self.push(e);
    }

    /// A completion for `token` after `after` (the worker's tick). One at a time.
    pub fn timeout(&mut self, after: Duration, token: u64) {
        *self.timespec = types::Timespec::from(after);
        let e = opcode::Timeout::new(&*self.timespec)
            .build()
            .user_data(token);
        self.push(e);
    }

    /// Submit everything queued, wait for at least one completion, and collect them all.
    pub fn wait(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
        match self.ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => return Err(e),
        }
        for cqe in self.ring.completion() {
            out.push(Completion {
                token: cqe.user_data(),
                result: cqe.result(),
                more: cqueue::more(cqe.flags()),
                buffer: cqueue::buffer_select(cqe.flags()),
            });
        }
        Ok(())
    }

    /// The bytes of buffer `id` (`len` of them were received).
    pub fn buffer(&self, id: u16, len: usize) -> &[u8] {
        let id = id.min(self.bufs.entries - 1);
        let start = usize::from(id) * self.bufs.size;
        let len = len.min(self.bufs.size);
        // SAFETY: in bounds (id < entries, len <= size); the kernel finished writing this
        // buffer before posting the completion that named it, and does not touch it again
        // until recycle(id), which needs `&mut self` and so cannot overlap this borrow.
        unsafe { std::slice::from_raw_parts(self.bufs.memory.add(start), len) }
    }

    /// Give buffer `id` back to the kernel.
    pub fn recycle(&mut self, id: u16) {
        self.bufs.push(id);
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        let _ = self.ring.submitter().unregister_buf_ring(BUF_GROUP);
    }
}
