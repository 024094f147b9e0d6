//! Failover between an expert server and its replicas (a plan's `replicas:` lists), and the
//! worker's view of whether its expert tier can serve.
//!
//! [`FailoverExperts`] stands for one *primary* server in the worker's sharding: a call goes to
//! the primary; when the primary fails at the transport level (the server is gone, the stream
//! ended, the call timed out) the same call goes to a replica, which holds the same weights and
//! so answers the same (layer, hidden, routing) with the same numbers. While the primary is
//! down its calls go straight to a replica (no timeout paid per call): a primary whose link is
//! lost is tried again as soon as it reconnects ([`RemoteExperts`] redials by itself and
//! re-checks model and placement before it counts as connected); one that timed out with its
//! link still up is tried again after `probe_after`. An error the server *answered* (invalid
//! argument, an expert it does not hold, a failed computation) is the call's fault, not the
//! link's: it is returned as is, and nothing fails over.
//!
//! [`TierHealth`] answers the worker's `Health`: not serving, with the servers named, while a
//! server the worker needs is down and none of its replicas is up.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kt_models::{Experts, ModelError, Routing};

use crate::RemoteExperts;

/// An [`Experts`] holder that can say, without I/O, whether a call would reach it now.
pub trait Reachable: Experts {
    /// True while a link to the server is up.
    fn reachable(&self) -> bool;
}

impl Reachable for RemoteExperts {
    fn reachable(&self) -> bool {
        self.connected()
    }
}

/// One server of the tier as the worker knows it.
#[derive(Clone)]
pub struct Member {
    /// The server's name in the plan.
    pub name: String,
    /// Its address (for messages).
    pub addr: String,
    pub experts: Arc<dyn Reachable>,
}

impl Member {
    pub fn new(name: &str, addr: &str, experts: Arc<dyn Reachable>) -> Self {
        Self { name: name.to_string(), addr: addr.to_string(), experts }
    }

    fn label(&self) -> String {
        format!("`{}` ({})", self.name, self.addr)
    }
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member").field("name", &self.name).field("addr", &self.addr).finish()
    }
}

/// Whether `err` is an answer from the server (so the link works and another server would
/// refuse the same call): a request the worker got wrong, or an error the server sent back.
/// Everything else a remote call fails with is the transport's: unavailable, stream ended,
/// timed out, a broken ring.
pub fn answered_by_server(err: &ModelError) -> bool {
    matches!(err, ModelError::Input(_) | ModelError::ExpertsRefused(_))
}

/// An error's text without the `experts: ` of [`ModelError`]'s display (messages nest them).
fn text(err: &ModelError) -> String {
    match err {
        ModelError::Experts(m) | ModelError::ExpertsRefused(m) => m.clone(),
        other => other.to_string(),
    }
}

/// Why the primary is out.
#[derive(Debug, Clone)]
struct Down {
    since: Instant,
    reason: String,
    /// Its link was gone right after the failure: try it again once it reconnects. Otherwise
    /// (a timeout on a live link) try it again after `probe_after`.
    link_lost: bool,
}

/// Calls served, by whom.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FailoverStats {
    /// Calls the primary answered.
    pub primary: u64,
    /// Calls a replica answered in the primary's place.
    pub replicas: u64,
    /// Times the primary was taken out (a transport failure while it was in use).
    pub failovers: u64,
}

/// A primary expert server and its replicas, as one [`Experts`] (see the module docs).
pub struct FailoverExperts {
    primary: Member,
    replicas: Vec<Member>,
    probe_after: Duration,
    down: Mutex<Option<Down>>,
    served_primary: AtomicU64,
    served_replicas: AtomicU64,
    failovers: AtomicU64,
}

impl std::fmt::Debug for FailoverExperts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailoverExperts")
            .field("primary", &self.primary)
            .field("replicas", &self.replicas)
            .finish_non_exhaustive()
    }
}

impl FailoverExperts {
    /// `primary`'s calls, failing over to `replicas` (tried in this order, reachable ones
    /// first). A primary that timed out on a live link is tried again after `probe_after`.
    pub fn new(primary: Member, replicas: Vec<Member>, probe_after: Duration) -> Self {
        Self {
            primary,
            replicas,
            probe_after,
            down: Mutex::new(None),
            served_primary: AtomicU64::new(0),
            served_replicas: AtomicU64::new(0),
            failovers: AtomicU64::new(0),
        }
    }

    pub fn primary(&self) -> &Member {
        &self.primary
    }

    pub fn replicas(&self) -> &[Member] {
        &self.replicas
    }

    pub fn stats(&self) -> FailoverStats {
        FailoverStats {
            primary: self.served_primary.load(Ordering::Relaxed),
            replicas: self.served_replicas.load(Ordering::Relaxed),
            failovers: self.failovers.load(Ordering::Relaxed),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Down>> {
        self.down.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Why the primary is out of use now, if it is: its link is down, or it failed on a live
    /// link and is in its hold-off.
    pub fn primary_down(&self) -> Option<String> {
        let down = self.lock().clone();
        let up = self.primary.experts.reachable();
        match down {
            Some(d) if !up => Some(d.reason),
            Some(d) if !d.link_lost && d.since.elapsed() < self.probe_after => Some(d.reason),
            Some(_) => None,
            None if !up => Some("not connected".into()),
            None => None,
        }
    }

    /// Whether a call should try the primary first.
    fn primary_first(&self) -> bool {
        match &*self.lock() {
            None => true,
            Some(d) => {
                self.primary.experts.reachable()
                    && (d.link_lost || d.since.elapsed() >= self.probe_after)
            }
        }
    }

    fn primary_ok(&self) {
        self.served_primary.fetch_add(1, Ordering::Relaxed);
        if let Some(d) = self.lock().take() {
            tracing::info!(
                server = %self.primary.name,
                addr = %self.primary.addr,
                after = ?d.since.elapsed(),
                "expert server is back; its calls go to it again"
            );
        }
    }

    fn primary_failed(&self, err: &ModelError) {
        let link_lost = !self.primary.experts.reachable();
        let mut down = self.lock();
        if down.is_none() {
            self.failovers.fetch_add(1, Ordering::Relaxed);
            let to: Vec<&str> = self.replicas.iter().map(|r| r.name.as_str()).collect();
            tracing::warn!(
                server = %self.primary.name,
                addr = %self.primary.addr,
                err = %text(err),
                replicas = ?to,
                "expert server failed; its calls go to a replica until it is back"
            );
        }
        *down = Some(Down { since: Instant::now(), reason: text(err), link_lost });
    }

    /// Replicas in the order to try them: reachable first, plan order within each group.
    fn replica_order(&self) -> Vec<&Member> {
        let (mut up, down): (Vec<&Member>, Vec<&Member>) =
            self.replicas.iter().partition(|r| r.experts.reachable());
        up.extend(down);
        up
    }
}

impl FailoverExperts {
    /// The primary's answer (or the error it answered itself); `None` when it failed as a
    /// transport, recorded first in `failures` for the final error.
    fn call_primary<'a>(
        &'a self,
        layer: usize,
        hidden: &[f32],
        routing: &Routing,
        failures: &mut Vec<(&'a Member, ModelError)>,
    ) -> Option<Result<Vec<f32>, ModelError>> {
        match self.primary.experts.forward(layer, hidden, routing) {
            Ok(out) => {
                self.primary_ok();
                Some(Ok(out))
            }
            Err(e) if answered_by_server(&e) => Some(Err(e)),
            Err(e) => {
                self.primary_failed(&e);
                failures.insert(0, (&self.primary, e));
                None
            }
        }
    }
}

impl Experts for FailoverExperts {
    fn forward(
        &self,
        layer: usize,
        hidden: &[f32],
        routing: &Routing,
    ) -> Result<Vec<f32>, ModelError> {
        let mut failures: Vec<(&Member, ModelError)> = Vec::new();
        // The primary's answer, or its failure recorded (first in the list) for the error.
        let primary_first = self.primary_first();
        if primary_first {
            if let Some(answer) = self.call_primary(layer, hidden, routing, &mut failures) {
                return answer;
            }
        }
        for r in self.replica_order() {
            match r.experts.forward(layer, hidden, routing) {
                Ok(out) => {
                    self.served_replicas.fetch_add(1, Ordering::Relaxed);
                    return Ok(out);
                }
                Err(e) if answered_by_server(&e) => {
                    return Err(ModelError::ExpertsRefused(format!(
                        "{} (replica {} answering for {})",
                        text(&e),
                        r.label(),
                        self.primary.label()
                    )))
                }
                Err(e) => {
                    tracing::warn!(
                        replica = %r.name,
                        primary = %self.primary.name,
                        err = %text(&e),
                        "replica failed too"
                    );
                    failures.push((r, e));
                }
            }
        }
        if !primary_first {
            // Every replica failed: the primary is the last resort, even in its hold-off.
            if let Some(answer) = self.call_primary(layer, hidden, routing, &mut failures) {
                return answer;
            }
        }
        let tried: Vec<String> =
            failures.iter().map(|(m, e)| format!("{}: {}", m.label(), text(e))).collect();
        Err(ModelError::Experts(format!(
            "expert server {} and its replica(s) {} are all unavailable for layer {layer}: {}",
            self.primary.label(),
            self.replicas.iter().map(Member::label).collect::<Vec<_>>().join(", "),
            tried.join("; ")
        )))
    }
}

/// One server the worker needs (it owns a share), with the replicas that can stand in.
#[derive(Debug, Clone)]
struct Group {
    primary: Member,
    replicas: Vec<Member>,
    failover: Option<Arc<FailoverExperts>>,
}

/// Whether the expert tier can serve the worker's calls now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierStatus {
    /// Every share has a reachable holder (its primary or a replica).
    pub serving: bool,
    /// Empty when every server is up; otherwise which are down and who stands in (or that
    /// nobody does).
    pub message: String,
}

/// The worker's view of its expert servers, for `Health`; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct TierHealth {
    groups: Arc<Vec<Group>>,
}

impl TierHealth {
    /// `groups`: each server the worker sends calls to, its replicas, and the failover that
    /// wraps them (when it has replicas).
    pub fn new(groups: Vec<(Member, Vec<Member>, Option<Arc<FailoverExperts>>)>) -> Self {
        let groups = groups
            .into_iter()
            .map(|(primary, replicas, failover)| Group { primary, replicas, failover })
            .collect();
        Self { groups: Arc::new(groups) }
    }

    /// The servers' state now (no I/O).
    pub fn check(&self) -> TierStatus {
        let mut out = Vec::new();
        let mut serving = true;
        for g in self.groups.iter() {
            let down = match &g.failover {
                Some(f) => f.primary_down(),
                None => (!g.primary.experts.reachable()).then(|| "not connected".to_string()),
            };
            let Some(reason) = down else { continue };
            let standing_in: Vec<&Member> =
                g.replicas.iter().filter(|r| r.experts.reachable()).collect();
            if let Some(r) = standing_in.first() {
                out.push(format!(
                    "expert server {} is down ({reason}); replica `{}` answers for it",
                    g.primary.label(),
                    r.name
                ));
            } else {
                serving = false;
                let replicas = if g.replicas.is_empty() {
                    "it has no replica".to_string()
                } else {
                    format!(
                        "its replica(s) {} are down too",
                        g.replicas.iter().map(Member::label).collect::<Vec<_>>().join(", ")
                    )
                };
                out.push(format!(
                    "expert server {} is down ({reason}) and {replicas}",
                    g.primary.label()
                ));
            }
        }
        TierStatus { serving, message: out.join("; ") }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::sync::atomic::AtomicBool;

    /// A stand-in server: answers `tag + layer` per value, or fails as told.
    struct Fake {
        tag: f32,
        up: AtomicBool,
        /// Fail calls with this while set (the link staying up, as a stalled server would).
        fail: Mutex<Option<ModelError>>,
        calls: AtomicU64,
    }

    impl Fake {
        fn new(tag: f32) -> Arc<Self> {
            Arc::new(Self {
                tag,
                up: AtomicBool::new(true),
                fail: Mutex::new(None),
                calls: AtomicU64::new(0),
            })
        }
        fn set_up(&self, up: bool) {
            self.up.store(up, Ordering::SeqCst);
        }
        fn calls(&self) -> u64 {
            self.calls.load(Ordering::SeqCst)
        }
    }

    impl Experts for Fake {
        fn forward(
            &self,
            layer: usize,
            hidden: &[f32],
            _: &Routing,
        ) -> Result<Vec<f32>, ModelError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if !self.up.load(Ordering::SeqCst) {
                return Err(ModelError::Experts(format!(
                    "expert server fake{} is unavailable: the server closed the stream",
                    self.tag
                )));
            }
            if let Some(e) = self.fail.lock().unwrap().as_ref() {
                return Err(match e {
                    ModelError::Input(m) => ModelError::Input(m.clone()),
                    ModelError::Experts(m) => ModelError::Experts(m.clone()),
                    ModelError::ExpertsRefused(m) => ModelError::ExpertsRefused(m.clone()),
                    other => ModelError::Experts(other.to_string()),
                });
            }
            Ok(hidden.iter().map(|_| self.tag + layer as f32).collect())
        }
    }

    impl Reachable for Fake {
        fn reachable(&self) -> bool {
            self.up.load(Ordering::SeqCst)
        }
    }

    fn routing() -> Routing {
        Routing { k: 1, ids: vec![0], weights: vec![1.0] }
    }

    fn pair(probe_after: Duration) -> (Arc<Fake>, Arc<Fake>, FailoverExperts) {
        let (p, r) = (Fake::new(1.0), Fake::new(2.0));
        let f = FailoverExperts::new(
            Member::new("p", "10.0.0.1:1", p.clone()),
            vec![Member::new("r", "10.0.0.2:1", r.clone())],
            probe_after,
        );
        (p, r, f)
    }

    #[test]
    fn server_answers_are_not_transport_failures() {
        assert!(answered_by_server(&ModelError::Input("3 values are not rows of 2".into())));
        assert!(answered_by_server(&ModelError::ExpertsRefused(
            "expert server a:1: CODE_INVALID_ARGUMENT: layer 99 out of range".into()
        )));
        // The kind decides, not the text.
        assert!(!answered_by_server(&ModelError::Experts(
            "expert server a:1 is unavailable: CODE_NOT_HELD: x".into()
        )));
        for transport in [
            "expert server a:1 is unavailable: the server closed the stream",
            "expert server a:1 did not answer layer 3 within 5s",
            "expert server a:1: transport error (Unavailable)",
            "expert server a:1: shared-memory ring is corrupt: slot 0 went to state 9",
        ] {
            assert!(!answered_by_server(&ModelError::Experts(transport.into())), "{transport}");
        }
    }

    #[test]
    fn fails_over_on_a_lost_link_and_returns_when_it_reconnects() {
        let (p, r, f) = pair(Duration::from_secs(3600));
        assert_eq!(f.forward(1, &[0.0; 4], &routing()).unwrap(), vec![2.0; 4]);
        p.set_up(false);
        // The failing call is retried on the replica.
        assert_eq!(f.forward(1, &[0.0; 4], &routing()).unwrap(), vec![3.0; 4]);
        assert_eq!((p.calls(), r.calls()), (2, 1));
        // While it is down the primary is not called at all.
        for _ in 0..5 {
            assert_eq!(f.forward(2, &[0.0; 2], &routing()).unwrap(), vec![4.0; 2]);
        }
        assert_eq!((p.calls(), r.calls()), (2, 6));
        assert!(f.primary_down().unwrap().contains("closed the stream"));
        // Reconnected: straight back, without waiting for the hold-off.
        p.set_up(true);
        assert_eq!(f.forward(1, &[0.0; 1], &routing()).unwrap(), vec![2.0]);
        assert_eq!((p.calls(), r.calls()), (3, 6));
        assert_eq!(f.primary_down(), None);
        assert_eq!(f.stats(), FailoverStats { primary: 2, replicas: 6, failovers: 1 });
    }

    #[test]
    fn a_timeout_on_a_live_link_holds_the_primary_off_then_probes_it() {
        let (p, r, f) = pair(Duration::from_millis(100));
        *p.fail.lock().unwrap() =
            Some(ModelError::Experts("expert server p did not answer layer 1 within 5s".into()));
        assert_eq!(f.forward(1, &[0.0], &routing()).unwrap(), vec![3.0]);
        assert_eq!(f.forward(1, &[0.0], &routing()).unwrap(), vec![3.0]);
        assert_eq!((p.calls(), r.calls()), (1, 2), "no second timeout paid inside the hold-off");
        assert!(f.primary_down().unwrap().contains("did not answer"));
        *p.fail.lock().unwrap() = None;
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(f.forward(1, &[0.0], &routing()).unwrap(), vec![2.0]);
        assert_eq!((p.calls(), r.calls()), (2, 2));
        assert_eq!(f.primary_down(), None);
    }

    #[test]
    fn invalid_requests_do_not_fail_over() {
        let (p, r, f) = pair(Duration::from_secs(3600));
        *p.fail.lock().unwrap() = Some(ModelError::ExpertsRefused(
            "expert server p: CODE_INVALID_ARGUMENT: expert id 99 out of range".into(),
        ));
        let e = f.forward(1, &[0.0], &routing()).unwrap_err().to_string();
        assert!(e.contains("CODE_INVALID_ARGUMENT"), "{e}");
        assert_eq!(r.calls(), 0);
        assert_eq!(f.primary_down(), None);
        *p.fail.lock().unwrap() = Some(ModelError::Input("bad rows".into()));
        assert!(matches!(f.forward(1, &[0.0], &routing()), Err(ModelError::Input(_))));
        assert_eq!(r.calls(), 0);
    }

    #[test]
    fn nobody_up_is_an_error_naming_every_server() {
        let (p, r, f) = pair(Duration::from_secs(3600));
        p.set_up(false);
        r.set_up(false);
        let e = f.forward(3, &[0.0], &routing()).unwrap_err().to_string();
        assert!(e.contains("`p` (10.0.0.1:1)") && e.contains("`r` (10.0.0.2:1)"), "{e}");
        assert!(e.contains("layer 3") && e.contains("closed the stream"), "{e}");
        // Down primary and down replica: the next call tries the replica, then the primary
        // as the last resort; once the primary is back it answers.
        p.set_up(true);
        assert_eq!(f.forward(1, &[0.0], &routing()).unwrap(), vec![2.0]);
    }

    #[test]
    fn tier_health_names_what_is_down() {
        let (p, r, f) = pair(Duration::from_secs(3600));
        let f = Arc::new(f);
        let lone = Fake::new(5.0);
        let health = TierHealth::new(vec![
            (f.primary().clone(), f.replicas().to_vec(), Some(f.clone())),
            (Member::new("lone", "10.0.0.3:1", lone.clone()), vec![], None),
        ]);
        assert_eq!(health.check(), TierStatus { serving: true, message: String::new() });
        p.set_up(false);
        let s = health.check();
        assert!(
            s.serving && s.message.contains("`p`") && s.message.contains("replica `r`"),
            "{s:?}"
        );
        r.set_up(false);
        let s = health.check();
        assert!(!s.serving && s.message.contains("`p` (10.0.0.1:1)"), "{s:?}");
        assert!(s.message.contains("`r` (10.0.0.2:1) are down too"), "{s:?}");
        p.set_up(true);
        r.set_up(true);
        lone.set_up(false);
        let s = health.check();
        assert!(
            !s.serving && s.message.contains("`lone`") && s.message.contains("no replica"),
            "{s:?}"
        );
        lone.set_up(true);
        assert!(health.check().serving);
    }
}
