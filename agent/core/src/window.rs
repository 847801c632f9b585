//! Sync windows: when rollouts may run. Pure.
//!
//! A window is a cron schedule (with seconds) marking when it opens, a
//! duration, and a time zone. `allow` windows: a rollout touching their
//! targets/services may run only while one of them is open. `deny`
//! windows: no rollout touching them while one is open. Deny wins.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WindowKind {
    Allow,
    Deny,
}

/// One window of `sluice.yaml`'s `windows:`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Window {
    pub kind: WindowKind,
    /// When the window opens: cron with seconds, e.g. "0 0 9 * * Mon-Fri".
    pub schedule: String,
    #[serde(with = "duration")]
    pub duration: Duration,
    /// IANA time zone of the schedule (default UTC).
    #[serde(default = "utc")]
    pub time_zone: String,
    /// Targets it applies to (all when empty).
    #[serde(default)]
    pub targets: Vec<String>,
    /// Services it applies to (all when empty).
    #[serde(default)]
    pub services: Vec<String>,
}

fn utc() -> String {
    "UTC".into()
}

impl Window {
    /// Checks the schedule and the time zone; the error says which.
    pub fn validate(&self) -> Result<(), String> {
        cron::Schedule::from_str(&self.schedule)
            .map_err(|e| format!("schedule {:?}: {e}", self.schedule))?;
        self.time_zone
            .parse::<chrono_tz::Tz>()
            .map_err(|_| format!("timeZone {:?}: not an IANA time zone", self.time_zone))?;
        Ok(())
    }

    fn applies(&self, target: &str, service: &str) -> bool {
        (self.targets.is_empty() || self.targets.iter().any(|t| t == target))
            && (self.services.is_empty() || self.services.iter().any(|s| s == service))
    }

    /// The opening in force at `now` (its end), if the window is open.
    fn open_until(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let (schedule, tz) = self.parsed()?;
        let span = chrono::Duration::from_std(self.duration).ok()?;
        let local_now = now.with_timezone(&tz);
        // The latest opening at or before now: start the search one span back.
        schedule
            .after(&(local_now - span - chrono::Duration::seconds(1)))
            .take_while(|start| *start <= local_now)
            .map(|start| (start + span).with_timezone(&Utc))
            .filter(|end| *end > now)
            .last()
    }

    /// The next opening after `now`.
    fn next_open(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let (schedule, tz) = self.parsed()?;
        schedule
            .after(&now.with_timezone(&tz))
            .next()
            .map(|t| t.with_timezone(&Utc))
    }

    fn parsed(&self) -> Option<(cron::Schedule, chrono_tz::Tz)> {
        Some((
            cron::Schedule::from_str(&self.schedule).ok()?,
            self.time_zone.parse().ok()?,
        ))
    }
}

/// Whether a rollout touching `pairs` (target, service) may run at `now`.
/// Err carries when it may (None: never, e.g. only deny windows forever)
/// and why not.
pub fn check(
    windows: &[Window],
    pairs: &[(String, String)],
    now: DateTime<Utc>,
) -> Result<(), (Option<DateTime<Utc>>, String)> {
    let mut until: Option<DateTime<Utc>> = None;
    let mut reasons = Vec::new();
    let mut later = |t: Option<DateTime<Utc>>| {
        until = match (until, t) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    };
    for (target, service) in pairs {
        let relevant: Vec<&Window> = windows
            .iter()
            .filter(|w| w.applies(target, service))
            .collect();
        for w in relevant.iter().filter(|w| w.kind == WindowKind::Deny) {
            if let Some(end) = w.open_until(now) {
                reasons.push(format!(
                    "{service} on {target}: deny window {:?} until {}",
                    w.schedule,
                    end.to_rfc3339()
                ));
                later(Some(end));
            }
        }
        let allows: Vec<&&Window> = relevant
            .iter()
            .filter(|w| w.kind == WindowKind::Allow)
            .collect();
        if !allows.is_empty() && !allows.iter().any(|w| w.open_until(now).is_some()) {
            let next = allows.iter().filter_map(|w| w.next_open(now)).min();
            reasons.push(format!(
                "{service} on {target}: outside its allow windows{}",
                next.map(|n| format!(" (next opens {})", n.to_rfc3339()))
                    .unwrap_or_default()
            ));
            later(next);
        }
    }
    if reasons.is_empty() {
        Ok(())
    } else {
        Err((until, reasons.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(kind: WindowKind, schedule: &str, hours: u64, tz: &str) -> Window {
        Window {
            kind,
            schedule: schedule.into(),
            duration: Duration::from_secs(hours * 3600),
            time_zone: tz.into(),
            targets: vec![],
            services: vec![],
        }
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn pairs() -> Vec<(String, String)> {
        vec![("local".into(), "web".into())]
    }

    #[test]
    fn allow_windows_open_and_close_in_their_time_zone() {
        // Weekdays 09:00-17:00 Berlin (UTC+1 in November).
        let office = [w(
            WindowKind::Allow,
            "0 0 9 * * Mon-Fri",
            8,
            "Europe/Berlin",
        )];
        assert!(check(&office, &pairs(), at("2026-11-23T09:30:00Z")).is_ok()); // Mon 10:30 Berlin
        let (until, why) = check(&office, &pairs(), at("2026-11-23T07:30:00Z")).unwrap_err(); // 08:30 Berlin
        assert_eq!(until, Some(at("2026-11-23T08:00:00Z")));
        assert!(why.contains("outside its allow windows"), "{why}");
        // Saturday: waits until Monday 09:00 Berlin.
        let (until, _) = check(&office, &pairs(), at("2026-11-28T12:00:00Z")).unwrap_err();
        assert_eq!(until, Some(at("2026-11-30T08:00:00Z")));
    }

    #[test]
    fn deny_wins_and_scopes_apply() {
        let mut freeze = w(WindowKind::Deny, "0 0 0 24 12 *", 48, "UTC");
        assert!(check(&[freeze.clone()], &pairs(), at("2026-12-25T10:00:00Z")).is_err());
        assert!(check(&[freeze.clone()], &pairs(), at("2026-12-27T10:00:00Z")).is_ok());
        freeze.services = vec!["orders".into()];
        assert!(check(&[freeze], &pairs(), at("2026-12-25T10:00:00Z")).is_ok());
    }

    #[test]
    fn bad_schedules_and_zones_are_named() {
        assert!(w(WindowKind::Allow, "every day", 1, "UTC")
            .validate()
            .unwrap_err()
            .contains("schedule"));
        assert!(w(WindowKind::Allow, "0 0 9 * * *", 1, "Mars/Olympus")
            .validate()
            .unwrap_err()
            .contains("timeZone"));
    }
}
