//! Admission at accept: a place among a port's connections for every
//! newcomer, and, when the unauthenticated pool is full, which anonymous
//! connection gives its place up (see the parent module's docs for why an
//! agent always gets through).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{Activity, Port};
use crate::config::Connections as Limits;
use crate::metrics::Metrics;

/// The source `ip` counts under: an IPv4 address as itself (an
/// IPv4-mapped IPv6 address as its IPv4 address), an IPv6 address as its
/// first `ipv6_prefix` bits, the rest zeroed. One party usually holds a
/// whole IPv6 prefix, so counting its addresses one by one would give it as
/// many shares as it cares to use.
pub(super) fn source_of(ip: IpAddr, ipv6_prefix: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let host_bits = 128 - u32::from(ipv6_prefix.min(128));
            // A shift by 128 (a /0) overflows: then no bit names the source.
            let mask = u128::MAX.checked_shl(host_bits).unwrap_or(0);
            IpAddr::V6((u128::from(v6) & mask).into())
        }
    }
}

/// Which cap refused a connection at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// `max` connections are open and every one is authenticated, so none
    /// can give its place up.
    Connections,
    /// Its source holds `max_unauthenticated_per_source` unauthenticated
    /// connections.
    Source,
}

impl Refusal {
    /// The metrics label.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Self::Connections => "connection_limit",
            Self::Source => "source_limit",
        }
    }
}

/// What an evicted connection was doing: the order in which they are
/// chosen, among those of the same source, is the order of the variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Eviction {
    /// A request was in flight on it (a response being sent, or a body
    /// being received): the last to go.
    InFlight,
    /// Opening: still in its TLS handshake, or done with it but idle for
    /// less than [`SETTLE`] (a client sends its first request just after
    /// its handshake). The oldest first, by accept time, so a connection
    /// that is making progress outlasts stalled ones.
    Opening,
    /// Handshake done, nothing in flight for [`SETTLE`] or more: the
    /// longest idle first.
    Idle,
}

impl Eviction {
    /// The metrics label.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Self::InFlight => "in_flight",
            Self::Opening => "opening",
            Self::Idle => "idle",
        }
    }
}

/// How long a connection must have been idle to count as idle rather
/// than opening: a client's next request (its first, after the handshake)
/// comes well within this.
const SETTLE: Duration = Duration::from_secs(1);

/// An unauthenticated connection, as admission sees it.
#[derive(Debug)]
struct Entry {
    /// The source it counts under.
    source: IpAddr,
    /// Its requests; `since` is when it was accepted.
    activity: Arc<Activity>,
    /// Whether its TLS handshake is done.
    established: bool,
    /// Told when it is evicted.
    evict: Arc<Notify>,
}

impl Entry {
    /// What it is doing and for how long it has been doing that.
    fn state(&self, now: Instant) -> (Eviction, Duration) {
        let a = &self.activity;
        let open_for = now.saturating_duration_since(a.since);
        if !self.established {
            return (Eviction::Opening, open_for);
        }
        if a.in_flight.load(Ordering::Acquire) > 0 {
            return (Eviction::InFlight, open_for);
        }
        let idle_since = a.since + Duration::from_millis(a.last_ms.load(Ordering::Acquire));
        match now.saturating_duration_since(idle_since) {
            idle if idle >= SETTLE => (Eviction::Idle, idle),
            _ => (Eviction::Opening, open_for),
        }
    }
}

/// Every connection of a port, counted under one lock so that an
/// eviction and the admission it makes room for are one step.
#[derive(Debug, Default)]
struct Pool {
    /// The next connection's id.
    next: u64,
    /// The unauthenticated connections, by id.
    anonymous: HashMap<u64, Entry>,
    /// How many of those each source holds (no zero entries).
    sources: HashMap<IpAddr, usize>,
    /// Open authenticated connections.
    authenticated: usize,
}

impl Pool {
    /// Takes `id` out of the unauthenticated counts, if it is still there.
    fn remove(&mut self, id: u64) -> Option<Entry> {
        let entry = self.anonymous.remove(&id)?;
        if let Some(n) = self.sources.get_mut(&entry.source) {
            *n -= 1;
            if *n == 0 {
                self.sources.remove(&entry.source);
            }
        }
        Some(entry)
    }

    /// The connection to evict to make room for one from `newcomer`: one
    /// of the source that would hold the most unauthenticated connections
    /// (counting the newcomer), the longest idle of those, else the
    /// oldest opening, else the oldest with a request in flight.
    fn victim(&self, newcomer: IpAddr, now: Instant) -> Option<(u64, Eviction)> {
        // A scan of at most `max_unauthenticated` entries, only when the
        // pool is full: cheaper than the TLS handshake each admission
        // leads to, and with nothing to keep in order as connections
        // change state.
        self.anonymous
            .iter()
            .map(|(id, e)| {
                let held = self.sources.get(&e.source).copied().unwrap_or(0)
                    + usize::from(e.source == newcomer);
                let (state, age) = e.state(now);
                ((held, state, age), *id)
            })
            .max_by_key(|(key, _)| *key)
            .map(|((_, state, _), id)| (id, state))
    }
}

/// Admission for one port (see the parent module's docs).
#[derive(Debug)]
pub struct Gate {
    /// Which port, for metrics and logs.
    pub(super) port: Port,
    /// The caps and timeouts.
    pub(super) limits: Limits,
    /// Every open connection.
    pool: Mutex<Pool>,
    /// Open connections, by state.
    authenticated_gauge: Gauge,
    unauthenticated_gauge: Gauge,
    /// Where refusals, evictions and closes are counted.
    pub(super) metrics: Arc<Metrics>,
}

impl Gate {
    /// Admission for `port` under `limits`.
    pub fn new(port: Port, limits: Limits, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            port,
            pool: Mutex::default(),
            authenticated_gauge: metrics.connections(port.as_str(), "authenticated"),
            unauthenticated_gauge: metrics.connections(port.as_str(), "unauthenticated"),
            limits,
            metrics,
        })
    }

    fn pool(&self) -> MutexGuard<'_, Pool> {
        // The counts stay consistent at every step, so a panic elsewhere
        // while the lock was held leaves nothing half done.
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for a new connection from `ip`, or why not. When the
    /// unauthenticated pool (or the whole port) is full, an anonymous
    /// connection is evicted to make room.
    pub(super) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refusal> {
        self.admit_at(ip, Instant::now())
    }

    /// [`Gate::admit`], with `now` given.
    fn admit_at(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<Slot, Refusal> {
        let source = source_of(ip, self.limits.ipv6_source_prefix);
        let mut pool = self.pool();
        let held = pool.sources.get(&source).copied().unwrap_or(0);
        if held >= self.limits.max_unauthenticated_per_source {
            return Err(Refusal::Source);
        }
        if pool.anonymous.len() >= self.limits.max_unauthenticated
            || pool.anonymous.len() + pool.authenticated >= self.limits.max
        {
            let (id, why) = pool.victim(source, now).ok_or(Refusal::Connections)?;
            if let Some(entry) = pool.remove(id) {
                entry.evict.notify_one();
            }
            self.unauthenticated_gauge.dec();
            self.metrics
                .connection_evicted(self.port.as_str(), why.as_str());
        }
        let id = pool.next;
        pool.next += 1;
        let activity = Activity::new();
        let evict = Arc::new(Notify::new());
        pool.anonymous.insert(
            id,
            Entry {
                source,
                activity: activity.clone(),
                established: false,
                evict: evict.clone(),
            },
        );
        *pool.sources.entry(source).or_default() += 1;
        self.unauthenticated_gauge.inc();
        Ok(Slot {
            gate: self.clone(),
            id,
            activity,
            evicted: evict,
            authenticated: false,
        })
    }
}

/// A connection's place among its port's connections; given back when it
/// closes.
pub(super) struct Slot {
    gate: Arc<Gate>,
    /// Its entry in the pool while unauthenticated.
    id: u64,
    /// Its requests, which tell admission whether it is idle.
    pub(super) activity: Arc<Activity>,
    /// Told if it is evicted: it must then close at once.
    pub(super) evicted: Arc<Notify>,
    /// Whether it left the unauthenticated counts by authenticating.
    authenticated: bool,
}

impl Slot {
    /// Its TLS handshake is done: from now on it is idle while nothing is
    /// in flight.
    pub(super) fn established(&self) {
        self.activity.touch();
        if let Some(e) = self.gate.pool().anonymous.get_mut(&self.id) {
            e.established = true;
        }
    }

    /// The peer authenticated: it leaves the unauthenticated counts and
    /// can no longer be evicted. False if it was evicted first (it is then
    /// closing).
    pub(super) fn authenticated(&mut self) -> bool {
        if self.authenticated {
            return true;
        }
        let gate = &self.gate;
        let mut pool = gate.pool();
        if pool.remove(self.id).is_none() {
            return false;
        }
        pool.authenticated += 1;
        self.authenticated = true;
        gate.unauthenticated_gauge.dec();
        gate.authenticated_gauge.inc();
        true
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let gate = &self.gate;
        let mut pool = gate.pool();
        if self.authenticated {
            pool.authenticated -= 1;
            gate.authenticated_gauge.dec();
        } else if pool.remove(self.id).is_some() {
            gate.unauthenticated_gauge.dec();
        }
        // Otherwise it was evicted, and its counts went with it.
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;

    fn limits(max: usize, unauth: usize, per_source: usize) -> Limits {
        Limits {
            max,
            max_unauthenticated: unauth,
            max_unauthenticated_per_source: per_source,
            ..Limits::default()
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn gate(max: usize, unauth: usize, per_source: usize) -> Arc<Gate> {
        Gate::new(
            Port::Grpc,
            limits(max, unauth, per_source),
            Arc::new(Metrics::new()),
        )
    }

    /// Unauthenticated and authenticated connections open.
    fn open(gate: &Gate) -> (usize, usize) {
        let pool = gate.pool();
        (pool.anonymous.len(), pool.authenticated)
    }

    /// Whether `slot` was told to close.
    async fn was_evicted(slot: &Slot) -> bool {
        tokio::time::timeout(Duration::from_millis(1), slot.evicted.notified())
            .await
            .is_ok()
    }

    #[test]
    fn ipv6_sources_are_counted_by_prefix_and_mapped_ipv4_as_ipv4() {
        // Two addresses of one /64 are one source; the next /64 another.
        let a = source_of(ip("2001:db8:1:2:aaaa::1"), 64);
        assert_eq!(a, ip("2001:db8:1:2::"));
        assert_eq!(source_of(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"), 64), a);
        assert_ne!(source_of(ip("2001:db8:1:3::1"), 64), a);
        // Other prefix lengths, to the edges.
        assert_eq!(
            source_of(ip("2001:db8:1:2ff::1"), 56),
            ip("2001:db8:1:200::")
        );
        assert_eq!(source_of(ip("2001:db8::7"), 128), ip("2001:db8::7"));
        assert_eq!(source_of(ip("2001:db8::7"), 1), ip("::"));
        assert_eq!(
            source_of(ip("ffff::7"), 1),
            IpAddr::V6(Ipv6Addr::new(0x8000, 0, 0, 0, 0, 0, 0, 0))
        );
        // An IPv4-mapped address is its IPv4 address, whatever the prefix;
        // IPv4 addresses are never aggregated.
        assert_eq!(source_of(ip("::ffff:192.0.2.7"), 64), ip("192.0.2.7"));
        assert_ne!(source_of(ip("::ffff:192.0.2.8"), 64), ip("192.0.2.7"));
        assert_eq!(source_of(ip("192.0.2.7"), 1), ip("192.0.2.7"));
    }

    #[test]
    fn one_ipv6_prefix_is_held_to_one_share() {
        let gate = gate(100, 50, 2);
        let _a = gate.admit(ip("2001:db8:0:1::1")).unwrap();
        let _b = gate.admit(ip("2001:db8:0:1::2")).unwrap();
        assert_eq!(
            gate.admit(ip("2001:db8:0:1:ffff::3")).err(),
            Some(Refusal::Source)
        );
        // The mapped form of an IPv4 source shares its count.
        let _c = gate.admit(ip("192.0.2.1")).unwrap();
        let _d = gate.admit(ip("::ffff:192.0.2.1")).unwrap();
        assert_eq!(gate.admit(ip("192.0.2.1")).err(), Some(Refusal::Source));
        assert!(gate.admit(ip("2001:db8:0:2::1")).is_ok());
    }

    #[test]
    fn authenticated_connections_leave_the_anonymous_counts() {
        let gate = gate(6, 3, 2);
        let (a, b) = (ip("10.0.0.1"), ip("10.0.0.2"));
        let mut a1 = gate.admit(a).unwrap();
        let _a2 = gate.admit(a).unwrap();
        assert_eq!(gate.admit(a).err(), Some(Refusal::Source));
        // Authenticated, it no longer counts against its source.
        assert!(a1.authenticated());
        let mut slots = vec![gate.admit(a).unwrap()];
        for _ in 0..3 {
            let mut s = gate.admit(b).unwrap();
            assert!(s.authenticated());
            slots.push(s);
        }
        // Six open, four authenticated: the total cap holds, so a newcomer
        // takes an anonymous connection's place.
        let c = gate.admit(ip("10.0.0.3")).unwrap();
        assert_eq!(open(&gate), (2, 4));
        drop(c);
        // Once every open connection is authenticated, there is no place
        // to take.
        let mut more = Vec::new();
        while open(&gate).0 + open(&gate).1 < 6 {
            let mut s = gate.admit(ip("10.0.0.4")).unwrap();
            assert!(s.authenticated());
            more.push(s);
        }
        for s in &mut slots {
            s.authenticated();
        }
        assert_eq!(open(&gate), (0, 6));
        assert_eq!(gate.admit(ip("10.0.0.5")).err(), Some(Refusal::Connections));
        drop(more);
        assert!(gate.admit(ip("10.0.0.5")).is_ok());
        assert_eq!(gate.pool().sources.get(&a), None);
    }

    #[tokio::test]
    async fn a_full_pool_evicts_from_the_heaviest_source_never_a_light_one() {
        let gate = gate(100, 4, 3);
        let (attacker, other, agent) = (ip("10.0.0.9"), ip("10.0.0.8"), ip("10.0.0.1"));
        // The attacker's three connections: one idle since its handshake,
        // two still in theirs; another source's one, idle longer.
        let other1 = gate.admit(other).unwrap();
        other1.established();
        let handshaking_old = gate.admit(attacker).unwrap();
        let handshaking_new = gate.admit(attacker).unwrap();
        let idle = gate.admit(attacker).unwrap();
        idle.established();
        // Two seconds on, an agent's connection in its handshake: the
        // attacker's source holds the most, and its idle connection goes
        // first.
        let later = Instant::now() + 2 * SETTLE;
        let agent1 = gate.admit_at(agent, later).unwrap();
        assert!(was_evicted(&idle).await);
        assert!(!was_evicted(&other1).await);
        // Then its oldest handshake, then the newer one.
        let _agent2 = gate.admit_at(agent, later).unwrap();
        assert!(was_evicted(&handshaking_old).await);
        assert!(!was_evicted(&handshaking_new).await);
        // Now every source holds one or two: the agent's source, holding
        // the most counting the newcomer, gives up its own oldest.
        let _agent3 = gate.admit_at(agent, later).unwrap();
        assert!(was_evicted(&agent1).await);
        assert!(!was_evicted(&handshaking_new).await && !was_evicted(&other1).await);
        // An evicted connection's place is gone: closing it later, or its
        // handshake completing, gives nothing back twice.
        let mut agent1 = agent1;
        assert!(!agent1.authenticated());
        drop((agent1, idle, handshaking_old));
        assert_eq!(open(&gate).0, 4);
        assert_eq!(gate.pool().sources.get(&agent), Some(&2));
        assert_eq!(gate.pool().sources.get(&attacker), Some(&1));
    }

    #[tokio::test]
    async fn a_request_in_flight_outlasts_idle_and_handshaking_connections() {
        let gate = gate(100, 3, 3);
        let attacker = ip("10.0.0.9");
        let busy = gate.admit(attacker).unwrap();
        busy.established();
        let in_flight = busy.activity.begin();
        let handshaking = gate.admit(attacker).unwrap();
        let idle = gate.admit(attacker).unwrap();
        idle.established();
        let later = Instant::now() + 2 * SETTLE;
        let _n1 = gate.admit_at(ip("10.0.0.1"), later).unwrap();
        assert!(was_evicted(&idle).await);
        let _n2 = gate.admit_at(ip("10.0.0.2"), later).unwrap();
        assert!(was_evicted(&handshaking).await);
        assert!(!was_evicted(&busy).await);
        drop(in_flight);
        // Idle now, and its source holds as many as every other (one): the
        // longest idle goes, which it is (the others are opening).
        let _n3 = gate.admit_at(ip("10.0.0.3"), later).unwrap();
        assert!(was_evicted(&busy).await);
    }

    #[tokio::test]
    async fn a_connection_just_past_its_handshake_outlasts_stalled_ones() {
        let gate = gate(100, 3, 3);
        let stalled1 = gate.admit(ip("10.0.0.1")).unwrap();
        let stalled2 = gate.admit(ip("10.0.0.2")).unwrap();
        // A validator's connection, its handshake just done, about to send
        // its request: not idle yet, and younger than the stalled ones.
        let validator = gate.admit(ip("10.0.0.3")).unwrap();
        validator.established();
        let _n1 = gate.admit(ip("10.0.0.4")).unwrap();
        assert!(was_evicted(&stalled1).await);
        assert!(!was_evicted(&validator).await && !was_evicted(&stalled2).await);
        // Left idle past the settling time, it goes first.
        let _n2 = gate
            .admit_at(ip("10.0.0.5"), Instant::now() + 2 * SETTLE)
            .unwrap();
        assert!(was_evicted(&validator).await);
        assert!(!was_evicted(&stalled2).await);
    }
}
