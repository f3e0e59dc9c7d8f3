//! Verify: recompute the chain over a range and name the first bad link.
//! Used by the Verify RPC and, offline, by `mesh-audit verify`.
//!
//! It reads the chain head and the newest retention checkpoint first, then
//! the events in keyset pages of at most `page` rows, each its own short
//! statement on a connection taken from the pool for that page only: no
//! transaction lasts the whole run, so a long Verify holds back neither
//! vacuum nor a replica's replay. Events are never changed, and every event
//! up to the head read first is committed before it, so the pages join into
//! the answer one snapshot would give. It checks that:
//! - the range starts on a trusted anchor: the genesis hash for sequence 1,
//!   the newest retention checkpoint for the oldest retained event, else the
//!   stored hash of the event before the range;
//! - every sequence in the range is present exactly once, in order;
//! - every row decodes, links to its predecessor (`prev_hash`) and hashes to
//!   its stored `hash` under its own `hash_version` ([`crate::chain`]);
//! - for v2 events, the `jsonb` copy of the metadata holds the same values
//!   as the hashed `metadata_pb` (so SQL over `jsonb` can be trusted too).
//!
//! A row that does not decode is reported like any other bad event (named,
//! `ok: false`), never as an error of the whole call.
//! - when the range ends at the head, the chain head row agrees.

use sqlx::PgPool;

use crate::{
    chain::{GENESIS, Hash, HashVersion},
    domain::SequenceRange,
    error::Error,
    store,
};

/// What Verify found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Every event in the range is intact and linked.
    pub ok: bool,
    /// Events found intact before the first bad one (all of them when ok).
    pub checked: u64,
    /// The first sequence whose row is missing, altered or unlinked.
    pub first_bad_sequence: Option<u64>,
    /// What is wrong with it.
    pub problem: Option<String>,
    /// The hash of the last intact event checked (the anchor if none).
    pub head_hash: Hash,
    /// The range checked, resolved.
    pub from: u64,
    /// Last sequence of the range.
    pub to: u64,
}

/// Verifies `range` on `pool` (primary or replica), reading at most `page`
/// rows per statement.
pub async fn verify(pool: &PgPool, range: SequenceRange, page: usize) -> Result<Report, Error> {
    let server = pool.connect_options();
    let page = page.max(1);
    let (head, checkpoint) = {
        let mut conn = pool.acquire().await?;
        let head = store::read_head_in(&mut conn, &server).await?;
        (head, store::latest_checkpoint(&mut conn, &server).await?)
    };
    let first_retained = checkpoint.as_ref().map_or(1, |(s, _)| s + 1);

    let to = range.to.unwrap_or(head.last());
    if to > head.last() {
        return Err(Error::OutOfRange(format!("to_sequence {to} is beyond the head, {}", head.last())));
    }
    let from = range.from.unwrap_or(first_retained);
    if from < first_retained {
        return Err(Error::OutOfRange(format!(
            "sequences up to {} were removed by retention; the oldest retained is {first_retained}",
            first_retained - 1
        )));
    }
    let mut report = Report {
        ok: true,
        checked: 0,
        first_bad_sequence: None,
        problem: None,
        head_hash: GENESIS,
        from,
        to,
    };
    let bad = |mut r: Report, sequence: u64, problem: String| {
        r.ok = false;
        r.first_bad_sequence = Some(sequence);
        r.problem = Some(problem);
        r
    };
    if from > to {
        if range.from.is_some() {
            return Err(Error::OutOfRange(format!("from_sequence {from} is beyond the head, {to}")));
        }
        // nothing retained yet, or everything dropped: the head is the anchor
        report.head_hash = head.hash;
        return Ok(report);
    }

    let anchor: Option<Vec<u8>> = if from == 1 {
        Some(GENESIS.to_vec())
    } else if from == first_retained {
        checkpoint.map(|(_, h)| h)
    } else {
        store::hash_at(&mut *pool.acquire().await?, &server, from - 1).await?
    };
    let Some(Ok(mut prev)) = anchor.map(Hash::try_from) else {
        return Ok(bad(report, from, format!("the hash before sequence {from} is missing")));
    };
    report.head_hash = prev;

    let mut expected = from;
    while expected <= to {
        let rows = store::rows_from(&mut *pool.acquire().await?, &server, expected, to, page).await?;
        if rows.is_empty() {
            break;
        }
        for row in rows {
            let sequence = row.sequence as u64;
            if sequence > expected {
                return missing(pool, report, expected).await;
            }
            if sequence < expected {
                return Ok(bad(report, sequence, format!("event {sequence} appears more than once")));
            }
            let event = match row.clone().into_event() {
                Ok(e) => e,
                Err(why) => {
                    return Ok(bad(report, sequence, format!("event {sequence} is malformed: {why}")));
                }
            };
            if event.prev_hash != prev {
                return Ok(bad(
                    report,
                    sequence,
                    format!("event {sequence} does not link to event {}", sequence - 1),
                ));
            }
            if event.compute_hash() != event.hash {
                return Ok(bad(report, sequence, format!("event {sequence} does not match its hash")));
            }
            if event.version != HashVersion::V1
                && let Err(why) = row.json_copy_matches(&event)
            {
                return Ok(bad(report, sequence, format!("event {sequence}: {why}")));
            }
            prev = event.hash;
            report.head_hash = prev;
            report.checked += 1;
            expected += 1;
        }
    }
    if expected <= to {
        return missing(pool, report, expected).await;
    }
    if to == head.last() && prev != head.hash {
        return Ok(bad(report, to, "the chain head does not match the last event".to_owned()));
    }
    Ok(report)
}

/// Event `expected` is not there: damage, unless retention dropped it while
/// this ran (no snapshot spans the run), which is said as at the start.
async fn missing(pool: &PgPool, mut report: Report, expected: u64) -> Result<Report, Error> {
    let server = pool.connect_options();
    let dropped = store::latest_checkpoint(&mut *pool.acquire().await?, &server).await?;
    if let Some((through, _)) = dropped
        && through >= expected
    {
        return Err(Error::OutOfRange(format!(
            "sequences up to {through} were removed by retention while verifying; the oldest retained is {}",
            through + 1
        )));
    }
    report.ok = false;
    report.first_bad_sequence = Some(expected);
    report.problem = Some(format!("event {expected} is missing"));
    Ok(report)
}
