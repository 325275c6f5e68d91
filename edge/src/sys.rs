//! Plain syscalls of the data path (sockets, splice, pipes), each wrapped once.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A socket address in the kernel's layout, kept alive for an in-flight connect.
pub struct RawAddr {
    pub storage: libc::sockaddr_storage,
    pub len: libc::socklen_t,
}

impl RawAddr {
    pub fn new(addr: SocketAddr) -> Box<RawAddr> {
        // SAFETY: sockaddr_storage is plain data; all zeroes is a valid value.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match addr {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(a.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
                unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
                std::mem::size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: a.flowinfo(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: a.scope_id(),
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
                unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        Box::new(RawAddr {
            storage,
            len: len as libc::socklen_t,
        })
    }

    pub fn ptr(&self) -> *const libc::sockaddr {
        (&raw const self.storage).cast()
    }
}

fn family(addr: &SocketAddr) -> libc::c_int {
    if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    }
}

fn set_int(fd: RawFd, level: libc::c_int, opt: libc::c_int, v: libc::c_int) -> io::Result<()> {
    // SAFETY: a c_int option value of the right size.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&raw const v).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// A listening socket that other workers' listeners on the same address share
/// (SO_REUSEPORT: the kernel spreads connections across them).
pub fn reuseport_listener(addr: SocketAddr, backlog: i32) -> io::Result<RawFd> {
    // SAFETY: plain socket(2).
    let fd = cvt(unsafe {
        libc::socket(
            family(&addr),
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    })?;
    let setup = || -> io::Result<()> {
        set_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
        set_int(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
        if addr.is_ipv6() {
            set_int(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
        }
        let raw = RawAddr::new(addr);
        // SAFETY: raw holds a valid sockaddr of raw.len bytes.
        cvt(unsafe { libc::bind(fd, raw.ptr(), raw.len) })?;
        // SAFETY: plain listen(2).
        cvt(unsafe { libc::listen(fd, backlog) })?;
        Ok(())
    };
    if let Err(e) = setup() {
        close(fd);
        return Err(e);
    }
    Ok(fd)
}

/// A non-blocking TCP socket for an upstream connection.
pub fn upstream_socket(addr: &SocketAddr) -> io::Result<RawFd> {
    // SAFETY: plain socket(2).
    let fd = cvt(unsafe {
        libc::socket(
            family(addr),
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    })?;
    let _ = set_int(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
    Ok(fd)
}

pub fn nodelay(fd: RawFd) {
    let _ = set_int(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
}

/// The local address a listener got (port 0 resolved).
pub fn local_addr(fd: RawFd) -> io::Result<SocketAddr> {
    sockname(fd, false)
}

pub fn peer_addr(fd: RawFd) -> io::Result<SocketAddr> {
    sockname(fd, true)
}

fn sockname(fd: RawFd, peer: bool) -> io::Result<SocketAddr> {
    // SAFETY: zeroed sockaddr_storage is valid; len tells the kernel its size.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: the kernel writes at most len bytes into storage.
    cvt(unsafe {
        if peer {
            libc::getpeername(fd, (&raw mut storage).cast(), &mut len)
        } else {
            libc::getsockname(fd, (&raw mut storage).cast(), &mut len)
        }
    })?;
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a: libc::sockaddr_in = unsafe { std::ptr::read((&raw const storage).cast()) };
            let ip = std::net::Ipv4Addr::from(a.sin_addr.s_addr.to_ne_bytes());
            Ok(SocketAddr::new(IpAddr::V4(ip), u16::from_be(a.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a: libc::sockaddr_in6 = unsafe { std::ptr::read((&raw const storage).cast()) };
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            Ok(SocketAddr::new(IpAddr::V6(ip), u16::from_be(a.sin6_port)))
        }
        _ => Err(io::Error::other("not an inet socket")),
    }
}

/// Stop both directions: in-flight receives complete with 0, sends fail, polls fire.
pub fn shutdown(fd: RawFd) {
    // SAFETY: shutdown(2) on a descriptor we own.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}

pub fn close(fd: RawFd) {
    // SAFETY: closing a descriptor we own, once.
    unsafe { libc::close(fd) };
}

/// Non-blocking splice(2) of up to `len` bytes; Ok(None) when it would block.
pub fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<Option<usize>> {
    // SAFETY: no offsets (sockets and pipes); the kernel moves pages between the two fds.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EAGAIN) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(n as usize))
}

/// A pipe that bodies pass through on their way from one socket to another.
#[derive(Debug)]
pub struct Pipe {
    pub read: RawFd,
    pub write: RawFd,
    pub capacity: usize,
}

impl Pipe {
    fn new(size: usize) -> io::Result<Pipe> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into fds.
        cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) })?;
        // Larger pipes mean fewer splice calls per body; the default (64 KiB) if refused.
        // SAFETY: fcntl on the pipe we just made.
        let got = unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, size as libc::c_int) };
        // SAFETY: as above; F_GETPIPE_SZ only reads.
        let capacity = if got > 0 {
            got as usize
        } else {
            (unsafe { libc::fcntl(fds[1], libc::F_GETPIPE_SZ) }).max(4096) as usize
        };
        Ok(Pipe {
            read: fds[0],
            write: fds[1],
            capacity,
        })
    }

    fn close(self) {
        close(self.read);
        close(self.write);
    }
}

/// A bounded pool of empty pipes, one per worker.
pub struct PipePool {
    free: Vec<Pipe>,
    created: usize,
    max: usize,
    size: usize,
}

impl PipePool {
    pub fn new(max: usize, size: usize) -> Self {
        PipePool {
            free: Vec::new(),
            created: 0,
            max,
            size,
        }
    }

    /// A pipe, or None when `max` are in use (the caller copies instead).
    pub fn take(&mut self) -> Option<Pipe> {
        if let Some(p) = self.free.pop() {
            return Some(p);
        }
        if self.created >= self.max {
            return None;
        }
        let p = Pipe::new(self.size).ok()?;
        self.created += 1;
        Some(p)
    }

    /// Return a pipe; one that may still hold bytes is closed instead of reused.
    pub fn put(&mut self, pipe: Pipe, empty: bool) {
        if empty {
            self.free.push(pipe);
        } else {
            self.created -= 1;
            pipe.close();
        }
    }
}

impl Drop for PipePool {
    fn drop(&mut self) {
        for p in self.free.drain(..) {
            p.close();
        }
    }
}
