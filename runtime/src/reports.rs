//! What the calls that move services report: one migration's report, and why a call did not
//! do what was asked. Data only, shared by every layer.

use serde::{Deserialize, Serialize};

use tern_proto::ids::{NodeName, ServiceId};
use tern_proto::migration::AbortReason;

/// What became of one migration, as the source saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationReport {
    /// `source#n`: the attempt's id.
    pub migration: String,
    /// The service.
    pub service: ServiceId,
    /// The node it ran on.
    pub from: NodeName,
    /// The node asked to take it.
    pub to: NodeName,
    /// Why it did not move; `None` when it did.
    pub aborted: Option<AbortReason>,
    /// Its epoch after the migration (unchanged when aborted).
    pub epoch: u64,
    /// From the freeze at the source (the message in hand finished, the snapshot not yet
    /// taken) until the target handled its next message, or had none to handle with the whole
    /// carried queue in, in microseconds. Summed from the two nodes' own clocks, so it is an
    /// upper bound by one one-way trip. For an abort: until the service resumed at the source.
    pub freeze_us: u64,
    /// From the call until the target runs and has every carried message, in microseconds.
    pub total_us: u64,
    /// From the call until the service froze at the source, in microseconds (0 when it never
    /// froze). With `freeze_us` it places the freeze in time, e.g. to measure the window
    /// in which a group of services was frozen.
    pub frozen_after_us: u64,
    /// Bytes written on the snapshot stream: header, state and carried queue.
    pub snapshot_bytes: u64,
    /// Bytes of state copied ahead while the service still ran, before the freeze
    /// ([`Precopy`](crate::Precopy)); 0 when the whole state went in the freeze.
    #[serde(default)]
    pub precopied_bytes: u64,
    /// Queued messages carried in the snapshot.
    pub carried: u64,
    /// Messages that arrived during the freeze and were forwarded after commit.
    pub forwarded: u64,
    /// Address-book entries rewritten on the source node at commit.
    pub rebuilt: u64,
}

impl MigrationReport {
    /// True when the service now runs on `to`.
    pub fn committed(&self) -> bool {
        self.aborted.is_none()
    }
}

/// Why a call that moves services did not do what was asked: the reports of the migrations
/// tried (each says which service, from where, to where, and why it did not move) and the
/// services refused before anything was tried (with why). Carried by [`Error::NotMoved`](crate::Error::NotMoved), and
/// by the outcome of [`Ctx::migrate`](crate::Ctx::migrate) given back to the service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotMoved {
    /// The migrations tried: every member's report, moved or not.
    pub reports: Vec<MigrationReport>,
    /// Services refused before anything froze (a plan no node fits, a pinned service), with
    /// why.
    pub refused: Vec<(ServiceId, String)>,
}

impl NotMoved {
    /// The reason the first service that did not move gives.
    pub fn reason(&self) -> Option<String> {
        self.reports
            .iter()
            .find_map(|r| r.aborted.as_ref().map(|a| a.to_string()))
            .or_else(|| self.refused.first().map(|(_, why)| why.clone()))
    }

    /// The abort reasons of the migrations tried, in order.
    pub fn aborted(&self) -> impl Iterator<Item = &AbortReason> {
        self.reports.iter().filter_map(|r| r.aborted.as_ref())
    }
}

impl std::fmt::Display for NotMoved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        for r in &self.reports {
            if let Some(why) = &r.aborted {
                parts.push(format!(
                    "{} did not move from {} to {}: {why}",
                    r.service, r.from, r.to
                ));
            }
        }
        for (id, why) in &self.refused {
            parts.push(format!("{id} was not moved: {why}"));
        }
        if parts.is_empty() {
            parts.push("nothing moved".into());
        }
        f.write_str(&parts.join("; "))
    }
}
