//! The dashboard's HTML, rendered on the server from plain values: no template
//! engine, no script. Every string that came from an agent, a process server or an
//! operator (names, reasons, messages) goes through `esc`. The recovery tables are
//! in `recovery_html`, the buttons and the pages they lead to in `forms`.

use std::fmt::Write;

pub use super::actions::MachineAction;
use super::forms;
use super::recovery_html;

/// Seconds between the page's own reloads (`<meta http-equiv=refresh>`).
pub const REFRESH_S: u32 = 5;

/// A machine's row.
#[derive(Debug, Clone)]
pub struct MachineLine {
    pub name: String,
    pub state: String,
    pub health: String,
    pub reasons: Vec<String>,
    pub rpo_s: Option<f64>,
    pub process_server: Option<String>,
    pub last_seen_ago_s: i64,
    /// `failed-over (recovery site)`; None while protected at home.
    pub recovery: Option<String>,
    /// Its buttons (shown to operators and admins).
    pub actions: Vec<MachineAction>,
}

/// A machine's recovery in detail: its failover (none for a test) and its recovery
/// job, the active one or else the failover's last.
#[derive(Debug, Clone, Default)]
pub struct RecoveryLine {
    pub machine: String,
    /// preparing, failed-over, committed; None: no failover (a test failover).
    pub state: Option<String>,
    /// home or recovery.
    pub active_site: Option<String>,
    /// forward, or reverse once reprotected.
    pub direction: Option<String>,
    /// Reprotect's master target.
    pub master_target: Option<String>,
    pub planned: Option<bool>,
    /// `sda=p1, sdb=p1`.
    pub point: Option<String>,
    pub host: Option<String>,
    pub job_id: Option<String>,
    pub job_kind: Option<String>,
    pub job_state: Option<String>,
    pub job_progress: f64,
    pub job_task: Option<String>,
    pub job_error: Option<String>,
    /// What the job waits for, while it does.
    pub prompt: Option<String>,
    /// `sda @ POINT: nbd://...` or `... : /path`.
    pub disks: Vec<String>,
    /// Each disk of its build and serve work: `sda 42.0 % 118 MB/s`.
    pub disk_progress: Vec<String>,
}

/// A recovery host's row.
#[derive(Debug, Clone)]
pub struct HostLine {
    pub name: String,
    pub nbd_address: String,
    /// Work items given to it and not removed.
    pub items: i64,
    pub work_dir_free_bytes: u64,
    /// Heard from lately: given new work.
    pub live: bool,
    pub last_seen_ago_s: i64,
    /// Why it cannot reach the store, if it cannot.
    pub store_error: Option<String>,
}

/// A recovery plan's row.
#[derive(Debug, Clone, Default)]
pub struct PlanLine {
    pub name: String,
    /// None when its spec does not read as groups of machines.
    pub groups: Option<usize>,
    pub machines: Option<usize>,
    pub job_id: Option<String>,
    pub job_kind: Option<String>,
    pub job_state: Option<String>,
    pub job_progress: f64,
    pub prompt: Option<String>,
}

/// A process server's row.
#[derive(Debug, Clone)]
pub struct PsLine {
    pub name: String,
    pub address: String,
    pub health: String,
    pub reasons: Vec<String>,
    /// Machines the control plane assigned to it.
    pub assigned: i64,
    /// Machines connected to it, as it reported.
    pub connected: usize,
    pub cache_used_bytes: u64,
    pub cache_free_bytes: u64,
    pub ingest_bytes_per_s: f64,
    pub upload_lag_s: f64,
    pub cpu_percent: f64,
    pub last_seen_ago_s: i64,
}

/// A queued or running job's row.
#[derive(Debug, Clone)]
pub struct JobLine {
    pub id: String,
    pub kind: String,
    pub subject: String,
    pub state: String,
    /// 0.0 to 1.0 over all its tasks.
    pub progress: f64,
    /// The task it is at.
    pub task: Option<String>,
    /// What it waits for, while waiting for input.
    pub prompt: Option<String>,
    /// Whether it may be cancelled now.
    pub cancellable: bool,
    /// Whether it waits for an operator to resume it.
    pub resumable: bool,
}

/// An event's row.
#[derive(Debug, Clone)]
pub struct EventLine {
    /// `YYYY-MM-DD HH:MM:SS`, UTC.
    pub time: String,
    pub kind: String,
    pub subject: String,
    pub message: String,
}

/// Everything one page shows.
#[derive(Debug, Clone)]
pub struct View {
    pub signed_in_as: String,
    /// When the page was made, `YYYY-MM-DD HH:MM:SS UTC`.
    pub now: String,
    pub machines: Vec<MachineLine>,
    /// More machines than the page shows.
    pub machines_more: bool,
    pub process_servers: Vec<PsLine>,
    pub process_servers_more: bool,
    pub jobs: Vec<JobLine>,
    pub events: Vec<EventLine>,
    /// The session's form token; None for a viewer, who gets no buttons.
    pub form_token: Option<String>,
    pub recovery: Vec<RecoveryLine>,
    pub recovery_hosts: Vec<HostLine>,
    pub plans: Vec<PlanLine>,
}

/// HTML-escapes text for an element's content or a quoted attribute.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `42 s`, `3 min`, `2.5 h`, `4 d`.
pub fn ago(s: f64) -> String {
    let s = s.max(0.0);
    if s < 120.0 {
        format!("{s:.0} s")
    } else if s < 7200.0 {
        format!("{:.0} min", s / 60.0)
    } else if s < 172_800.0 {
        format!("{:.1} h", s / 3600.0)
    } else {
        format!("{:.0} d", s / 86_400.0)
    }
}

/// `0 B`, `12.3 MiB`, ...
pub fn bytes(n: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n.max(0.0);
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", units[u])
    } else {
        format!("{v:.1} {}", units[u])
    }
}

const STYLE: &str = "\
body{font:15px/1.4 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;background:#f4f5f7;color:#1d2433}\
header{background:#1d2433;color:#fff;padding:12px 24px;display:flex;align-items:center;gap:16px}\
header h1{font-size:18px;margin:0;flex:1}header form{margin:0}\
header button{background:#39435a;color:#fff;border:0;border-radius:4px;padding:5px 12px;cursor:pointer}\
main{padding:8px 24px 24px;max-width:1400px}\
h2{font-size:16px;margin:22px 0 8px}h2 small{color:#6b7386;font-weight:normal}\
table{border-collapse:collapse;width:100%;background:#fff;box-shadow:0 1px 2px rgba(0,0,0,.08)}\
th,td{text-align:left;padding:6px 10px;border-bottom:1px solid #e6e8ec;vertical-align:top}\
th{background:#eceef2;font-size:13px;color:#4a5163;font-weight:600}\
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}\
.badge{display:inline-block;border-radius:10px;padding:1px 9px;font-size:13px;font-weight:600}\
.normal{background:#dcf3e3;color:#14632d}.warning{background:#fff1cc;color:#7a5200}\
.critical{background:#fde0df;color:#9b1c1c}\
.why{color:#6b7386;font-size:13px}.empty{color:#6b7386;padding:10px}\
progress{width:160px;vertical-align:middle}#jobs td:nth-child(5){white-space:nowrap}\
.signin{max-width:420px;margin:80px auto;background:#fff;padding:24px 28px;box-shadow:0 1px 3px rgba(0,0,0,.15)}\
.signin input{width:100%;box-sizing:border-box;padding:7px;margin:6px 0 14px;font:inherit}\
.signin button{padding:7px 18px;font:inherit}.error{color:#9b1c1c}\
form.act{display:inline-block;margin:2px 4px 2px 0}\
form.act button{font:inherit;font-size:13px;border:1px solid #b9bfcc;background:#fff;border-radius:4px;padding:2px 9px;cursor:pointer}\
form.act button.danger{border-color:#d9a3a1;color:#9b1c1c}\
form.act input{font:inherit;font-size:13px;width:150px;padding:2px 5px}\
.prompt{background:#fff1cc;color:#5c3d00;padding:3px 8px;border-radius:4px;font-size:13px;display:inline-block;margin:2px 0}\
.disk,.disk-progress{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px}\
.site-recovery{background:#e3e9fd;color:#1f3b99}.site-home{background:#dcf3e3;color:#14632d}";

pub(super) fn head(out: &mut String, title: &str, refresh: bool) {
    out.push_str("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">");
    if refresh {
        let _ = write!(out, "<meta http-equiv=\"refresh\" content=\"{REFRESH_S}\">");
    }
    let _ = write!(
        out,
        "<meta name=\"viewport\" content=\"width=device-width\"><title>{}</title>\
         <style>{STYLE}</style></head><body>",
        esc(title)
    );
}

pub(super) fn badge(health: &str) -> String {
    let class = match health {
        "normal" | "warning" | "critical" => health,
        _ => "warning",
    };
    format!("<span class=\"badge {class}\">{}</span>", esc(health))
}

fn reasons(r: &[String]) -> String {
    if r.is_empty() {
        String::new()
    } else {
        format!("<div class=\"why\">{}</div>", esc(&r.join("; ")))
    }
}

/// The sign-in form; `error` says why the last try failed.
pub fn sign_in(error: Option<&str>) -> String {
    let mut out = String::new();
    head(&mut out, "Ferry: sign in", false);
    out.push_str("<div class=\"signin\"><h1>Ferry control plane</h1>");
    if let Some(e) = error {
        let _ = write!(out, "<p class=\"error\">{}</p>", esc(e));
    }
    out.push_str(
        "<form method=\"post\" action=\"/sign-in\"><label for=\"token\">API token \
         (any role)</label><input id=\"token\" name=\"token\" type=\"password\" \
         autocomplete=\"off\" required autofocus><button type=\"submit\">Sign in</button>\
         </form></div></body></html>",
    );
    out
}

/// The dashboard.
pub fn dashboard(v: &View) -> String {
    let mut out = String::new();
    head(&mut out, "Ferry: dashboard", true);
    let _ = write!(
        out,
        "<header><h1>Ferry control plane</h1><span>{} &middot; signed in as {}</span>\
         <form method=\"post\" action=\"/sign-out\"><button type=\"submit\">Sign out</button>\
         </form></header><main>",
        esc(&v.now),
        esc(&v.signed_in_as)
    );
    machines(&mut out, v);
    recovery_html::recovery(&mut out, v);
    process_servers(&mut out, v);
    recovery_html::hosts(&mut out, v);
    recovery_html::plans(&mut out, v);
    jobs(&mut out, v);
    events(&mut out, v);
    out.push_str("</main></body></html>");
    out
}

pub(super) fn more(shown: usize, more: bool) -> String {
    if more {
        format!("<small>the first {shown}; the API lists them all</small>")
    } else {
        format!("<small>{shown}</small>")
    }
}

fn machines(out: &mut String, v: &View) {
    let _ = write!(
        out,
        "<h2>Machines {}</h2><table id=\"machines\"><tr><th>Machine</th><th>Health</th>\
         <th class=\"num\">RPO</th><th>State</th><th>Process server</th><th>Last seen</th>\
         <th>Recovery</th></tr>",
        more(v.machines.len(), v.machines_more)
    );
    if v.machines.is_empty() {
        out.push_str(
            "<tr><td colspan=\"7\" class=\"empty\">No machine has reported yet.</td></tr>",
        );
    }
    for m in &v.machines {
        let _ = write!(
            out,
            "<tr data-machine=\"{name}\"><td>{name}</td><td>{}{}</td><td class=\"num\">{}</td>\
             <td>{}</td><td>{}</td><td>{} ago</td><td class=\"recovery\">{}{}</td></tr>",
            badge(&m.health),
            reasons(&m.reasons),
            m.rpo_s.map_or_else(|| "none yet".to_string(), ago),
            esc(&m.state),
            esc(m.process_server.as_deref().unwrap_or("none")),
            ago(m.last_seen_ago_s as f64),
            esc(m.recovery.as_deref().unwrap_or("at home")),
            // The buttons on their own line, under the state.
            v.form_token
                .as_deref()
                .map(|t| forms::machine_buttons(&m.name, &m.actions, t))
                .filter(|b| !b.is_empty())
                .map(|b| format!("<div>{b}</div>"))
                .unwrap_or_default(),
            name = esc(&m.name),
        );
    }
    out.push_str("</table>");
}

fn process_servers(out: &mut String, v: &View) {
    let _ = write!(
        out,
        "<h2>Process servers {}</h2><table id=\"process-servers\"><tr><th>Process server</th>\
         <th>Health</th><th class=\"num\">Machines</th><th class=\"num\">Cache used</th>\
         <th class=\"num\">Ingest</th><th class=\"num\">Upload lag</th><th class=\"num\">CPU</th>\
         <th>Last seen</th></tr>",
        more(v.process_servers.len(), v.process_servers_more)
    );
    if v.process_servers.is_empty() {
        out.push_str(
            "<tr><td colspan=\"8\" class=\"empty\">No process server has reported yet.</td></tr>",
        );
    }
    for p in &v.process_servers {
        let size = p.cache_used_bytes.saturating_add(p.cache_free_bytes);
        let used_pct = if size == 0 {
            0.0
        } else {
            p.cache_used_bytes as f64 * 100.0 / size as f64
        };
        let _ = write!(
            out,
            "<tr data-process-server=\"{name}\"><td>{name}<div class=\"why\">{}</div></td>\
             <td>{}{}</td><td class=\"num\">{} assigned, {} connected</td>\
             <td class=\"num\">{used_pct:.0} % of {}</td><td class=\"num\">{}/s</td>\
             <td class=\"num\">{}</td><td class=\"num\">{:.0} %</td><td>{} ago</td></tr>",
            esc(&p.address),
            badge(&p.health),
            reasons(&p.reasons),
            p.assigned,
            p.connected,
            bytes(size as f64),
            bytes(p.ingest_bytes_per_s),
            ago(p.upload_lag_s),
            p.cpu_percent,
            ago(p.last_seen_ago_s as f64),
            name = esc(&p.name),
        );
    }
    out.push_str("</table>");
}

fn jobs(out: &mut String, v: &View) {
    let _ = write!(
        out,
        "<h2>Jobs waiting, running or queued <small>{}</small></h2><table id=\"jobs\"><tr>\
         <th>Job</th><th>Kind</th><th>Subject</th><th>State</th><th>Progress</th><th>Task</th>\
         </tr>",
        v.jobs.len()
    );
    if v.jobs.is_empty() {
        out.push_str("<tr><td colspan=\"6\" class=\"empty\">No job is running.</td></tr>");
    }
    for j in &v.jobs {
        let pct = (j.progress.clamp(0.0, 1.0) * 100.0).floor();
        let _ = write!(
            out,
            "<tr data-job=\"{id}\"><td>{id}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td><progress max=\"100\" value=\"{pct:.0}\"></progress> \
             <span class=\"pct\">{pct:.0} %</span></td><td>{}{}{}{}</td></tr>",
            esc(&j.kind),
            esc(&j.subject),
            esc(&j.state),
            esc(j.task.as_deref().unwrap_or("")),
            j.prompt
                .as_deref()
                .map(|p| format!("<div class=\"prompt\">{}</div>", esc(p)))
                .unwrap_or_default(),
            match (&v.form_token, j.resumable) {
                (Some(t), true) => {
                    // A cleanup's prompt asks for a verdict; any other (a plan's manual
                    // action) for a resume alone.
                    let verdict = j.prompt.as_deref().is_some_and(|p| p.contains("verdict"));
                    format!(
                        "<div>{}</div>",
                        forms::job_resume_buttons(&j.id, verdict, t)
                    )
                }
                _ => String::new(),
            },
            match (&v.form_token, j.cancellable) {
                (Some(t), true) => format!("<div>{}</div>", forms::job_cancel_button(&j.id, t)),
                _ => String::new(),
            },
            id = esc(&j.id),
        );
    }
    out.push_str("</table>");
}

fn events(out: &mut String, v: &View) {
    let _ = write!(
        out,
        "<h2>Recent events <small>newest first</small></h2><table id=\"events\"><tr>\
         <th>Time (UTC)</th><th>Kind</th><th>Subject</th><th>What happened</th></tr>"
    );
    if v.events.is_empty() {
        out.push_str("<tr><td colspan=\"4\" class=\"empty\">Nothing has happened yet.</td></tr>");
    }
    for e in &v.events {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&e.time),
            esc(&e.kind),
            esc(&e.subject),
            esc(&e.message)
        );
    }
    out.push_str("</table>");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> View {
        View {
            signed_in_as: "ops".into(),
            now: "2026-12-06T09:00:00+00:00".into(),
            machines: vec![MachineLine {
                name: "db1".into(),
                state: "protected".into(),
                health: "critical".into(),
                reasons: vec!["not seen for 16 s".into()],
                rpo_s: Some(12.5),
                process_server: Some("ps1".into()),
                last_seen_ago_s: 16,
                recovery: None,
                actions: vec![MachineAction::TestFailover],
            }],
            machines_more: false,
            process_servers: vec![],
            process_servers_more: false,
            jobs: vec![JobLine {
                id: "j1".into(),
                kind: "retention".into(),
                subject: "db1".into(),
                state: "running".into(),
                progress: 0.5,
                task: Some("compact".into()),
                prompt: None,
                cancellable: true,
                resumable: false,
            }],
            events: vec![EventLine {
                time: "t".into(),
                kind: "health".into(),
                subject: "<script>alert(1)</script>".into(),
                message: "a \"quoted\" & 'odd' <b>message</b>".into(),
            }],
            form_token: None,
            recovery: vec![],
            recovery_hosts: vec![],
            plans: vec![],
        }
    }

    #[test]
    fn what_clients_sent_is_escaped() {
        let html = dashboard(&view());
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(
            html.contains("a &quot;quoted&quot; &amp; &#39;odd&#39; &lt;b&gt;message&lt;/b&gt;")
        );
        let mut v = view();
        v.machines[0].name = "x\"><img src=x onerror=alert(1)>".into();
        v.machines[0].health = "<i>".into();
        let html = dashboard(&v);
        assert!(!html.contains("<img"), "{html}");
        assert!(!html.contains("<i>"), "{html}");
    }

    #[test]
    fn rows_show_health_rpo_and_progress() {
        let html = dashboard(&view());
        assert!(html.contains("<span class=\"badge critical\">critical</span>"));
        assert!(html.contains("not seen for 16 s"));
        assert!(html.contains(">12 s<"), "{html}");
        assert!(html.contains("<progress max=\"100\" value=\"50\"></progress>"));
        assert!(html.contains("No process server has reported yet."));
        assert!(html.contains(&format!("content=\"{REFRESH_S}\"")));
    }

    #[test]
    fn operators_get_buttons_viewers_do_not() {
        let html = dashboard(&view());
        assert!(!html.contains("<form class=\"act\""), "{html}");
        assert!(
            html.contains("<td class=\"recovery\">at home</td>"),
            "{html}"
        );
        let mut v = view();
        v.form_token = Some("tok".into());
        let html = dashboard(&v);
        assert!(html.contains("action=\"/act/machines/db1/test-failover\""));
        assert!(html.contains("action=\"/act/jobs/j1/cancel\""));
    }

    #[test]
    fn recovery_shows_the_failover_its_job_disks_and_prompt() {
        let mut v = view();
        v.machines[0].recovery = Some("committed (recovery site), reverse".into());
        v.recovery = vec![RecoveryLine {
            machine: "db1".into(),
            state: Some("failed-over".into()),
            active_site: Some("recovery".into()),
            direction: Some("reverse".into()),
            master_target: Some("home-rh".into()),
            planned: Some(false),
            point: Some("sda=p9".into()),
            host: Some("rh1".into()),
            job_id: Some("j2".into()),
            job_kind: Some("test-failover".into()),
            job_state: Some("waiting-for-input".into()),
            job_progress: 0.6,
            job_task: Some("wait for cleanup".into()),
            job_error: None,
            prompt: Some("Check <db1>, then clean up".into()),
            disks: vec!["sda @ p9: nbd://10.0.0.5:10809/db1/sda".into()],
            disk_progress: vec!["<sda> 42.0 % 118 MB/s".into()],
        }];
        v.recovery_hosts = vec![
            HostLine {
                name: "rh1".into(),
                nbd_address: "10.0.0.5:10809".into(),
                items: 2,
                work_dir_free_bytes: 10 << 30,
                live: true,
                last_seen_ago_s: 1,
                store_error: None,
            },
            HostLine {
                name: "rh2".into(),
                nbd_address: "10.0.0.6:10809".into(),
                items: 0,
                work_dir_free_bytes: 10 << 30,
                live: true,
                last_seen_ago_s: 1,
                store_error: Some("store s3://b: get probe/recovery-host: <refused>".into()),
            },
        ];
        v.plans = vec![PlanLine {
            name: "erp".into(),
            groups: Some(2),
            machines: Some(5),
            ..PlanLine::default()
        }];
        let html = dashboard(&v);
        assert!(
            html.contains("committed (recovery site), reverse"),
            "{html}"
        );
        assert!(html.contains("<span class=\"badge site-recovery\">recovery site</span> reverse"));
        assert!(
            html.contains("unplanned; point sda=p9; host rh1; master target home-rh"),
            "{html}"
        );
        assert!(html.contains("Check &lt;db1&gt;, then clean up"), "{html}");
        assert!(html.contains("nbd://10.0.0.5:10809/db1/sda"));
        assert!(
            html.contains("<div class=\"disk-progress\">&lt;sda&gt; 42.0 % 118 MB/s</div>"),
            "{html}"
        );
        assert!(html.contains("<progress max=\"100\" value=\"60\"></progress>"));
        assert!(html.contains("data-recovery-host=\"rh1\"") && html.contains("10.0 GiB"));
        assert!(
            html.contains("no store</span><div class=\"why\">cannot reach the store: store s3://b: get probe/recovery-host: &lt;refused&gt;</div>"),
            "{html}"
        );
        assert!(html.contains("data-plan=\"erp\""), "{html}");
    }

    #[test]
    fn the_sign_in_form_posts_the_token() {
        let html = sign_in(Some("unknown <token>"));
        assert!(html.contains("method=\"post\" action=\"/sign-in\""));
        assert!(html.contains("type=\"password\""));
        assert!(html.contains("unknown &lt;token&gt;"));
        assert!(!html.contains("refresh"));
    }

    #[test]
    fn figures_read_as_people_write_them() {
        assert_eq!(ago(5.4), "5 s");
        assert_eq!(ago(600.0), "10 min");
        assert_eq!(ago(9000.0), "2.5 h");
        assert_eq!(ago(-3.0), "0 s");
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(3.0 * 1024.0 * 1024.0), "3.0 MiB");
    }
}
