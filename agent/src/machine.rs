//! One instance's life as a plain state machine: inputs in, actions out, no I/O, so every
//! transition is unit-tested.
//!
//! ```text
//! Idle -> Launching -> Ready -> Draining -> Stopped
//!            |  ^        |
//!            |  |        v
//!            |  +--- Unhealthy (deregistered until healthy again)
//!            v
//!   Backoff (exit: restart at once, then after 0.2 s, 0.4 s, ... 30 s) -> Launching
//!   Failed  (never Ready within the deadline, or the spore cannot run)
//! ```

use std::time::{Duration, Instant};

use crate::supervisor::ExitReason;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Idle,
    Launching,
    Ready,
    Unhealthy,
    Backoff,
    Failed,
    Draining,
    Stopped,
}

/// Knobs from the plan and the manifest.
#[derive(Debug, Clone, Copy)]
pub struct MachineConfig {
    /// Passing checks must last this long before Ready.
    pub min_healthy: Duration,
    /// A launch that is not Ready within this time fails (auto-revert for new versions).
    pub deadline: Duration,
    /// Time between deregistration and SIGTERM when draining.
    pub drain: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Consecutive failed runs after which the instance counts as crash-looping.
    pub crashloop_after: u32,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            min_healthy: Duration::from_secs(1),
            deadline: Duration::from_secs(60),
            drain: Duration::from_secs(2),
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            crashloop_after: 3,
        }
    }
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Start (or restart) now.
    Launch,
    /// The process runs.
    Started,
    /// Starting failed before a process ran (fetch, verify, spawn); `fatal` if retrying the
    /// same spore cannot help (e.g. an untrusted signature).
    LaunchFailed {
        message: String,
        fatal: bool,
    },
    Health(bool),
    Exited(ExitReason),
    /// Stop serving: deregister, wait the drain time, stop.
    Drain,
    /// Time passed.
    Tick,
}

/// What the caller must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Start,
    Register,
    Deregister,
    Stop,
}

#[derive(Debug, Clone)]
pub struct Machine {
    pub phase: Phase,
    pub cfg: MachineConfig,
    /// Process starts after the first.
    pub restarts: u32,
    /// Failed runs since the last Ready.
    pub failures: u32,
    pub last_exit: Option<ExitReason>,
    /// Why it failed or last went wrong, for humans.
    pub message: String,
    /// A short machine-readable reason: `-`, `exit:N`, `signal:N`, `oom`, `unhealthy`,
    /// `deadline`, `start`, `lost`.
    pub reason: String,
    pub registered: bool,
    /// A process is (believed to be) running.
    pub running: bool,
    healthy_since: Option<Instant>,
    deadline_at: Option<Instant>,
    backoff_until: Option<Instant>,
    drain_until: Option<Instant>,
    stop_sent: bool,
    launched_once: bool,
}

impl Machine {
    pub fn new(cfg: MachineConfig) -> Machine {
        Machine {
            phase: Phase::Idle,
            cfg,
            restarts: 0,
            failures: 0,
            last_exit: None,
            message: String::new(),
            reason: "-".into(),
            registered: false,
            running: false,
            healthy_since: None,
            deadline_at: None,
            backoff_until: None,
            drain_until: None,
            stop_sent: false,
            launched_once: false,
        }
    }

    /// A machine for a process found running after an agent restart: it must pass its checks
    /// again (without the min healthy time) before it serves.
    pub fn adopted(cfg: MachineConfig, now: Instant) -> Machine {
        let mut m = Machine::new(MachineConfig {
            min_healthy: Duration::ZERO,
            ..cfg
        });
        m.phase = Phase::Launching;
        m.running = true;
        m.launched_once = true;
        // It may still be registered from before the restart (the lease survives): treat it
        // as registered so that any way out of service deregisters it.
        m.registered = true;
        m.deadline_at = Some(now + cfg.deadline);
        m
    }

    /// The state shown to users.
    pub fn state(&self) -> &'static str {
        match self.phase {
            Phase::Idle | Phase::Launching => "launching",
            Phase::Ready => "ready",
            Phase::Unhealthy => "unhealthy",
            Phase::Backoff if self.failures >= self.cfg.crashloop_after => "crashloop",
            Phase::Backoff => "backoff",
            Phase::Failed => "failed",
            Phase::Draining => "draining",
            Phase::Stopped => "stopped",
        }
    }

    /// Whether health checks should run now.
    pub fn wants_health(&self) -> bool {
        self.running
            && matches!(
                self.phase,
                Phase::Launching | Phase::Ready | Phase::Unhealthy
            )
    }

    /// The first failure restarts at once (a one-off crash costs no extra downtime); then
    /// base, 2 x base, ... up to the maximum.
    fn backoff(&self) -> Duration {
        if self.failures <= 1 {
            return Duration::ZERO;
        }
        let exp = (self.failures - 2).min(16);
        self.cfg
            .backoff_base
            .saturating_mul(1 << exp)
            .min(self.cfg.backoff_max)
    }

    fn fail(&mut self, reason: &str, message: String) -> Vec<Action> {
        let mut out = Vec::new();
        if self.registered {
            self.registered = false;
            out.push(Action::Deregister);
        }
        if self.running {
            out.push(Action::Stop);
        }
        self.phase = Phase::Failed;
        self.reason = reason.into();
        self.message = message;
        out
    }

    pub fn on(&mut self, input: Input, now: Instant) -> Vec<Action> {
        use Phase::*;
        match (self.phase, input) {
            (Stopped, _) => vec![],
            (Idle | Backoff, Input::Launch) => {
                if self.launched_once {
                    self.restarts += 1;
                }
                self.launched_once = true;
                self.phase = Launching;
                self.healthy_since = None;
                if self.deadline_at.is_none() {
                    self.deadline_at = Some(now + self.cfg.deadline);
                }
                vec![Action::Start]
            }
            // Only a launch in progress can start; a late start of an instance that moved on
            // (drained, failed) is stopped by the caller.
            (Launching, Input::Started) => {
                self.running = true;
                vec![]
            }
            (Launching, Input::LaunchFailed { message, fatal }) => {
                if fatal {
                    return self.fail("start", message);
                }
                self.failures += 1;
                self.reason = "start".into();
                self.message = message;
                self.phase = Backoff;
                self.backoff_until = Some(now + self.backoff());
                vec![]
            }
            (Launching | Unhealthy, Input::Health(true)) => {
                let since = *self.healthy_since.get_or_insert(now);
                if now.duration_since(since) >= self.cfg.min_healthy {
                    self.phase = Ready;
                    self.failures = 0;
                    // The last exit stays in `reason`; the problem text is history now.
                    self.message.clear();
                    self.deadline_at = None;
                    self.registered = true;
                    vec![Action::Register]
                } else {
                    vec![]
                }
            }
            (Launching | Unhealthy, Input::Health(false)) => {
                self.healthy_since = None;
                vec![]
            }
            (Ready, Input::Health(false)) => {
                self.phase = Unhealthy;
                self.healthy_since = None;
                self.reason = "unhealthy".into();
                self.message = "health check failed".into();
                self.registered = false;
                vec![Action::Deregister]
            }
            (Ready, Input::Health(true)) => vec![],
            (Launching | Ready | Unhealthy, Input::Exited(r)) => {
                self.running = false;
                self.last_exit = Some(r);
                self.reason = short_reason(r);
                self.message = format!("the process {r}");
                self.failures += 1;
                let mut out = Vec::new();
                if self.registered {
                    self.registered = false;
                    out.push(Action::Deregister);
                }
                self.phase = Backoff;
                self.backoff_until = Some(now + self.backoff());
                out
            }
            (Launching, Input::Tick) if self.deadline_at.is_some_and(|d| now >= d) => {
                let secs = self.cfg.deadline.as_secs_f64();
                self.fail("deadline", format!("not Ready within {secs:.0} s (health checks never passed for the minimum time)"))
            }
            (Backoff, Input::Tick) if self.deadline_at.is_some_and(|d| now >= d) => {
                let msg = format!(
                    "kept failing for {:.0} s: {}",
                    self.cfg.deadline.as_secs_f64(),
                    self.message
                );
                self.fail("deadline", msg)
            }
            (Backoff, Input::Tick) if self.backoff_until.is_some_and(|t| now >= t) => {
                self.on(Input::Launch, now)
            }
            (Failed, Input::Exited(r)) => {
                self.running = false;
                self.last_exit = Some(r);
                vec![]
            }
            (Idle | Backoff | Failed, Input::Drain) => {
                self.phase = if self.running { Draining } else { Stopped };
                self.drain_until = Some(now);
                if self.running {
                    self.stop_sent = true;
                    vec![Action::Stop]
                } else {
                    vec![]
                }
            }
            (Launching | Ready | Unhealthy, Input::Drain) => {
                let mut out = Vec::new();
                if self.registered {
                    self.registered = false;
                    out.push(Action::Deregister);
                    self.drain_until = Some(now + self.cfg.drain);
                } else {
                    self.drain_until = Some(now);
                }
                self.phase = Draining;
                out.extend(self.on(Input::Tick, now));
                out
            }
            (Draining, Input::Tick)
                if !self.stop_sent && self.drain_until.is_some_and(|t| now >= t) =>
            {
                self.stop_sent = true;
                if self.running {
                    vec![Action::Stop]
                } else {
                    self.stopped()
                }
            }
            (Draining, Input::Exited(r)) => {
                self.running = false;
                self.last_exit = Some(r);
                self.stopped()
            }
            _ => vec![],
        }
    }

    fn stopped(&mut self) -> Vec<Action> {
        self.phase = Phase::Stopped;
        vec![]
    }
}

/// The short reason for an exit.
pub fn short_reason(r: ExitReason) -> String {
    match r {
        ExitReason::Exited(c) => format!("exit:{c}"),
        ExitReason::Signaled(s) => format!("signal:{s}"),
        ExitReason::OomKilled => "oom".into(),
        ExitReason::Vanished => "lost".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> MachineConfig {
        MachineConfig {
            min_healthy: Duration::from_millis(500),
            deadline: Duration::from_secs(10),
            drain: Duration::from_secs(1),
            ..MachineConfig::default()
        }
    }

    fn ms(t0: Instant, n: u64) -> Instant {
        t0 + Duration::from_millis(n)
    }

    #[test]
    fn launching_becomes_ready_only_after_min_healthy_time() {
        let t0 = Instant::now();
        let mut m = Machine::new(cfg());
        assert_eq!(m.on(Input::Launch, t0), vec![Action::Start]);
        m.on(Input::Started, t0);
        assert!(m.on(Input::Health(true), ms(t0, 100)).is_empty());
        assert!(
            m.on(Input::Health(false), ms(t0, 300)).is_empty(),
            "a failure restarts the clock"
        );
        assert!(m.on(Input::Health(true), ms(t0, 400)).is_empty());
        assert!(
            m.on(Input::Health(true), ms(t0, 800)).is_empty(),
            "only 400 ms of passing checks"
        );
        assert_eq!(
            m.on(Input::Health(true), ms(t0, 900)),
            vec![Action::Register]
        );
        assert_eq!(
            (m.phase, m.state(), m.registered),
            (Phase::Ready, "ready", true)
        );
    }

    #[test]
    fn unhealthy_deregisters_at_once_and_recovers() {
        let t0 = Instant::now();
        let mut m = Machine::new(MachineConfig {
            min_healthy: Duration::ZERO,
            ..cfg()
        });
        m.on(Input::Launch, t0);
        m.on(Input::Started, t0);
        assert_eq!(m.on(Input::Health(true), t0), vec![Action::Register]);
        assert_eq!(
            m.on(Input::Health(false), ms(t0, 10)),
            vec![Action::Deregister]
        );
        assert_eq!(m.state(), "unhealthy");
        assert_eq!(
            m.on(Input::Health(true), ms(t0, 20)),
            vec![Action::Register]
        );
    }

    #[test]
    fn exits_restart_with_exponential_backoff_and_show_a_crash_loop() {
        let t0 = Instant::now();
        let mut m = Machine::new(MachineConfig {
            deadline: Duration::from_secs(3600),
            ..cfg()
        });
        m.on(Input::Launch, t0);
        m.on(Input::Started, t0);
        let mut t = 0;
        let mut waits = Vec::new();
        for _ in 0..4 {
            assert!(
                m.on(Input::Exited(ExitReason::Exited(3)), ms(t0, t))
                    .is_empty()
            );
            assert_eq!(m.reason, "exit:3");
            // Find when the restart comes.
            let start = t;
            loop {
                t += 50;
                if m.on(Input::Tick, ms(t0, t)) == vec![Action::Start] {
                    break;
                }
            }
            waits.push(t - start);
            m.on(Input::Started, ms(t0, t));
        }
        assert_eq!(
            waits,
            vec![50, 200, 400, 800],
            "at once (the next tick), then 200 ms doubling"
        );
        assert_eq!(m.restarts, 4);
        m.on(Input::Exited(ExitReason::OomKilled), ms(t0, t));
        assert_eq!((m.state(), m.reason.as_str()), ("crashloop", "oom"));
    }

    #[test]
    fn never_ready_within_the_deadline_fails_and_stops() {
        let t0 = Instant::now();
        let mut m = Machine::new(cfg());
        m.on(Input::Launch, t0);
        m.on(Input::Started, t0);
        m.on(Input::Health(false), ms(t0, 5_000));
        assert!(m.on(Input::Tick, ms(t0, 9_999)).is_empty());
        assert_eq!(m.on(Input::Tick, ms(t0, 10_000)), vec![Action::Stop]);
        assert_eq!((m.state(), m.reason.as_str()), ("failed", "deadline"));
        assert!(
            m.on(Input::Health(true), ms(t0, 10_001)).is_empty(),
            "failed is final"
        );
        assert!(
            m.on(Input::Exited(ExitReason::Signaled(15)), ms(t0, 10_100))
                .is_empty()
        );
        assert!(!m.running);
    }

    #[test]
    fn an_untrusted_spore_fails_at_once_without_retrying() {
        let t0 = Instant::now();
        let mut m = Machine::new(cfg());
        m.on(Input::Launch, t0);
        let out = m.on(
            Input::LaunchFailed {
                message: "signature by key 3f2a is not trusted".into(),
                fatal: true,
            },
            t0,
        );
        assert!(out.is_empty(), "nothing ran, nothing to stop");
        assert_eq!(m.state(), "failed");
        assert!(m.on(Input::Tick, ms(t0, 60_000)).is_empty());
    }

    #[test]
    fn draining_deregisters_waits_then_stops() {
        let t0 = Instant::now();
        let mut m = Machine::new(MachineConfig {
            min_healthy: Duration::ZERO,
            ..cfg()
        });
        m.on(Input::Launch, t0);
        m.on(Input::Started, t0);
        m.on(Input::Health(true), t0);
        assert_eq!(m.on(Input::Drain, ms(t0, 100)), vec![Action::Deregister]);
        assert_eq!(m.state(), "draining");
        assert!(
            m.on(Input::Tick, ms(t0, 1_000)).is_empty(),
            "still in its drain time"
        );
        assert_eq!(m.on(Input::Tick, ms(t0, 1_100)), vec![Action::Stop]);
        assert!(
            m.on(Input::Tick, ms(t0, 1_200)).is_empty(),
            "stop is sent once"
        );
        m.on(Input::Exited(ExitReason::Signaled(15)), ms(t0, 1_300));
        assert_eq!(m.phase, Phase::Stopped);
    }

    #[test]
    fn draining_a_backing_off_instance_stops_it_at_once() {
        let t0 = Instant::now();
        let mut m = Machine::new(cfg());
        m.on(Input::Launch, t0);
        m.on(Input::Started, t0);
        m.on(Input::Exited(ExitReason::Exited(1)), t0);
        assert!(m.on(Input::Drain, t0).is_empty());
        assert_eq!(m.phase, Phase::Stopped);
    }

    #[test]
    fn an_adopted_instance_serves_after_one_passing_check() {
        let t0 = Instant::now();
        let mut m = Machine::adopted(cfg(), t0);
        assert!(m.wants_health());
        assert_eq!(m.on(Input::Health(true), t0), vec![Action::Register]);
        assert_eq!(m.restarts, 0);
        // One that never comes back healthy is still registered from before: draining it
        // deregisters it, and its deadline fails it.
        let mut m = Machine::adopted(cfg(), t0);
        assert_eq!(m.on(Input::Drain, t0), vec![Action::Deregister]);
        let mut m = Machine::adopted(cfg(), t0);
        assert_eq!(
            m.on(Input::Tick, ms(t0, 10_000)),
            vec![Action::Deregister, Action::Stop]
        );
        assert_eq!(m.reason, "deadline");
    }

    #[test]
    fn a_late_start_does_not_revive_an_instance_that_moved_on() {
        let t0 = Instant::now();
        let mut m = Machine::new(cfg());
        m.on(Input::Launch, t0);
        m.on(Input::Drain, t0);
        assert_eq!(m.phase, Phase::Stopped);
        m.on(Input::Started, t0);
        assert!(!m.running);
    }
}
