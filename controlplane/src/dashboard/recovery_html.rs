//! The dashboard's recovery tables: each machine's failover and recovery job (its
//! progress, disks and prompt), the recovery hosts, the recovery plans.

use std::fmt::Write;

use super::page::{ago, bytes, esc, View};

fn opt(s: &Option<String>) -> String {
    esc(s.as_deref().unwrap_or("-"))
}

/// A job's cell: id, kind and state, a progress bar, the task it is at, its error
/// and its prompt.
fn job_cell(
    id: &Option<String>,
    kind: &Option<String>,
    state: &Option<String>,
    progress: f64,
    task: &Option<String>,
    error: &Option<String>,
    prompt: &Option<String>,
) -> String {
    let Some(id) = id else {
        return "<span class=\"why\">none</span>".to_string();
    };
    let pct = (progress.clamp(0.0, 1.0) * 100.0).floor();
    let mut out = format!(
        "<div>{} <span class=\"why\">{}</span></div><div>{} \
         <progress max=\"100\" value=\"{pct:.0}\"></progress> \
         <span class=\"pct\">{pct:.0} %</span></div>",
        opt(kind),
        esc(id),
        opt(state),
    );
    if let Some(t) = task {
        let _ = write!(out, "<div class=\"why\">at: {}</div>", esc(t));
    }
    if let Some(e) = error {
        let _ = write!(out, "<div class=\"error\">{}</div>", esc(e));
    }
    if let Some(p) = prompt {
        let _ = write!(out, "<div class=\"prompt\">{}</div>", esc(p));
    }
    out
}

/// The machines with a failover or a recovery job, in detail.
pub fn recovery(out: &mut String, v: &View) {
    let _ = write!(
        out,
        "<h2>Recovery <small>{}</small></h2><table id=\"recovery\"><tr><th>Machine</th>\
         <th>Failover</th><th>Job</th><th>Disks</th></tr>",
        v.recovery.len()
    );
    if v.recovery.is_empty() {
        out.push_str(
            "<tr><td colspan=\"4\" class=\"empty\">Every machine runs at home; no test \
             failover is up.</td></tr>",
        );
    }
    for r in &v.recovery {
        let failover = match &r.state {
            None => "<span class=\"why\">none (protected at home)</span>".to_string(),
            Some(state) => {
                let site = r.active_site.as_deref().unwrap_or("?");
                let class = if site == "recovery" {
                    "site-recovery"
                } else {
                    "site-home"
                };
                let how = match r.planned {
                    Some(true) => "planned",
                    Some(false) => "unplanned",
                    None => "",
                };
                let master = r
                    .master_target
                    .as_deref()
                    .map(|m| format!("; master target {}", esc(m)))
                    .unwrap_or_default();
                format!(
                    "<div>{} <span class=\"badge {class}\">{} site</span> {}</div>\
                     <div class=\"why\">{how}; point {}; host {}{master}</div>",
                    esc(state),
                    esc(site),
                    opt(&r.direction),
                    opt(&r.point),
                    opt(&r.host)
                )
            }
        };
        // The disks up, then how far each disk of the work is (a build still
        // running has none up yet).
        let mut disks: String = r
            .disks
            .iter()
            .map(|d| format!("<div class=\"disk\">{}</div>", esc(d)))
            .collect();
        for d in &r.disk_progress {
            let _ = write!(disks, "<div class=\"disk-progress\">{}</div>", esc(d));
        }
        if disks.is_empty() {
            disks = "<span class=\"why\">none up</span>".to_string();
        }
        let _ = write!(
            out,
            "<tr data-recovery=\"{name}\"><td>{name}</td><td>{failover}</td><td>{}</td>\
             <td>{disks}</td></tr>",
            job_cell(
                &r.job_id,
                &r.job_kind,
                &r.job_state,
                r.job_progress,
                &r.job_task,
                &r.job_error,
                &r.prompt
            ),
            name = esc(&r.machine),
        );
    }
    out.push_str("</table>");
}

/// The recovery hosts.
pub fn hosts(out: &mut String, v: &View) {
    let _ = write!(
        out,
        "<h2>Recovery hosts <small>{}</small></h2><table id=\"recovery-hosts\"><tr>\
         <th>Recovery host</th><th>State</th><th class=\"num\">Work items</th>\
         <th class=\"num\">Work space free</th><th>Last seen</th></tr>",
        v.recovery_hosts.len()
    );
    if v.recovery_hosts.is_empty() {
        out.push_str(
            "<tr><td colspan=\"5\" class=\"empty\">No recovery host has enrolled; a \
             failover needs one (ferry recovery-host).</td></tr>",
        );
    }
    for h in &v.recovery_hosts {
        let (class, state) = match (h.live, &h.store_error) {
            (false, _) => ("critical", "not seen"),
            (true, Some(_)) => ("critical", "no store"),
            (true, None) => ("normal", "live"),
        };
        let why = h
            .store_error
            .as_ref()
            .map(|e| {
                format!(
                    "<div class=\"why\">cannot reach the store: {}</div>",
                    esc(e)
                )
            })
            .unwrap_or_default();
        let _ = write!(
            out,
            "<tr data-recovery-host=\"{name}\"><td>{name}<div class=\"why\">nbd://{}</div></td>\
             <td><span class=\"badge {class}\">{state}</span>{why}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td>{} ago</td></tr>",
            esc(&h.nbd_address),
            h.items,
            bytes(h.work_dir_free_bytes as f64),
            ago(h.last_seen_ago_s as f64),
            name = esc(&h.name),
        );
    }
    out.push_str("</table>");
}

/// The recovery plans and their active jobs.
pub fn plans(out: &mut String, v: &View) {
    let _ = write!(
        out,
        "<h2>Recovery plans <small>{}</small></h2><table id=\"recovery-plans\"><tr>\
         <th>Plan</th><th class=\"num\">Groups</th><th class=\"num\">Machines</th>\
         <th>Job</th></tr>",
        v.plans.len()
    );
    if v.plans.is_empty() {
        out.push_str("<tr><td colspan=\"4\" class=\"empty\">No recovery plan yet.</td></tr>");
    }
    for p in &v.plans {
        let count = |n: Option<usize>| n.map_or_else(|| "-".to_string(), |n| n.to_string());
        let _ = write!(
            out,
            "<tr data-plan=\"{name}\"><td>{name}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td>{}</td></tr>",
            count(p.groups),
            count(p.machines),
            job_cell(
                &p.job_id,
                &p.job_kind,
                &p.job_state,
                p.job_progress,
                &None,
                &None,
                &p.prompt
            ),
            name = esc(&p.name),
        );
    }
    out.push_str("</table>");
}
