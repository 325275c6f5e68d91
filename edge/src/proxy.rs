//! The forwarding loop of one worker thread: client connections, upstream connections and
//! the exchanges between them, driven by completions from the worker's ring.
//!
//! One exchange per client connection at a time; pipelined requests wait in the client's
//! buffer until the response before them is complete. Bytes of a body are forwarded only
//! after the framing rules accounted for them, so nothing after a body's end can slip to an
//! upstream as a request of its own.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::http::{self, ChunkedDecoder, Framing, RequestHead};
use crate::metrics::{Metrics, UpstreamError};
use crate::routes::{AppRoute, Endpoint, Route, Routes, resolve};
use crate::slab::Slab;
use crate::sys::{self, Pipe, PipePool, RawAddr};
use crate::uring::{Completion, IGNORE, Ring};
use crate::{Config, Shutdown};

const ACCEPT: u8 = 1;
const CLIENT_RECV: u8 = 2;
const CLIENT_SEND: u8 = 3;
const CLIENT_POLL: u8 = 4;
const UP_RECV: u8 = 5;
const UP_SEND: u8 = 6;
const UP_CONNECT: u8 = 7;
const UP_POLL: u8 = 8;
const TICK: u8 = 9;

/// Bytes waiting to go to one side before we stop reading from the other.
const HIGH_WATER: usize = 256 * 1024;
const TICK_MS: u64 = 50;

fn now_ms(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn token(kind: u8, index: usize, generation: u32) -> u64 {
    (u64::from(generation) << 32) | ((index as u64) << 8) | u64::from(kind)
}

fn untoken(t: u64) -> (u8, usize, u32) {
    (
        (t & 0xff) as u8,
        ((t >> 8) & 0x00ff_ffff) as usize,
        (t >> 32) as u32,
    )
}

/// Bytes queued for a socket; one send in flight at a time, from a buffer that does not
/// move until its completion.
#[derive(Default)]
struct Outbox {
    queued: Vec<u8>,
    inflight: Vec<u8>,
    offset: usize,
    sending: bool,
}

impl Outbox {
    fn pending(&self) -> usize {
        self.queued.len() + self.inflight.len() - self.offset
    }

    fn is_empty(&self) -> bool {
        self.pending() == 0
    }

    /// Start a send if none is in flight; true if one was submitted.
    fn start(&mut self, ring: &mut Ring, fd: RawFd, tok: u64) -> bool {
        if self.sending {
            return false;
        }
        if self.offset >= self.inflight.len() {
            if self.queued.is_empty() {
                return false;
            }
            self.inflight.clear();
            std::mem::swap(&mut self.queued, &mut self.inflight);
            self.offset = 0;
        }
        let rest = &self.inflight[self.offset..];
        // SAFETY: `inflight` is neither written nor dropped while `sending` is set; the
        // owning slot is freed only after every operation on it completed.
        unsafe { ring.send(fd, rest.as_ptr(), rest.len(), tok) };
        self.sending = true;
        true
    }

    fn sent(&mut self, n: usize) {
        self.sending = false;
        self.offset += n;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecvState {
    Off,
    On,
    Cancelling,
}

enum Body {
    None,
    Length(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
}

impl Body {
    fn from(framing: Framing) -> Body {
        match framing {
            Framing::None => Body::None,
            Framing::Length(n) => Body::Length(n),
            Framing::Chunked => Body::Chunked(ChunkedDecoder::new()),
            Framing::UntilClose => Body::UntilClose,
        }
    }

    fn done(&self) -> bool {
        matches!(self, Body::None)
    }

    /// How many of `input`'s bytes belong to this body; the body is done when it turns None.
    fn take(&mut self, input: &[u8]) -> Result<usize, http::ChunkError> {
        match self {
            Body::None => Ok(0),
            Body::Length(rest) => {
                let n = input
                    .len()
                    .min(usize::try_from(*rest).unwrap_or(usize::MAX));
                *rest -= n as u64;
                if *rest == 0 {
                    *self = Body::None;
                }
                Ok(n)
            }
            Body::Chunked(d) => {
                let n = d.feed(input)?;
                if d.done() {
                    *self = Body::None;
                }
                Ok(n)
            }
            Body::UntilClose => Ok(input.len()),
        }
    }
}

struct Splice {
    pipe: Pipe,
    /// Body bytes still to read from the upstream.
    remaining: u64,
    /// Bytes read into the pipe and not yet written to the client.
    in_pipe: usize,
    started: bool,
}

/// One request and its response.
struct Exchange {
    app: Arc<AppRoute>,
    started: Instant,
    idempotent: bool,
    head_request: bool,
    /// The whole upstream request, kept while it may be sent again (no body).
    replay: Option<Vec<u8>>,
    request_body: Body,
    upstream: Option<(usize, u32)>,
    endpoint: Option<Arc<Endpoint>>,
    attempts: u8,
    response_started: bool,
    /// Set once the final response head is parsed.
    response: Option<Body>,
    status: u16,
    client_keep_alive: bool,
    keep_alive_10: bool,
    upstream_keep_alive: bool,
    /// The response's head and buffered start are queued; the rest goes by splice.
    splice: Option<Splice>,
    /// Upstream reads wait for the client to drain.
    upstream_paused: bool,
    /// Absolute deadline (worker ms) for the response head or the next body progress.
    deadline: u64,
}

struct Client {
    fd: RawFd,
    peer: IpAddr,
    inbuf: Vec<u8>,
    out: Outbox,
    recv: RecvState,
    ops: u32,
    closing: bool,
    close_after_flush: bool,
    eof: bool,
    /// When the first byte of a still incomplete request head arrived.
    head_started: Option<u64>,
    idle_deadline: u64,
    ex: Option<Exchange>,
}

struct Upstream {
    fd: RawFd,
    endpoint: Arc<Endpoint>,
    raw: Box<RawAddr>,
    inbuf: Vec<u8>,
    out: Outbox,
    ops: u32,
    recv_armed: bool,
    connected: bool,
    closing: bool,
    client: Option<(usize, u32)>,
    reused: bool,
    idle_since: Option<u64>,
    connect_deadline: u64,
}

pub(crate) struct Worker {
    ring: Ring,
    cfg: Arc<Config>,
    routes: Arc<Routes>,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
    listeners: Vec<RawFd>,
    accept_armed: Vec<bool>,
    clients: Slab<Client>,
    ups: Slab<Upstream>,
    pool: HashMap<SocketAddr, Vec<(usize, u32)>>,
    pipes: PipePool,
    epoch: Instant,
    /// Clients whose buffered bytes should be looked at again (after an exchange ended).
    ready: Vec<(usize, u32)>,
    max_clients: usize,
    stopping_since: Option<u64>,
    /// Worker milliseconds, read once per batch of completions (deadlines need no more).
    now: u64,
}

impl Worker {
    pub(crate) fn new(
        cfg: Arc<Config>,
        routes: Arc<Routes>,
        metrics: Arc<Metrics>,
        shutdown: Shutdown,
        listeners: Vec<RawFd>,
        max_clients: usize,
    ) -> std::io::Result<Worker> {
        let ring = Ring::new(4096, cfg.recv_buffers, cfg.recv_buffer_size)?;
        let pipes = PipePool::new(cfg.max_pipes, cfg.pipe_size);
        let accept_armed = vec![false; listeners.len()];
        Ok(Worker {
            ring,
            cfg,
            routes,
            metrics,
            shutdown,
            listeners,
            accept_armed,
            clients: Slab::default(),
            ups: Slab::default(),
            pool: HashMap::new(),
            pipes,
            epoch: Instant::now(),
            ready: Vec::new(),
            max_clients,
            stopping_since: None,
            now: 0,
        })
    }

    pub(crate) fn run(mut self) -> std::io::Result<()> {
        for i in 0..self.listeners.len() {
            self.arm_accept(i);
        }
        self.ring
            .timeout(std::time::Duration::from_millis(TICK_MS), token(TICK, 0, 0));
        let mut batch = Vec::with_capacity(512);
        loop {
            self.ring.wait(&mut batch)?;
            self.now = now_ms(self.epoch);
            for c in batch.drain(..) {
                self.dispatch(c);
            }
            while let Some((ci, g)) = self.ready.pop() {
                self.drive_client(ci, g);
            }
            if self.stopping_since.is_some() && self.clients.is_empty() && self.ups.is_empty() {
                return Ok(());
            }
        }
    }

    fn arm_accept(&mut self, i: usize) {
        if self.stopping_since.is_none() {
            self.ring
                .accept_multi(self.listeners[i], token(ACCEPT, i, 0));
            self.accept_armed[i] = true;
        }
    }

    fn dispatch(&mut self, c: Completion) {
        if c.token == IGNORE {
            return;
        }
        let (kind, index, generation) = untoken(c.token);
        match kind {
            ACCEPT => self.on_accept(index, c),
            CLIENT_RECV => self.on_client_recv(index, generation, c),
            CLIENT_SEND => self.on_client_send(index, generation, c),
            CLIENT_POLL => {
                if let Some(cl) = self.clients.get(index, generation) {
                    cl.ops -= 1;
                    self.pump(index, generation);
                    self.maybe_free_client(index, generation);
                }
            }
            UP_RECV => self.on_up_recv(index, generation, c),
            UP_SEND => self.on_up_send(index, generation, c),
            UP_CONNECT => self.on_up_connect(index, generation, c),
            UP_POLL => {
                let owner = match self.ups.get(index, generation) {
                    Some(u) => {
                        u.ops -= 1;
                        u.client
                    }
                    None => None,
                };
                if let Some((ci, cg)) = owner {
                    self.pump(ci, cg);
                }
                self.maybe_free_up(index, generation);
            }
            TICK => {
                self.tick();
                self.ring
                    .timeout(std::time::Duration::from_millis(TICK_MS), token(TICK, 0, 0));
            }
            _ => {}
        }
        if let Some(b) = c.buffer {
            // Buffers of completions nobody wanted (stale slots) still go back.
            if !matches!(kind, CLIENT_RECV | UP_RECV) {
                self.ring.recycle(b);
            }
        }
    }

    // ---- clients -------------------------------------------------------------------------

    fn on_accept(&mut self, li: usize, c: Completion) {
        if !c.more {
            self.accept_armed[li] = false;
        }
        if c.result == -libc::ECANCELED {
            return; // the listener is closing (stop)
        }
        if c.result < 0 {
            // EMFILE and friends end the multishot accept; the tick re-arms it.
            tracing::warn!(
                "accept failed: {}",
                std::io::Error::from_raw_os_error(-c.result)
            );
            return;
        }
        let fd = c.result;
        let m = &self.metrics.edge;
        if self.clients.len() >= self.max_clients || self.stopping_since.is_some() {
            m.connections_refused.fetch_add(1, Ordering::Relaxed);
            sys::close(fd);
            return;
        }
        m.connections_accepted.fetch_add(1, Ordering::Relaxed);
        m.connections_open.fetch_add(1, Ordering::Relaxed);
        sys::nodelay(fd);
        let peer = sys::peer_addr(fd)
            .map(|a| a.ip())
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        let now = self.now;
        let (ci, g) = self.clients.insert(Client {
            fd,
            peer,
            inbuf: Vec::new(),
            out: Outbox::default(),
            recv: RecvState::Off,
            ops: 0,
            closing: false,
            close_after_flush: false,
            eof: false,
            head_started: None,
            idle_deadline: now + self.cfg.client_idle_ms,
            ex: None,
        });
        self.update_client_recv(ci, g);
    }

    fn wants_recv(cl: &Client, ups: &mut Slab<Upstream>) -> bool {
        // a client that sends without reading what we answer is not read from either
        if cl.closing
            || cl.eof
            || cl.close_after_flush
            || cl.inbuf.len() >= HIGH_WATER
            || cl.out.pending() >= HIGH_WATER
        {
            return false;
        }
        match cl.ex.as_ref().and_then(|e| e.upstream) {
            Some((ui, ug)) => ups.get(ui, ug).is_none_or(|u| u.out.pending() < HIGH_WATER),
            None => true,
        }
    }

    fn update_client_recv(&mut self, ci: usize, g: u32) {
        let Some(cl) = self.clients.get(ci, g) else {
            return;
        };
        let want = Self::wants_recv(cl, &mut self.ups);
        let cl = self.clients.get(ci, g).expect("checked above");
        match (cl.recv, want) {
            (RecvState::Off, true) => {
                self.ring.recv_multi(cl.fd, token(CLIENT_RECV, ci, g));
                cl.recv = RecvState::On;
                cl.ops += 1;
            }
            (RecvState::On, false) if !cl.closing => {
                self.ring.cancel(token(CLIENT_RECV, ci, g));
                cl.recv = RecvState::Cancelling;
            }
            _ => {}
        }
    }

    fn on_client_recv(&mut self, ci: usize, g: u32, c: Completion) {
        let Some(cl) = self.clients.get(ci, g) else {
            if let Some(b) = c.buffer {
                self.ring.recycle(b);
            }
            return;
        };
        if let Some(b) = c.buffer {
            if c.result > 0 && !cl.closing {
                cl.inbuf
                    .extend_from_slice(self.ring.buffer(b, c.result as usize));
            }
            self.ring.recycle(b);
        }
        if !c.more {
            cl.ops -= 1;
            cl.recv = RecvState::Off;
        }
        let now = self.now;
        match c.result {
            n if n > 0 => {
                cl.idle_deadline = now + self.cfg.client_idle_ms;
                if let Some(ex) = &cl.ex {
                    ex.app
                        .counters
                        .bytes_in
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
                self.drive_client(ci, g);
            }
            0 => {
                cl.eof = true;
                self.drive_client(ci, g);
            }
            e if e == -libc::ENOBUFS || e == -libc::ECANCELED => {}
            _ => self.close_client(ci, g),
        }
        self.update_client_recv(ci, g);
        self.maybe_free_client(ci, g);
    }

    fn on_client_send(&mut self, ci: usize, g: u32, c: Completion) {
        let Some(cl) = self.clients.get(ci, g) else {
            return;
        };
        cl.ops -= 1;
        if c.result < 0 {
            cl.out.sent(0);
            self.close_client(ci, g);
            self.maybe_free_client(ci, g);
            return;
        }
        cl.out.sent(c.result as usize);
        cl.idle_deadline = self.now + self.cfg.client_idle_ms;
        // a slow reader is progress too: the exchange is not stuck while the client reads
        if let Some(ex) = cl.ex.as_mut()
            && ex.response.is_some()
        {
            ex.deadline = self.now + self.cfg.upstream_timeout_ms;
        }
        if !cl.closing
            && cl
                .out
                .start(&mut self.ring, cl.fd, token(CLIENT_SEND, ci, g))
        {
            cl.ops += 1;
        } else if cl.out.is_empty() {
            self.client_drained(ci, g);
        }
        self.update_client_recv(ci, g);
        self.maybe_free_client(ci, g);
    }

    /// Everything queued for the client went out.
    fn client_drained(&mut self, ci: usize, g: u32) {
        let Some(cl) = self.clients.get(ci, g) else {
            return;
        };
        if cl.closing {
            return;
        }
        if cl.close_after_flush && cl.ex.is_none() {
            self.close_client(ci, g);
            return;
        }
        let Some(ex) = cl.ex.as_mut() else {
            return;
        };
        if let Some(sp) = ex.splice.as_mut() {
            if !sp.started {
                sp.started = true;
                self.pump(ci, g);
            }
            return;
        }
        if ex.upstream_paused {
            ex.upstream_paused = false;
            if let Some((ui, ug)) = ex.upstream {
                self.arm_up_recv(ui, ug);
            }
        }
    }

    fn send_client(&mut self, ci: usize, g: u32) {
        if let Some(cl) = self.clients.get(ci, g)
            && !cl.closing
            && cl
                .out
                .start(&mut self.ring, cl.fd, token(CLIENT_SEND, ci, g))
        {
            cl.ops += 1;
        }
    }

    /// Look at the client's buffered bytes: start the next request, or feed the body of
    /// the current one to its upstream.
    fn drive_client(&mut self, ci: usize, g: u32) {
        let now = self.now;
        let Some(cl) = self.clients.get(ci, g) else {
            return;
        };
        if cl.closing {
            return;
        }
        if cl.ex.is_some() {
            self.forward_request_body(ci, g);
            return;
        }
        if cl.close_after_flush {
            return;
        }
        if cl.inbuf.is_empty() {
            if cl.eof {
                // the client is done sending; what it asked for still goes out first
                if cl.out.is_empty() {
                    self.close_client(ci, g);
                } else {
                    cl.close_after_flush = true;
                }
            }
            return;
        }
        match http::parse_request(&cl.inbuf, self.cfg.max_head_bytes) {
            Err(e) => {
                let m = &self.metrics.edge;
                match e.status() {
                    400 => &m.rejected_400,
                    431 => &m.rejected_431,
                    _ => &m.rejected_other,
                }
                .fetch_add(1, Ordering::Relaxed);
                tracing::info!(peer = %cl.peer, "request refused ({}): {e}", e.status());
                self.local_response(ci, g, e.status(), &format!("{e}\n"), true);
            }
            Ok(None) => {
                if cl.head_started.is_none() {
                    cl.head_started = Some(now);
                }
                if cl.eof {
                    if cl.out.is_empty() {
                        self.close_client(ci, g);
                    } else {
                        cl.close_after_flush = true;
                    }
                }
            }
            Ok(Some(head)) => {
                cl.head_started = None;
                cl.inbuf.drain(..head.len);
                self.start_exchange(ci, g, head);
            }
        }
    }

    /// A response made here; `close` ends the connection after it.
    fn local_response(&mut self, ci: usize, g: u32, status: u16, body: &str, close: bool) {
        self.local_response_to(ci, g, status, body, close, false);
    }

    fn local_response_to(
        &mut self,
        ci: usize,
        g: u32,
        status: u16,
        body: &str,
        close: bool,
        head: bool,
    ) {
        let Some(cl) = self.clients.get(ci, g) else {
            return;
        };
        http::local_response(status, body, close, head, &mut cl.out.queued);
        if close {
            cl.close_after_flush = true;
            cl.inbuf.clear();
        } else {
            self.ready.push((ci, g));
        }
        self.send_client(ci, g);
        self.update_client_recv(ci, g);
    }

    fn start_exchange(&mut self, ci: usize, g: u32, head: RequestHead) {
        let table = self.routes.load();
        let route = resolve(&table, &self.cfg.domain, head.host.as_deref(), &head.target);
        let has_body = head.framing != Framing::None;
        let keep = head.keep_alive && !has_body;
        let (app, target) = match route {
            Route::App(app, target) => (app.clone(), target),
            Route::Unknown(name) => {
                self.metrics
                    .edge
                    .unknown_app
                    .fetch_add(1, Ordering::Relaxed);
                let msg = match name {
                    Some(n) => format!("no app named {n:?} on this mesh\n"),
                    None => "no app here: use /app/<name>/ or Host: <name>.<domain>\n".into(),
                };
                self.local_response_to(ci, g, 404, &msg, !keep, head.is_head());
                return;
            }
        };
        app.counters.requests.fetch_add(1, Ordering::Relaxed);
        let Some(cl) = self.clients.get(ci, g) else {
            return;
        };
        app.counters
            .bytes_in
            .fetch_add(head.len as u64, Ordering::Relaxed);
        let mut bytes = Vec::with_capacity(head.len + 128);
        http::upstream_request(&head, &target, cl.peer, &mut bytes);
        let now = self.now;
        cl.ex = Some(Exchange {
            app: app.clone(),
            started: Instant::now(),
            idempotent: head.idempotent(),
            head_request: head.is_head(),
            replay: (!has_body).then(|| bytes.clone()),
            request_body: Body::from(head.framing),
            upstream: None,
            endpoint: None,
            attempts: 0,
            response_started: false,
            response: None,
            status: 0,
            client_keep_alive: head.keep_alive,
            keep_alive_10: head.minor == 0 && head.keep_alive,
            upstream_keep_alive: true,
            splice: None,
            upstream_paused: false,
            deadline: now + self.cfg.upstream_timeout_ms,
        });
        self.send_client(ci, g);
        match self.routes.pick(&app, None) {
            None => {
                tracing::info!(app = %app.name, "no ready endpoint: 503");
                self.finish_with_error(ci, g, 503, "no ready instance of this app\n", None);
            }
            Some(ep) => {
                // invite the body only once there is somewhere to send it
                if head.expect_continue
                    && has_body
                    && let Some(cl) = self.clients.get(ci, g)
                {
                    cl.out.queued.extend_from_slice(http::CONTINUE_100);
                    self.send_client(ci, g);
                }
                self.attach_upstream(ci, g, ep, bytes);
                self.forward_request_body(ci, g);
            }
        }
    }

    /// Send `bytes` (a request head, maybe a whole request) to `ep` on a pooled or new
    /// connection.
    fn attach_upstream(&mut self, ci: usize, g: u32, ep: Arc<Endpoint>, bytes: Vec<u8>) {
        let now = self.now;
        let mut reuse = None;
        if let Some(idle) = self.pool.get_mut(&ep.addr) {
            while let Some((ui, ug)) = idle.pop() {
                if let Some(u) = self.ups.get(ui, ug)
                    && !u.closing
                {
                    reuse = Some((ui, ug));
                    break;
                }
            }
        }
        let (ui, ug) = match reuse {
            Some((ui, ug)) => {
                self.metrics
                    .edge
                    .upstream_reused
                    .fetch_add(1, Ordering::Relaxed);
                let u = self.ups.get(ui, ug).expect("checked above");
                u.client = Some((ci, g));
                u.idle_since = None;
                u.reused = true;
                u.endpoint = ep.clone();
                u.out.queued.extend_from_slice(&bytes);
                if u.out.start(&mut self.ring, u.fd, token(UP_SEND, ui, ug)) {
                    u.ops += 1;
                }
                (ui, ug)
            }
            None => {
                let fd = match sys::upstream_socket(&ep.addr) {
                    Ok(fd) => fd,
                    Err(e) => {
                        tracing::warn!(addr = %ep.addr, "cannot open an upstream socket: {e}");
                        self.finish_with_error(
                            ci,
                            g,
                            502,
                            "cannot connect upstream\n",
                            Some(UpstreamError::Connect),
                        );
                        return;
                    }
                };
                self.metrics
                    .edge
                    .upstream_connects
                    .fetch_add(1, Ordering::Relaxed);
                let raw = RawAddr::new(ep.addr);
                let (ui, ug) = self.ups.insert(Upstream {
                    fd,
                    endpoint: ep.clone(),
                    raw,
                    inbuf: Vec::new(),
                    out: Outbox::default(),
                    ops: 0,
                    recv_armed: false,
                    connected: false,
                    closing: false,
                    client: Some((ci, g)),
                    reused: false,
                    idle_since: None,
                    connect_deadline: now + self.cfg.connect_timeout_ms,
                });
                let u = self.ups.get(ui, ug).expect("just inserted");
                u.out.queued = bytes;
                // SAFETY: `raw` is boxed in the slot, which outlives the operation.
                unsafe {
                    self.ring
                        .connect(u.fd, u.raw.ptr(), u.raw.len, token(UP_CONNECT, ui, ug));
                }
                u.ops += 1;
                (ui, ug)
            }
        };
        if let Some(ex) = self.clients.get(ci, g).and_then(|c| c.ex.as_mut()) {
            ex.upstream = Some((ui, ug));
            ex.endpoint = Some(ep);
            ex.attempts += 1;
            ex.deadline = now + self.cfg.upstream_timeout_ms;
        }
    }

    /// Move request body bytes from the client's buffer to the upstream's outbox.
    fn forward_request_body(&mut self, ci: usize, g: u32) {
        let Some(cl) = self.clients.get(ci, g) else {
            return;
        };
        let Some(ex) = cl.ex.as_mut() else {
            return;
        };
        let Some((ui, ug)) = ex.upstream else {
            return;
        };
        if ex.request_body.done() || cl.inbuf.is_empty() {
            return;
        }
        let n = match ex.request_body.take(&cl.inbuf) {
            Ok(n) => n,
            Err(e) => {
                tracing::info!(peer = %cl.peer, app = %ex.app.name, "request body refused: {e}");
                self.metrics
                    .edge
                    .rejected_400
                    .fetch_add(1, Ordering::Relaxed);
                // What was forwarded so far is an incomplete request: that upstream
                // connection cannot be used again.
                self.close_up(ui, ug);
                self.finish_with_error(ci, g, 400, &format!("{e}\n"), None);
                return;
            }
        };
        let Some(u) = self.ups.get(ui, ug) else {
            return;
        };
        u.out.queued.extend_from_slice(&cl.inbuf[..n]);
        cl.inbuf.drain(..n);
        ex.deadline = self.now + self.cfg.upstream_timeout_ms;
        self.metrics
            .edge
            .body_bytes_copied
            .fetch_add(n as u64, Ordering::Relaxed);
        if u.connected && u.out.start(&mut self.ring, u.fd, token(UP_SEND, ui, ug)) {
            u.ops += 1;
        }
        self.update_client_recv(ci, g);
    }

    /// End the exchange with a response made here (503, 502, 504, 400 mid-body).
    fn finish_with_error(
        &mut self,
        ci: usize,
        g: u32,
        status: u16,
        body: &str,
        kind: Option<UpstreamError>,
    ) {
        let Some(cl) = self.clients.get(ci, g) else {
            return;
        };
        let Some(ex) = cl.ex.take() else {
            return;
        };
        if let Some((ui, ug)) = ex.upstream {
            self.close_up(ui, ug);
        }
        if let Some(sp) = ex.splice {
            self.pipes.put(sp.pipe, false);
        }
        if let Some(k) = kind {
            ex.app.counters.upstream_error(k);
        }
        ex.app.counters.response(status, ex.started.elapsed());
        let Some(cl) = self.clients.get(ci, g) else {
            return;
        };
        if ex.response_started {
            // Part of a response went out already: only closing tells the client.
            self.close_client(ci, g);
            return;
        }
        let keep = ex.client_keep_alive && ex.request_body.done() && !cl.eof;
        self.local_response_to(ci, g, status, body, !keep, ex.head_request);
    }

    fn finish_exchange(&mut self, ci: usize, g: u32) {
        let now = self.now;
        let Some(cl) = self.clients.get(ci, g) else {
            return;
        };
        let Some(ex) = cl.ex.take() else {
            return;
        };
        ex.app.counters.response(ex.status, ex.started.elapsed());
        let request_done = ex.request_body.done();
        let client_keep = ex.client_keep_alive && request_done && !cl.eof;
        if !client_keep {
            cl.close_after_flush = true;
            cl.inbuf.clear();
        }
        cl.idle_deadline = now + self.cfg.client_idle_ms;
        let drained = cl.out.is_empty();
        if let Some((ui, ug)) = ex.upstream {
            let reusable = ex.upstream_keep_alive && request_done;
            self.release_up(ui, ug, reusable);
        }
        if client_keep {
            self.ready.push((ci, g));
            self.update_client_recv(ci, g);
        } else if drained {
            self.close_client(ci, g);
        }
    }

    /// Splice the rest of a response body: upstream -> pipe -> client, each step as far as
    /// the sockets allow without blocking, then wait for readiness from the ring.
    fn pump(&mut self, ci: usize, g: u32) {
        let Some(cl) = self.clients.get(ci, g) else {
            return;
        };
        if cl.closing {
            return;
        }
        let client_fd = cl.fd;
        let Some(ex) = cl.ex.as_mut() else {
            return;
        };
        let (Some(sp), Some((ui, ug))) = (ex.splice.as_mut(), ex.upstream) else {
            return;
        };
        if !sp.started {
            return;
        }
        let Some(u) = self.ups.get(ui, ug) else {
            return;
        };
        if u.closing {
            return;
        }
        let counters = ex.app.counters.clone();
        let mut moved = 0u64;
        let outcome = loop {
            if sp.in_pipe > 0 {
                match sys::splice(sp.pipe.read, client_fd, sp.in_pipe) {
                    Ok(Some(n)) => {
                        sp.in_pipe -= n;
                        moved += n as u64;
                        continue;
                    }
                    Ok(None) => break PumpOutcome::WaitClient,
                    Err(e) => break PumpOutcome::ClientFailed(e),
                }
            }
            if sp.remaining == 0 {
                break PumpOutcome::Done;
            }
            let want = usize::try_from(sp.remaining)
                .unwrap_or(usize::MAX)
                .min(sp.pipe.capacity);
            match sys::splice(u.fd, sp.pipe.write, want) {
                Ok(Some(0)) => break PumpOutcome::UpstreamClosed,
                Ok(Some(n)) => {
                    sp.remaining -= n as u64;
                    sp.in_pipe += n;
                }
                Ok(None) => break PumpOutcome::WaitUpstream,
                Err(_) => break PumpOutcome::UpstreamClosed,
            }
        };
        counters.bytes_out.fetch_add(moved, Ordering::Relaxed);
        self.metrics
            .edge
            .body_bytes_spliced
            .fetch_add(moved, Ordering::Relaxed);
        let now = self.now;
        if moved > 0 {
            ex.deadline = now + self.cfg.upstream_timeout_ms;
            cl.idle_deadline = now + self.cfg.client_idle_ms;
        }
        match outcome {
            PumpOutcome::WaitClient => {
                self.ring
                    .poll(client_fd, libc::POLLOUT, token(CLIENT_POLL, ci, g));
                cl.ops += 1;
            }
            PumpOutcome::WaitUpstream => {
                self.ring.poll(u.fd, libc::POLLIN, token(UP_POLL, ui, ug));
                u.ops += 1;
            }
            PumpOutcome::Done => {
                if let Some(sp) = ex.splice.take() {
                    self.pipes.put(sp.pipe, true);
                }
                ex.response = Some(Body::None);
                self.finish_exchange(ci, g);
            }
            PumpOutcome::UpstreamClosed => {
                tracing::warn!(app = %ex.app.name, "upstream closed in the middle of a response body");
                ex.app.counters.upstream_error(UpstreamError::Reset);
                self.close_up(ui, ug);
                self.close_client(ci, g);
            }
            PumpOutcome::ClientFailed(e) => {
                tracing::debug!("client went away during a spliced body: {e}");
                self.close_up(ui, ug);
                self.close_client(ci, g);
            }
        }
    }

    fn close_client(&mut self, ci: usize, g: u32) {
        let Some(cl) = self.clients.get(ci, g) else {
            return;
        };
        if cl.closing {
            return;
        }
        cl.closing = true;
        sys::shutdown(cl.fd);
        if cl.recv == RecvState::On {
            self.ring.cancel(token(CLIENT_RECV, ci, g));
            cl.recv = RecvState::Cancelling;
        }
        if let Some(ex) = cl.ex.take() {
            if let Some((ui, ug)) = ex.upstream {
                self.close_up(ui, ug);
            }
            if let Some(sp) = ex.splice {
                self.pipes.put(sp.pipe, false);
            }
            if !ex.response_started || ex.response.is_none() {
                ex.app.counters.response(499, ex.started.elapsed());
            }
        }
        self.maybe_free_client(ci, g);
    }

    fn maybe_free_client(&mut self, ci: usize, g: u32) {
        if let Some(cl) = self.clients.get(ci, g)
            && cl.closing
            && cl.ops == 0
        {
            sys::close(cl.fd);
            self.clients.remove(ci);
            self.metrics
                .edge
                .connections_open
                .fetch_sub(1, Ordering::Relaxed);
        }
    }

    // ---- upstreams -----------------------------------------------------------------------

    fn arm_up_recv(&mut self, ui: usize, ug: u32) {
        if let Some(u) = self.ups.get(ui, ug)
            && !u.recv_armed
            && !u.closing
            && u.connected
        {
            self.ring.recv_one(u.fd, token(UP_RECV, ui, ug));
            u.recv_armed = true;
            u.ops += 1;
        }
    }

    fn on_up_connect(&mut self, ui: usize, ug: u32, c: Completion) {
        let Some(u) = self.ups.get(ui, ug) else {
            return;
        };
        u.ops -= 1;
        if c.result < 0 || u.closing {
            let err = std::io::Error::from_raw_os_error(-c.result);
            self.upstream_failed(ui, ug, UpstreamError::Connect, &err.to_string());
            self.maybe_free_up(ui, ug);
            return;
        }
        u.connected = true;
        if u.out.start(&mut self.ring, u.fd, token(UP_SEND, ui, ug)) {
            u.ops += 1;
        }
        self.arm_up_recv(ui, ug);
        self.maybe_free_up(ui, ug);
    }

    fn on_up_send(&mut self, ui: usize, ug: u32, c: Completion) {
        let Some(u) = self.ups.get(ui, ug) else {
            return;
        };
        u.ops -= 1;
        if c.result < 0 {
            u.out.sent(0);
            let err = std::io::Error::from_raw_os_error(-c.result);
            self.upstream_failed(ui, ug, UpstreamError::Reset, &err.to_string());
            self.maybe_free_up(ui, ug);
            return;
        }
        u.out.sent(c.result as usize);
        if !u.closing && u.out.start(&mut self.ring, u.fd, token(UP_SEND, ui, ug)) {
            u.ops += 1;
        }
        let owner = u.client;
        if let Some((ci, cg)) = owner {
            // the upstream took bytes: the client may send more
            self.update_client_recv(ci, cg);
        }
        self.maybe_free_up(ui, ug);
    }

    fn on_up_recv(&mut self, ui: usize, ug: u32, c: Completion) {
        let Some(u) = self.ups.get(ui, ug) else {
            if let Some(b) = c.buffer {
                self.ring.recycle(b);
            }
            return;
        };
        if let Some(b) = c.buffer {
            if c.result > 0 && !u.closing {
                u.inbuf
                    .extend_from_slice(self.ring.buffer(b, c.result as usize));
            }
            self.ring.recycle(b);
        }
        u.ops -= 1;
        u.recv_armed = false;
        if u.closing {
            self.maybe_free_up(ui, ug);
            return;
        }
        match c.result {
            n if n > 0 => {
                if u.client.is_none() {
                    // bytes nobody asked for on an idle connection: not trustworthy
                    self.close_up(ui, ug);
                } else {
                    self.on_response_bytes(ui, ug);
                }
            }
            0 => self.upstream_eof(ui, ug),
            e if e == -libc::ENOBUFS => self.arm_up_recv(ui, ug),
            e => {
                let err = std::io::Error::from_raw_os_error(-e);
                self.upstream_failed(ui, ug, UpstreamError::Reset, &err.to_string());
            }
        }
        self.maybe_free_up(ui, ug);
    }

    /// Bytes arrived from the upstream of an exchange.
    fn on_response_bytes(&mut self, ui: usize, ug: u32) {
        let now = self.now;
        let Some(u) = self.ups.get(ui, ug) else {
            return;
        };
        let Some((ci, g)) = u.client else {
            return;
        };
        let Some(cl) = self.clients.get(ci, g) else {
            self.close_up(ui, ug);
            return;
        };
        let Some(ex) = cl.ex.as_mut() else {
            self.close_up(ui, ug);
            return;
        };
        ex.response_started = true;
        ex.deadline = now + self.cfg.upstream_timeout_ms;
        // the response head (and any 1xx before it)
        while ex.response.is_none() {
            match http::parse_response(&u.inbuf, self.cfg.max_head_bytes, ex.head_request) {
                Err(e) => {
                    let ep = ex.endpoint.clone();
                    tracing::warn!(app = %ex.app.name, endpoint = ?ep.as_ref().map(|e| e.addr), "bad response: {e}");
                    if let Some(ep) = ep {
                        note_failure(&self.routes, &self.metrics, &ep);
                    }
                    ex.response_started = false;
                    self.finish_with_error(
                        ci,
                        g,
                        502,
                        "the app sent an invalid response\n",
                        Some(UpstreamError::BadResponse),
                    );
                    return;
                }
                Ok(None) => {
                    ex.response_started = false;
                    self.arm_up_recv(ui, ug);
                    return;
                }
                Ok(Some(head)) if head.status == 101 || head.status < 100 => {
                    ex.response_started = false;
                    tracing::warn!(app = %ex.app.name, "upstream answered {} (protocol switch is not supported)", head.status);
                    self.finish_with_error(
                        ci,
                        g,
                        502,
                        "the app switched protocols\n",
                        Some(UpstreamError::BadResponse),
                    );
                    return;
                }
                Ok(Some(head)) if head.status < 200 => {
                    // interim response (100, 103): forward as it came
                    cl.out.queued.extend_from_slice(&u.inbuf[..head.len]);
                    u.inbuf.drain(..head.len);
                    if cl
                        .out
                        .start(&mut self.ring, cl.fd, token(CLIENT_SEND, ci, g))
                    {
                        cl.ops += 1;
                    }
                }
                Ok(Some(head)) => {
                    if let Some(ep) = &ex.endpoint {
                        self.routes.success(ep);
                    }
                    ex.status = head.status;
                    ex.upstream_keep_alive = head.keep_alive;
                    let close = !ex.client_keep_alive
                        || self.stopping_since.is_some()
                        || head.framing == Framing::UntilClose
                        || !ex.request_body.done()
                        || cl.eof;
                    if close {
                        ex.client_keep_alive = false;
                    }
                    let before = cl.out.queued.len();
                    http::client_response(
                        &head,
                        close,
                        ex.keep_alive_10 && !close,
                        &mut cl.out.queued,
                    );
                    ex.app
                        .counters
                        .bytes_out
                        .fetch_add((cl.out.queued.len() - before) as u64, Ordering::Relaxed);
                    u.inbuf.drain(..head.len);
                    if let Framing::Length(n) = head.framing {
                        let rest = n.saturating_sub(u.inbuf.len() as u64);
                        if rest >= self.cfg.splice_threshold {
                            match self.pipes.take() {
                                Some(pipe) => {
                                    ex.splice = Some(Splice {
                                        pipe,
                                        remaining: rest,
                                        in_pipe: 0,
                                        started: false,
                                    })
                                }
                                None => {
                                    self.metrics
                                        .edge
                                        .splice_fallbacks
                                        .fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                    }
                    ex.response = Some(Body::from(head.framing));
                }
            }
        }
        // body bytes that came with the head or in this read
        let Some(body) = ex.response.as_mut() else {
            return;
        };
        let n = match body.take(&u.inbuf) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(app = %ex.app.name, "bad chunked response body: {e}");
                ex.app.counters.upstream_error(UpstreamError::BadResponse);
                self.close_up(ui, ug);
                self.close_client(ci, g);
                return;
            }
        };
        cl.out.queued.extend_from_slice(&u.inbuf[..n]);
        u.inbuf.drain(..n);
        ex.app
            .counters
            .bytes_out
            .fetch_add(n as u64, Ordering::Relaxed);
        self.metrics
            .edge
            .body_bytes_copied
            .fetch_add(n as u64, Ordering::Relaxed);
        if let Some(sp) = ex.splice.as_mut() {
            // the buffered part was all of the head read; the rest goes by splice
            sp.remaining = match body {
                Body::Length(r) => *r,
                _ => 0,
            };
            *body = Body::None;
        }
        let complete = body.done() && ex.splice.is_none();
        if complete && !u.inbuf.is_empty() {
            // more bytes than the response: this connection is out of step
            ex.upstream_keep_alive = false;
        }
        let pending = cl.out.pending();
        let splice_now = ex.splice.is_some();
        if complete {
            self.send_client(ci, g);
            self.finish_exchange(ci, g);
            return;
        }
        if splice_now {
            if pending == 0 {
                if let Some(sp) = ex.splice.as_mut() {
                    sp.started = true;
                }
                self.pump(ci, g);
            } else {
                self.send_client(ci, g);
            }
            return;
        }
        if pending < HIGH_WATER {
            self.arm_up_recv(ui, ug);
        } else {
            ex.upstream_paused = true;
        }
        self.send_client(ci, g);
    }

    /// The upstream connection failed (connect refused, reset, EOF, timeout).
    fn upstream_failed(&mut self, ui: usize, ug: u32, kind: UpstreamError, why: &str) {
        let Some(u) = self.ups.get(ui, ug) else {
            return;
        };
        let owner = u.client;
        let reused = u.reused;
        let ep = u.endpoint.clone();
        self.close_up(ui, ug);
        let Some((ci, g)) = owner else {
            return; // an idle pooled connection closed: nothing lost
        };
        let Some(cl) = self.clients.get(ci, g) else {
            return;
        };
        let Some(ex) = cl.ex.as_mut() else {
            return;
        };
        if ex.upstream != Some((ui, ug)) {
            return;
        }
        ex.upstream = None;
        // A connection from the pool that the app had closed is not the app's fault.
        if !(reused && kind == UpstreamError::Reset && !ex.response_started) {
            note_failure(&self.routes, &self.metrics, &ep);
        }
        if !ex.response_started
            && kind != UpstreamError::Timeout
            && ex.idempotent
            && ex.attempts < 2
            && let Some(bytes) = ex.replay.clone()
        {
            let app = ex.app.clone();
            if let Some(next) = self.routes.pick(&app, Some(ep.addr)) {
                tracing::info!(app = %app.name, failed = %ep.addr, retry = %next.addr,
                    "upstream {}: {why}; retrying once", kind.label());
                app.counters.retries.fetch_add(1, Ordering::Relaxed);
                app.counters.upstream_error(kind);
                self.attach_upstream(ci, g, next, bytes);
                return;
            }
        }
        tracing::warn!(app = %ex.app.name, endpoint = %ep.addr, "upstream {}: {why}", kind.label());
        let status = if kind == UpstreamError::Timeout {
            504
        } else {
            502
        };
        let body = if status == 504 {
            "the app did not answer in time\n"
        } else {
            "the app could not be reached\n"
        };
        self.finish_with_error(ci, g, status, body, Some(kind));
    }

    /// The upstream closed its side: the end of a body delimited by close, or a failure.
    fn upstream_eof(&mut self, ui: usize, ug: u32) {
        let owner = self.ups.get(ui, ug).and_then(|u| u.client);
        if let Some((ci, g)) = owner
            && let Some(ex) = self.clients.get(ci, g).and_then(|c| c.ex.as_mut())
            && ex.upstream == Some((ui, ug))
            && matches!(ex.response, Some(Body::UntilClose))
        {
            ex.response = Some(Body::None);
            ex.upstream_keep_alive = false;
            self.send_client(ci, g);
            self.finish_exchange(ci, g);
            return;
        }
        self.upstream_failed(ui, ug, UpstreamError::Reset, "connection closed");
    }

    /// Back to the pool if `reusable`, else closed.
    fn release_up(&mut self, ui: usize, ug: u32, reusable: bool) {
        let now = self.now;
        let Some(u) = self.ups.get(ui, ug) else {
            return;
        };
        u.client = None;
        if !reusable
            || u.closing
            || !u.inbuf.is_empty()
            || u.endpoint.removed()
            || self.stopping_since.is_some()
        {
            self.close_up(ui, ug);
            return;
        }
        u.idle_since = Some(now);
        let addr = u.endpoint.addr;
        self.pool.entry(addr).or_default().push((ui, ug));
        // an armed receive notices the app closing the idle connection
        self.arm_up_recv(ui, ug);
    }

    fn close_up(&mut self, ui: usize, ug: u32) {
        let Some(u) = self.ups.get(ui, ug) else {
            return;
        };
        if u.closing {
            return;
        }
        u.closing = true;
        if u.connected {
            sys::shutdown(u.fd);
        } else {
            self.ring.cancel(token(UP_CONNECT, ui, ug));
        }
        if let Some(idle) = self.pool.get_mut(&u.endpoint.addr) {
            idle.retain(|x| *x != (ui, ug));
        }
        self.maybe_free_up(ui, ug);
    }

    fn maybe_free_up(&mut self, ui: usize, ug: u32) {
        if let Some(u) = self.ups.get(ui, ug)
            && u.closing
            && u.ops == 0
        {
            sys::close(u.fd);
            self.ups.remove(ui);
        }
    }

    // ---- time ----------------------------------------------------------------------------

    fn tick(&mut self) {
        let now = self.now;
        if self.shutdown.requested() && self.stopping_since.is_none() {
            self.stopping_since = Some(now);
            // the multishot accepts hold the listeners open until cancelled
            for (i, fd) in self.listeners.drain(..).enumerate() {
                self.ring.cancel(token(ACCEPT, i, 0));
                sys::close(fd);
            }
        }
        for i in 0..self.listeners.len() {
            if !self.accept_armed[i] {
                self.arm_accept(i);
            }
        }
        let force = self
            .stopping_since
            .is_some_and(|s| now > s + self.cfg.drain_ms);
        for ci in self.clients.indices() {
            let g = self.clients.generation(ci);
            let Some(cl) = self.clients.at(ci) else {
                continue;
            };
            if cl.closing {
                continue;
            }
            if force {
                self.close_client(ci, g);
                continue;
            }
            match cl.ex.as_ref() {
                None => {
                    if let Some(t) = cl.head_started
                        && now > t + self.cfg.head_timeout_ms
                    {
                        self.metrics
                            .edge
                            .rejected_408
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::info!(peer = %cl.peer, "request head not complete in time: 408");
                        cl.head_started = None;
                        self.local_response(
                            ci,
                            g,
                            408,
                            "request head not complete in time\n",
                            true,
                        );
                    } else if (cl.inbuf.is_empty() && cl.out.is_empty())
                        && (now > cl.idle_deadline || self.stopping_since.is_some())
                    {
                        self.close_client(ci, g);
                    } else if now > cl.idle_deadline + self.cfg.client_idle_ms {
                        // a client that does not read what we send
                        self.close_client(ci, g);
                    }
                }
                Some(ex) => {
                    if now > ex.deadline {
                        if let Some((ui, ug)) = ex.upstream {
                            self.upstream_failed(
                                ui,
                                ug,
                                UpstreamError::Timeout,
                                "no answer within the upstream timeout",
                            );
                        } else {
                            self.close_client(ci, g);
                        }
                    } else if now > cl.idle_deadline + self.cfg.client_idle_ms {
                        self.close_client(ci, g);
                    }
                }
            }
        }
        for ui in self.ups.indices() {
            let ug = self.ups.generation(ui);
            let Some(u) = self.ups.at(ui) else {
                continue;
            };
            if u.closing {
                continue;
            }
            if !u.connected && now > u.connect_deadline {
                self.upstream_failed(ui, ug, UpstreamError::Connect, "connect timed out");
                continue;
            }
            if let Some(t) = u.idle_since
                && (now > t + self.cfg.upstream_idle_ms
                    || u.endpoint.removed()
                    || self.stopping_since.is_some())
            {
                self.close_up(ui, ug);
            }
        }
    }
}

fn note_failure(routes: &Routes, metrics: &Metrics, ep: &Endpoint) {
    if routes.failure(ep) {
        metrics.edge.ejections.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(app = %ep.app, instance = %ep.instance, addr = %ep.addr,
            "endpoint ejected for {:?} after repeated failures", routes.policy.ejection);
    }
}

enum PumpOutcome {
    WaitClient,
    WaitUpstream,
    Done,
    UpstreamClosed,
    ClientFailed(std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        let t = token(UP_POLL, 0x00ab_cdef, 0x0012_3456);
        assert_eq!(untoken(t), (UP_POLL, 0x00ab_cdef, 0x0012_3456));
        assert_ne!(t, IGNORE);
    }

    #[test]
    fn bodies_take_exactly_their_length() {
        let mut b = Body::from(Framing::Length(5));
        assert_eq!(b.take(b"abc").unwrap(), 3);
        assert_eq!(b.take(b"defGET").unwrap(), 2);
        assert!(b.done());
        let mut c = Body::from(Framing::Chunked);
        assert_eq!(c.take(b"1\r\na\r\n0\r\n\r\nX").unwrap(), 11);
        assert!(c.done());
    }
}
