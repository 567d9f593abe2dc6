//! The dashboard's buttons (one small POST form each, carrying the session's form
//! token), the confirmation page for those that change where a machine runs, and
//! the page that says why the API refused. Served by `actions`.

use std::fmt::Write;

use super::actions::{MachineAction, NOTES_MAX_CHARS, POINT_MAX_CHARS};
use super::page::{esc, head};

/// A hidden field with the form token.
fn token_field(form_token: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"form_token\" value=\"{}\">",
        esc(form_token)
    )
}

/// The buttons of a machine's `actions`: the cleanup as one form with its notes and
/// a button per verdict, the change of point one form with its point, the others
/// one form each.
pub fn machine_buttons(machine: &str, actions: &[MachineAction], form_token: &str) -> String {
    let mut out = String::new();
    for a in actions {
        let url = format!("/act/machines/{}/{}", esc(machine), a.slug());
        if *a == MachineAction::Cleanup {
            let _ = write!(
                out,
                "<form class=\"act\" method=\"post\" action=\"{url}\">{}\
                 <input name=\"notes\" maxlength=\"{NOTES_MAX_CHARS}\" placeholder=\"notes\" \
                 aria-label=\"notes on the test\">\
                 <button type=\"submit\" name=\"verdict\" value=\"passed\" \
                 data-action=\"cleanup-passed\">Clean up: passed</button>\
                 <button type=\"submit\" name=\"verdict\" value=\"failed\" \
                 data-action=\"cleanup-failed\">Clean up: failed</button></form>",
                token_field(form_token)
            );
            continue;
        }
        if *a == MachineAction::ChangePoint {
            let _ = write!(
                out,
                "<form class=\"act\" method=\"post\" action=\"{url}\">{}\
                 <input name=\"point\" value=\"latest\" required maxlength=\"{POINT_MAX_CHARS}\" \
                 placeholder=\"latest, a point id or an RFC 3339 time\" \
                 aria-label=\"the point to change to: latest, a point id or an RFC 3339 time\">\
                 <button type=\"submit\" class=\"danger\" data-action=\"change-point\">{}\
                 </button></form>",
                token_field(form_token),
                esc(a.label())
            );
            continue;
        }
        let class = if a.needs_confirmation() {
            " class=\"danger\""
        } else {
            ""
        };
        let _ = write!(
            out,
            "<form class=\"act\" method=\"post\" action=\"{url}\">{}<button type=\"submit\"{class} \
             data-action=\"{}\">{}</button></form>",
            token_field(form_token),
            a.slug(),
            esc(a.label())
        );
    }
    out
}

/// The cancel button of a job's row.
pub fn job_cancel_button(job_id: &str, form_token: &str) -> String {
    format!(
        "<form class=\"act\" method=\"post\" action=\"/act/jobs/{}/cancel\">{}\
         <button type=\"submit\" class=\"danger\" data-action=\"cancel-job\">Cancel</button>\
         </form>",
        esc(job_id),
        token_field(form_token)
    )
}

/// The resume buttons of a job waiting for input: a verdict (passed or failed, with
/// notes) when it waits for a cleanup, else one button that lets it go on (a plan's
/// manual action done).
pub fn job_resume_buttons(job_id: &str, wants_verdict: bool, form_token: &str) -> String {
    let url = format!("/act/jobs/{}/resume", esc(job_id));
    if wants_verdict {
        format!(
            "<form class=\"act\" method=\"post\" action=\"{url}\">{}\
             <input name=\"notes\" maxlength=\"{NOTES_MAX_CHARS}\" placeholder=\"notes\" \
             aria-label=\"notes on the test\">\
             <button type=\"submit\" name=\"verdict\" value=\"passed\" \
             data-action=\"job-cleanup-passed\">Clean up: passed</button>\
             <button type=\"submit\" name=\"verdict\" value=\"failed\" \
             data-action=\"job-cleanup-failed\">Clean up: failed</button></form>",
            token_field(form_token)
        )
    } else {
        format!(
            "<form class=\"act\" method=\"post\" action=\"{url}\">{}\
             <button type=\"submit\" data-action=\"resume-job\">Done: resume</button></form>",
            token_field(form_token)
        )
    }
}

/// A page with one message and the way back.
pub fn message(title: &str, text: &str) -> String {
    let mut out = String::new();
    head(&mut out, &format!("Ferry: {title}"), false);
    let _ = write!(
        out,
        "<div class=\"signin\"><h1>{}</h1><p class=\"error\">{}</p>\
         <p><a href=\"/\">Back to the dashboard</a></p></div></body></html>",
        esc(title),
        esc(text)
    );
    out
}

/// Asks again before `what`: a form posting to `url` with `confirm=yes` and the
/// `hidden` fields the first form sent (a change of point's point).
pub fn confirm(
    what: &str,
    consequence: &str,
    url: &str,
    form_token: &str,
    hidden: &[(&str, &str)],
) -> String {
    let fields: String = hidden
        .iter()
        .map(|(k, v)| {
            format!(
                "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
                esc(k),
                esc(v)
            )
        })
        .collect();
    let mut out = String::new();
    head(&mut out, &format!("Ferry: {what}?"), false);
    let _ = write!(
        out,
        "<div class=\"signin\"><h1>{}?</h1><p>{}</p>\
         <form method=\"post\" action=\"{}\">{}{fields}\
         <input type=\"hidden\" name=\"confirm\" value=\"yes\">\
         <button type=\"submit\" id=\"confirm\">Yes: {}</button></form>\
         <p><a href=\"/\">No, back to the dashboard</a></p></div></body></html>",
        esc(what),
        esc(consequence),
        esc(url),
        token_field(form_token),
        esc(what)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buttons_carry_the_token_and_post_to_their_action() {
        let html = machine_buttons(
            "db1",
            &[MachineAction::TestFailover, MachineAction::Commit],
            "tok",
        );
        assert!(html.contains("action=\"/act/machines/db1/test-failover\""));
        assert!(html.contains("action=\"/act/machines/db1/commit\""));
        assert_eq!(html.matches("name=\"form_token\" value=\"tok\"").count(), 2);
        assert!(html.contains("class=\"danger\" data-action=\"commit\""));
        let html = machine_buttons("db1", &[MachineAction::Cleanup], "tok");
        assert!(html.contains("name=\"verdict\" value=\"passed\""));
        assert!(html.contains("name=\"verdict\" value=\"failed\""));
        assert!(html.contains("name=\"notes\""));
        let html = machine_buttons("db1", &[MachineAction::ChangePoint], "tok");
        assert!(html.contains("action=\"/act/machines/db1/change-point\""));
        assert!(html.contains("name=\"point\" value=\"latest\""));
        assert!(html.contains("class=\"danger\" data-action=\"change-point\""));
        assert!(html.contains("name=\"form_token\" value=\"tok\""));
        assert!(machine_buttons("db1", &[], "tok").is_empty());
        let html = job_resume_buttons("j1-a", false, "tok");
        assert!(html.contains("action=\"/act/jobs/j1-a/resume\""));
        assert!(html.contains("data-action=\"resume-job\"") && !html.contains("verdict"));
        let html = job_resume_buttons("j1-a", true, "tok");
        assert!(html.contains("name=\"verdict\" value=\"passed\""));
        assert!(html.contains("name=\"notes\"") && html.contains("value=\"tok\""));
    }

    #[test]
    fn the_confirmation_posts_again_with_confirm_and_escapes() {
        let html = confirm(
            "Commit of machine <x>",
            "final",
            "/act/machines/x/commit",
            "t\"",
            &[],
        );
        assert!(html.contains("name=\"confirm\" value=\"yes\""));
        assert!(html.contains("action=\"/act/machines/x/commit\""));
        assert!(html.contains("value=\"t&quot;\""));
        assert!(!html.contains("<x>"));
        let html = confirm("Change point", "again", "/act/x", "t", &[("point", "p\"1")]);
        assert!(html.contains("<input type=\"hidden\" name=\"point\" value=\"p&quot;1\">"));
        let html = message("Refused", "409 <b>busy</b>");
        assert!(html.contains("409 &lt;b&gt;busy&lt;/b&gt;") && html.contains("href=\"/\""));
    }
}
