//! No split brain (docs/recovery.md, "No split brain"): what a machine's failover
//! (`machine_recovery`, made and moved on by the recovery jobs) means for its source
//! agent and for the process servers. While the failover prepares, the agent's orders
//! say `prepare` (stop accepting writes, take a final point and report it); once the
//! machine failed over, they say `failed-over` (stop replicating, disks read-only),
//! and every process server's heartbeat answer lists the machine, so that an agent
//! that never reaches the control plane is refused at its process server all the same.
//! No row: no order, and the agent resumes.

use ferry_link::control::limits::{MAX_FAILED_OVER, MAX_POINT_ID_BYTES, MAX_TEXT_BYTES};
use ferry_link::control::wire::{AgentHeartbeat, FailoverOrder, FailoverReport};
use sqlx::Row;

use crate::db::{q, Db, Result};

/// The states of a failover report an agent may send.
pub const REPORT_STATES: [&str; 4] = ["preparing", "prepared", "read-only", "failed"];

/// The order's id while the failover has no job (a row made by hand).
pub const NO_JOB_ID: &str = "failover";

/// Checks the failover part of an agent's report (400 on error).
pub fn check_report(hb: &AgentHeartbeat) -> Result<(), String> {
    let Some(r) = &hb.failover else {
        return Ok(());
    };
    super::check_len("failover id", &r.id, MAX_POINT_ID_BYTES)?;
    if !REPORT_STATES.contains(&r.state.as_str()) {
        return Err(format!(
            "failover state {:?} must be one of {}",
            r.state,
            REPORT_STATES.join(", ")
        ));
    }
    if r.points.len() > super::MAX_DISKS {
        return Err(format!(
            "{} failover points; at most {}",
            r.points.len(),
            super::MAX_DISKS
        ));
    }
    for (i, p) in r.points.iter().enumerate() {
        super::check_name("disk", &p.disk)?;
        if r.points[..i].iter().any(|o| o.disk == p.disk) {
            return Err(format!("failover point of disk {} is listed twice", p.disk));
        }
        super::check_len(
            &format!("disk {} failover point", p.disk),
            &p.point,
            MAX_POINT_ID_BYTES,
        )?;
    }
    if r.state == "prepared" && r.points.is_empty() {
        return Err("a prepared failover report must list each disk's final point".into());
    }
    if let Some(e) = &r.error {
        super::check_len("failover error", e, MAX_TEXT_BYTES)?;
    }
    Ok(())
}

/// The order for `machine` now: `prepare` while its failover prepares (with the id
/// its final point answers to), `failed-over` once it failed over or was committed,
/// None without a failover.
pub async fn order(db: &Db, machine: &str) -> Result<Option<FailoverOrder>> {
    let row =
        sqlx::query("SELECT state, prepare_id, job_id FROM machine_recovery WHERE machine = $1")
            .bind(machine.to_string())
            .fetch_optional(db.pool())
            .await
            .map_err(q("reading a machine's failover"))?;
    let Some(row) = row else {
        return Ok(None);
    };
    let get = |e| q("reading a machine's failover")(e);
    let state: String = row.try_get("state").map_err(get)?;
    let prepare_id: Option<String> = row.try_get("prepare_id").map_err(get)?;
    let job_id: Option<String> = row.try_get("job_id").map_err(get)?;
    Ok(order_of(&state, prepare_id, job_id))
}

/// The order a `machine_recovery` row gives.
pub fn order_of(
    state: &str,
    prepare_id: Option<String>,
    job_id: Option<String>,
) -> Option<FailoverOrder> {
    let id = |fallback: Option<String>| fallback.unwrap_or_else(|| NO_JOB_ID.to_string());
    match state {
        "preparing" => Some(FailoverOrder {
            // A prepare without its id could never be answered: the job's id, which
            // the report then names, rather than none.
            id: id(prepare_id.or(job_id)),
            state: "prepare".into(),
        }),
        "failed-over" | "committed" => Some(FailoverOrder {
            id: id(job_id),
            state: "failed-over".into(),
        }),
        // A state a newer control plane wrote: the source is kept from writing, the
        // safe side of not knowing.
        _ => Some(FailoverOrder {
            id: id(job_id),
            state: "failed-over".into(),
        }),
    }
}

/// Stores the agent's `prepared` report into its failover row, only while that row
/// prepares for this very id, and once (a report is sent again at every heartbeat
/// while the order stands). Returns whether it stored it.
pub async fn record_report(db: &Db, machine: &str, r: &FailoverReport, now: i64) -> Result<bool> {
    if r.state != "prepared" {
        return Ok(false);
    }
    let json = serde_json::to_string(r).map_err(|e| crate::db::Error::Query {
        op: "recording a failover report",
        source: sqlx::Error::Decode(Box::new(e)),
    })?;
    // One conditional statement: atomic on its own, no transaction needed.
    let done = sqlx::query(
        "UPDATE machine_recovery SET prepared = $1, updated_at = $2 \
         WHERE machine = $3 AND state = 'preparing' AND prepare_id = $4 AND prepared IS NULL",
    )
    .bind(json)
    .bind(now)
    .bind(machine.to_string())
    .bind(r.id.clone())
    .execute(db.pool())
    .await
    .map_err(q("recording a failover report"))?;
    Ok(done.rows_affected() > 0)
}

/// The machines whose agents process servers refuse: failed over or committed, by
/// name, at most `MAX_FAILED_OVER + 1` (one more tells the caller the list is too
/// long to send whole).
pub async fn failed_over_machines(db: &Db) -> Result<Vec<String>> {
    let limit = i64::try_from(MAX_FAILED_OVER + 1).unwrap_or(i64::MAX);
    let rows = sqlx::query(
        "SELECT machine FROM machine_recovery WHERE state <> 'preparing' \
         ORDER BY machine LIMIT $1",
    )
    .bind(limit)
    .fetch_all(db.pool())
    .await
    .map_err(q("listing failed-over machines"))?;
    rows.iter()
        .map(|r| {
            r.try_get("machine")
                .map_err(q("listing failed-over machines"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use ferry_link::control::wire::{DiskPoint, DiskReport};

    use super::*;

    fn beat(machine: &str, report: Option<FailoverReport>) -> AgentHeartbeat {
        AgentHeartbeat {
            machine: machine.into(),
            disks: vec![DiskReport {
                name: "sda".into(),
                size_bytes: 1 << 20,
                state: "protected".into(),
                initial_copy_percent: 100.0,
                journal_bytes: 0,
                unacked_bytes: 0,
                newest_point: None,
                newest_uploaded_point: None,
                resync: None,
            }],
            process_server: None,
            last_error: None,
            group_listen: None,
            failover: report,
        }
    }

    fn report(id: &str, state: &str) -> FailoverReport {
        FailoverReport {
            id: id.into(),
            state: state.into(),
            points: match state {
                "prepared" => vec![DiskPoint {
                    disk: "sda".into(),
                    point: "final-1".into(),
                }],
                _ => vec![],
            },
            error: None,
        }
    }

    async fn set_row(db: &Db, machine: &str, state: &str) {
        sqlx::query(
            "INSERT INTO machine_recovery (machine, state, active_site, planned, prepare_id, \
             job_id, updated_at) VALUES ($1, $2, 'home', 1, 'prep-1', 'job-1', 0) \
             ON CONFLICT (machine) DO UPDATE SET state = $2",
        )
        .bind(machine.to_string())
        .bind(state.to_string())
        .execute(db.pool())
        .await
        .unwrap();
    }

    async fn prepared(db: &Db, machine: &str) -> Option<String> {
        sqlx::query("SELECT prepared FROM machine_recovery WHERE machine = $1")
            .bind(machine.to_string())
            .fetch_one(db.pool())
            .await
            .unwrap()
            .try_get("prepared")
            .unwrap()
    }

    async fn orders(db: &Db, hb: &AgentHeartbeat, now: i64) -> Option<FailoverOrder> {
        super::super::check_agent_heartbeat(hb).unwrap();
        super::super::agent_heartbeat(db, hb, None, now)
            .await
            .unwrap()
            .failover
    }

    /// The orders follow the row, the prepared report is kept only for the prepare
    /// it answers, and process servers are told of the machine once it failed over.
    async fn a_failover_row_orders_the_source_and_fences_it(db: &Db) {
        let now = 1_800_000_000;
        assert_eq!(orders(db, &beat("m1", None), now).await, None);
        assert_eq!(orders(db, &beat("m2", None), now).await, None);

        set_row(db, "m1", "preparing").await;
        let prepare = Some(FailoverOrder {
            id: "prep-1".into(),
            state: "prepare".into(),
        });
        assert_eq!(orders(db, &beat("m1", None), now + 1).await, prepare);
        assert_eq!(orders(db, &beat("m2", None), now + 1).await, None);
        assert!(
            failed_over_machines(db).await.unwrap().is_empty(),
            "still replicating its final point"
        );

        // Not yet prepared, or answering another prepare: nothing kept.
        let hb = beat("m1", Some(report("prep-1", "preparing")));
        assert_eq!(orders(db, &hb, now + 2).await, prepare);
        let hb = beat("m1", Some(report("prep-0", "prepared")));
        assert_eq!(orders(db, &hb, now + 3).await, prepare);
        assert_eq!(prepared(db, "m1").await, None);

        let hb = beat("m1", Some(report("prep-1", "prepared")));
        assert_eq!(orders(db, &hb, now + 4).await, prepare);
        let kept: FailoverReport =
            serde_json::from_str(&prepared(db, "m1").await.unwrap()).unwrap();
        assert_eq!(kept, report("prep-1", "prepared"));
        assert!(
            !record_report(db, "m1", &report("prep-1", "prepared"), now + 5)
                .await
                .unwrap(),
            "kept once"
        );

        set_row(db, "m1", "failed-over").await;
        let failed_over = Some(FailoverOrder {
            id: "job-1".into(),
            state: "failed-over".into(),
        });
        assert_eq!(orders(db, &beat("m1", None), now + 6).await, failed_over);
        assert_eq!(failed_over_machines(db).await.unwrap(), ["m1"]);
        assert!(
            !record_report(db, "m1", &report("prep-1", "prepared"), now + 7)
                .await
                .unwrap(),
            "no longer preparing"
        );
        set_row(db, "m1", "committed").await;
        assert_eq!(orders(db, &beat("m1", None), now + 8).await, failed_over);
        assert_eq!(failed_over_machines(db).await.unwrap(), ["m1"]);

        // Cancelled: no row, no order, no refusal.
        sqlx::query("DELETE FROM machine_recovery WHERE machine = 'm1'")
            .execute(db.pool())
            .await
            .unwrap();
        assert_eq!(orders(db, &beat("m1", None), now + 9).await, None);
        assert!(failed_over_machines(db).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_failover_row_orders_the_source_and_fences_it_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&Db::default_url(dir.path())).await.unwrap();
        a_failover_row_orders_the_source_and_fences_it(&db).await;
    }

    #[tokio::test]
    async fn a_failover_row_orders_the_source_and_fences_it_on_the_test_database() {
        let Ok(url) = std::env::var("FERRY_TEST_DATABASE") else {
            if std::env::var("FERRY_TEST_REQUIRE_REMOTE").is_ok_and(|v| v == "1") {
                panic!("FERRY_TEST_DATABASE is not set but FERRY_TEST_REQUIRE_REMOTE=1");
            }
            eprintln!("FERRY_TEST_DATABASE not set: failover orders not tested on PostgreSQL");
            return;
        };
        let _only = crate::db::tests::drop_all(&url).await;
        let db = Db::open(&url).await.unwrap();
        a_failover_row_orders_the_source_and_fences_it(&db).await;
    }

    #[test]
    fn each_row_state_gives_its_order() {
        let o = |s, p: Option<&str>, j: Option<&str>| {
            order_of(s, p.map(str::to_string), j.map(str::to_string)).map(|o| (o.id, o.state))
        };
        let pair = |i: &str, s: &str| Some((i.to_string(), s.to_string()));
        assert_eq!(o("preparing", Some("p"), Some("j")), pair("p", "prepare"));
        assert_eq!(o("preparing", None, Some("j")), pair("j", "prepare"));
        assert_eq!(
            o("failed-over", Some("p"), Some("j")),
            pair("j", "failed-over")
        );
        assert_eq!(o("committed", None, None), pair(NO_JOB_ID, "failed-over"));
        assert_eq!(
            o("later-state", None, Some("j")),
            pair("j", "failed-over"),
            "the safe side"
        );
    }

    #[test]
    fn a_failover_report_is_checked() {
        let ok = |r: FailoverReport| check_report(&beat("m1", Some(r)));
        assert!(ok(report("p", "prepared")).is_ok());
        assert!(ok(report("p", "read-only")).is_ok());
        let e = ok(report("p", "done")).unwrap_err();
        assert!(e.contains("failover state"), "{e}");
        let mut none = report("p", "prepared");
        none.points.clear();
        let e = ok(none).unwrap_err();
        assert!(e.contains("final point"), "{e}");
        let mut twice = report("p", "prepared");
        twice.points.push(twice.points[0].clone());
        assert!(ok(twice).unwrap_err().contains("twice"));
        let e = ok(report(&"x".repeat(MAX_POINT_ID_BYTES + 1), "preparing")).unwrap_err();
        assert!(e.contains("failover id"), "{e}");
        let mut bad = report("p", "prepared");
        bad.points[0].disk = "../x".into();
        assert!(ok(bad).is_err());
    }
}
